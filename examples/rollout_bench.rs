//! Rollout generation speed: K sampled completions for each of a few answer-only cases, split
//! across the guidelines by their priors, through the KV cache in shards of 32 rows per thread,
//! as `mmx train gba` draws them (the fused engine), and through candle's model for comparison.
//! Writes the prompts' token ids to `PROMPTS.json` (so that
//! `scripts/bench_gba_torch.py` generates from the very same ids) and prints the completion
//! tokens per second of each (the best of `REPEATS`).
//!
//!     cargo run --release --example rollout_bench -- BASE ADAPTER PROMPTS.json [CASES K MAX REPEATS]

use std::time::Instant;

use candle_core::{DType, Device};
use mmx::train::fused::Engine;
use mmx::train::guideline::config::Guidelines;
use mmx::train::model::{CausalLm, GenerateOptions, Sampling};
use mmx::train::synth::{generate, SynthSpec};
use mmx::train::tokenizer::Tokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err("usage: rollout_bench BASE ADAPTER PROMPTS.json [CASES K MAX REPEATS]".into());
    }
    let number = |i: usize, default: usize| args.get(i).map_or(Ok(default), |a| a.parse());
    let (cases, k, max, repeats) = (number(4, 8)?, number(5, 8)?, number(6, 96)?, number(7, 3)?);
    let base = std::path::Path::new(&args[1]);
    let mut model = CausalLm::load(base, None, DType::F32, &Device::Cpu)?;
    model.load_adapter(args[2].as_ref())?;
    let tokenizer = Tokenizer::load(base)?;
    let guidelines = Guidelines::load(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/guidelines.toml"),
    )?;
    let spec = SynthSpec {
        guidelines: true,
        answer_only: cases,
        ..SynthSpec::new(0, 64, 100, 200)
    };
    let mut prompts = Vec::new();
    for case in generate(&spec)?
        .answer_only
        .iter()
        .filter(|c| c.specialty() == "cardiology")
    {
        for (g, n) in guidelines
            .guidelines
            .iter()
            .zip(guidelines.split(case.specialty(), k)?)
        {
            let mut ids: Vec<u32> = model.config().bos_token_id.into_iter().collect();
            ids.extend(tokenizer.encode(&case.prompt_under(Some(&g.prompt)), false)?);
            prompts.extend(std::iter::repeat_n(ids, n));
        }
    }
    std::fs::write(&args[3], serde_json::to_string(&prompts)?)?;
    let config = model.config().clone();
    let options = |repeat: usize, shard: usize| GenerateOptions {
        max_new_tokens: max,
        sampling: Sampling::Sample {
            temperature: 1.0,
            top_p: 1.0,
        },
        seed: (repeat * 1000 + shard) as u64,
        eos_token_ids: config.eos_token_ids.clone(),
        pad_token_id: config.pad_token_id.unwrap_or(0),
    };
    let engine = Engine::new(&model, &[])?;
    // (seconds, tokens) of the fastest repeat.
    let time =
        |generate: &dyn Fn(usize) -> mmx::Result<Vec<Vec<u32>>>| -> mmx::Result<(f64, usize)> {
            let mut best = (f64::INFINITY, 0);
            for repeat in 0..repeats {
                let started = Instant::now();
                let out = generate(repeat)?;
                let seconds = started.elapsed().as_secs_f64();
                if seconds < best.0 {
                    best = (seconds, out.iter().map(Vec::len).sum());
                }
            }
            Ok(best)
        };
    let (seconds, tokens) =
        time(&|repeat| engine.generate_sharded(&prompts, 32, |shard| options(repeat, shard)))?;
    let (candle_seconds, candle_tokens) =
        time(&|repeat| model.generate_sharded(&prompts, 32, |shard| options(repeat, shard)))?;
    println!(
        "{}",
        serde_json::json!({
            "rows": prompts.len(),
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_second": tokens as f64 / seconds,
            "candle_tokens_per_second": candle_tokens as f64 / candle_seconds,
        })
    );
    Ok(())
}
