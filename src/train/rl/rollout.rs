//! One sampled completion of a GBA step, scored.

use crate::train::batch::Example;

/// A rollout: its group (the case's K completions), the guideline it was drawn under, its
/// tokens (prompt then completion) and its rewards.
#[derive(Debug, Clone)]
pub(super) struct Rollout {
    /// The group, numbered within the step.
    pub group: usize,
    /// The guideline's index in the guidelines file.
    pub guideline: usize,
    /// Prompt and completion tokens.
    pub example: Example,
    /// Completion tokens.
    pub completion_len: usize,
    /// Cut at the length limit.
    pub truncated: bool,
    /// Each reward function's score, in the recipe's order.
    pub rewards: Vec<f64>,
    /// Their weighted sum.
    pub reward: f64,
}
