//! PEFT LoRA adapters: `adapter_config.json` ([`LoraConfig`]), the weights and their modules
//! ([`Adapter`], [`LoraModule`]), and the dense update s·B·A each module makes.

mod config;
mod lora;
mod same_base;

pub use config::LoraConfig;
pub use lora::{lora_delta, lora_delta_rows, Adapter, LoraKind, LoraModule, PEFT_PREFIX};
pub use same_base::module_shapes;
