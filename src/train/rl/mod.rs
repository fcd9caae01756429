//! Reinforcement learning of a LoRA from verifiable rewards (GRPO family, and GBA: DESIGN.md
//! §7): advantage estimators, the per-token objective, rewards.

pub mod advantage;
pub mod metrics;
pub mod objective;
pub mod recipe;
pub mod reward;
mod rollout;
pub mod trainer;
