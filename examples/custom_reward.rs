//! A reward of one's own in `mmx train gba`, through the library: here a brevity reward (1 for
//! a completion of at most 12 lines, falling to 0 at 24) added to the built-in accuracy reward.
//!
//!     cargo run --release --example custom_reward -- RECIPE OUT
//!
//! RECIPE is a GBA recipe whose `base` and `adapter` are directories (see `recipes/train/`).

use mmx::train::guideline::config::Guidelines;
use mmx::train::rl::recipe::GbaRecipe;
use mmx::train::rl::reward::{builtin, Completion, Reward, WeightedReward};
use mmx::train::rl::trainer::train_gba;

/// 1 up to 12 lines, then linearly less, 0 from 24 lines on.
struct Brevity;

impl Reward for Brevity {
    fn name(&self) -> &str {
        "brevity"
    }
    fn score(&self, c: &Completion<'_>) -> f64 {
        let lines = c.text.lines().count() as f64;
        (1.0 - (lines - 12.0).max(0.0) / 12.0).max(0.0)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, recipe, out] = &args[..] else {
        return Err("usage: custom_reward RECIPE OUT".into());
    };
    let recipe = GbaRecipe::load(recipe.as_ref())?;
    let guidelines = Guidelines::load(&recipe.guidelines)?;
    let rewards = vec![
        WeightedReward {
            reward: builtin("accuracy").ok_or("accuracy is built in")?,
            weight: 1.0,
        },
        WeightedReward {
            reward: Box::new(Brevity),
            weight: 0.2,
        },
    ];
    let cases = recipe.data.cases()?;
    let summary = train_gba(
        &recipe,
        &guidelines,
        &rewards,
        recipe.base.as_ref(),
        &recipe.base,
        recipe.adapter.as_ref(),
        &cases,
        out.as_ref(),
        false,
        &mut |m| eprintln!("step {}: reward {:.3}", m.step, m.rollouts.reward),
    )?;
    println!("final mean reward {:.3}", summary.final_reward);
    Ok(())
}
