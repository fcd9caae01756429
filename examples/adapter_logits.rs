//! Writes mmx's logits for a model with a PEFT adapter, for the check that an mmx-trained
//! adapter loads in PEFT and gives the same logits (`scripts/make_model_fixtures.py
//! --check-adapter`): the first test case's prompt, tokenized, and the logits with the adapter
//! on, into one safetensors file (`input_ids` I64 [1, s], `logits` F32 [1, s, vocab]).
//!
//!     cargo run --release --example adapter_logits -- BASE_DIR ADAPTER_DIR OUT.safetensors

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use mmx::train::model::CausalLm;
use mmx::train::tokenizer::Tokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [base, adapter, out] = args.as_slice() else {
        return Err("usage: adapter_logits BASE_DIR ADAPTER_DIR OUT.safetensors".into());
    };
    let tokenizer = Tokenizer::load(Path::new(base))?;
    let mut model = CausalLm::load(Path::new(base), None, DType::F32, &Device::Cpu)?;
    model.load_adapter(Path::new(adapter))?;
    let case = &mmx::train::synth::generate(&mmx::train::synth::SynthSpec {
        seed: 0,
        per_specialty: 0,
        validation: 0,
        test: 1,
        shuffle_options: false,
        guidelines: false,
        answer_only: 0,
    })?
    .test[0];
    let mut ids: Vec<u32> = model.config().bos_token_id.into_iter().collect();
    ids.extend(tokenizer.encode(&format!("{}{}", case.prompt(), case.completion()), false)?);
    let n = ids.len();
    let input = Tensor::from_vec(ids.clone(), (1, n), &Device::Cpu)?;
    let logits = model.forward(&input, None, None)?;
    let ids64: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    let tensors = std::collections::HashMap::from([
        (
            "input_ids".to_string(),
            Tensor::from_vec(ids64, (1, n), &Device::Cpu)?,
        ),
        ("logits".to_string(), logits.to_dtype(DType::F32)?),
    ]);
    candle_core::safetensors::save(&tensors, out)?;
    println!("wrote {n} positions to {out}");
    Ok(())
}
