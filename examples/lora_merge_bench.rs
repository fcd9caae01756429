//! End to end on one device: TIES of four rank-64 LoRAs over every linear layer of a
//! 7B-shaped model (Llama-2-7B: 32 layers; q, k, v, o 4096×4096; gate, up 11008×4096; down
//! 4096×11008), random factors, full delta output in bf16, in memory (no disk). Each module:
//! the four products s·B·A, each expert trimmed to its top half, the fused consensus, bf16
//! back on the host. Issue 5's goal: under 10 s on a GPU, with the CPU time beside it.
//!
//!     cargo run --release --example lora_merge_bench -- [cpu|cuda] [LAYERS]
//!
//! LAYERS (default 32) shortens the model; the time per layer is the same for every layer.

use std::time::Instant;

use mmx::adapter::{lora_delta, LoraKind, LoraModule};
use mmx::backend::device::{ConsensusRule, Gpu, LoraFactors, MergeExpert};
use mmx::merge::rng::MaskRng;
use mmx::merge::sparsify::keep_count;
use mmx::merge::{merge_tensor, ExpertParams, Method, TensorJob};

const EXPERTS: usize = 4;
const RANK: usize = 64;
const DENSITY: f32 = 0.5;

/// The linear layers of one Llama-2-7B block: (name, rows = out, cols = in).
const MODULES: [(&str, usize, usize); 7] = [
    ("q_proj", 4096, 4096),
    ("k_proj", 4096, 4096),
    ("v_proj", 4096, 4096),
    ("o_proj", 4096, 4096),
    ("gate_proj", 11008, 4096),
    ("up_proj", 11008, 4096),
    ("down_proj", 4096, 11008),
];

/// Uniform values in ±scale from the counter-based generator (reproducible, any thread).
fn random(len: usize, scale: f32, key: &str, index: usize) -> Vec<f32> {
    let rng = MaskRng::new(2026, key, index);
    (0..len as u64)
        .map(|i| (rng.uniform(i) * 2.0 - 1.0) * scale)
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let device = args.next().unwrap_or_else(|| "cuda".into());
    let layers: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(32);
    let gpu = match device.as_str() {
        "cuda" => {
            let devices = mmx::backend::cuda::devices().unwrap_or_default();
            let Some(first) = devices.first() else {
                println!("no CUDA device answers here: nothing measured");
                return Ok(());
            };
            println!("device: {}", first.name);
            Some(Gpu::open(0)?)
        }
        "cpu" => {
            println!("device: CPU, {} threads", rayon::current_num_threads());
            None
        }
        other => return Err(format!("unknown device `{other}` (cpu or cuda)").into()),
    };
    let (mut merge_seconds, mut elements, mut checksum) = (0.0f64, 0u64, 0.0f64);
    for layer in 0..layers {
        // Factors drawn outside the timed part: they stand for what a reader would map.
        let factors: Vec<Vec<(Vec<f32>, Vec<f32>)>> = MODULES
            .iter()
            .map(|&(module, rows, cols)| {
                let key = format!("model.layers.{layer}.{module}");
                (0..EXPERTS)
                    .map(|t| {
                        let a = random(RANK * cols, 1.0 / (cols as f32).sqrt(), &key, 2 * t);
                        let b = random(rows * RANK, 0.01, &key, 2 * t + 1);
                        (a, b)
                    })
                    .collect()
            })
            .collect();
        let start = Instant::now();
        // The CPU merges the modules of a layer in parallel, as `mmx merge` does its tensors;
        // the GPU takes them one after another.
        let merged: Vec<Vec<u16>> = match &gpu {
            Some(gpu) => MODULES
                .iter()
                .zip(&factors)
                .map(|(&(_, rows, cols), f)| merge_on_gpu(gpu, f, rows, cols))
                .collect::<Result<_, _>>()?,
            None => {
                use rayon::prelude::*;
                MODULES
                    .par_iter()
                    .zip(&factors)
                    .map(|(&(module, rows, cols), f)| {
                        merge_on_cpu(f, &format!("model.layers.{layer}.{module}"), rows, cols)
                            .map_err(|e| e.to_string())
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        merge_seconds += start.elapsed().as_secs_f64();
        for (values, &(_, rows, cols)) in merged.iter().zip(&MODULES) {
            elements += (rows * cols) as u64;
            checksum += values
                .iter()
                .step_by(4099)
                .map(|&b| f64::from(f32::from_bits(u32::from(b) << 16)))
                .sum::<f64>();
        }
    }
    println!(
        "TIES of {EXPERTS} rank-{RANK} LoRAs, {layers} layers, {:.2} G elements → bf16 delta: {merge_seconds:.2} s ({:.2} s per layer), checksum {checksum:.6e}",
        elements as f64 / 1e9,
        merge_seconds / layers as f64
    );
    Ok(())
}

fn merge_on_gpu(
    gpu: &Gpu,
    factors: &[(Vec<f32>, Vec<f32>)],
    rows: usize,
    cols: usize,
) -> Result<Vec<u16>, Box<dyn std::error::Error>> {
    let borrowed: Vec<Option<LoraFactors<'_>>> = factors
        .iter()
        .map(|(a, b)| {
            Some(LoraFactors {
                a,
                b,
                rank: RANK,
                scaling: 2.0,
                transposed: false,
            })
        })
        .collect();
    let updates = gpu.lora_deltas(&borrowed, rows, cols)?;
    let k = keep_count(DENSITY, rows * cols).max(1);
    let rules = (0..EXPERTS)
        .map(|t| {
            Ok(MergeExpert {
                cut: gpu.cut(&updates, t, k)?,
                vote_factor: 1.0,
                weight: 1.0,
            })
        })
        .collect::<mmx::Result<Vec<_>>>()?;
    let rule = ConsensusRule {
        divide_by_count: false,
        normalize: true,
        gamma: 0.0,
        lambda: 1.0,
    };
    match gpu.merge(&updates, &rules, rule, None, true)?.values {
        mmx::backend::device::DeviceValues::Bf16(bits) => Ok(bits),
        mmx::backend::device::DeviceValues::F32(_) => Err("asked for bf16".into()),
    }
}

fn merge_on_cpu(
    factors: &[(Vec<f32>, Vec<f32>)],
    key: &str,
    rows: usize,
    cols: usize,
) -> Result<Vec<u16>, Box<dyn std::error::Error>> {
    use rayon::prelude::*;
    let module = LoraModule {
        module: key.into(),
        kind: LoraKind::Linear,
        a_key: String::new(),
        b_key: String::new(),
        rank: RANK,
        scaling: 2.0,
        fan_in_fan_out: false,
        target_shape: [rows, cols],
    };
    let experts: Vec<Vec<f32>> = factors
        .par_iter()
        .map(|(a, b)| lora_delta(&module, a, b))
        .collect();
    let base = vec![0f32; rows * cols];
    let merged = merge_tensor(
        Method::Ties,
        &Method::Ties.default_globals(),
        TensorJob {
            name: key,
            shape: &[rows, cols],
            base: Some(&base),
            experts,
            params: vec![
                ExpertParams {
                    weight: 1.0,
                    density: DENSITY,
                    gamma: 0.0,
                    epsilon: 0.0,
                };
                EXPERTS
            ],
            expert_ids: (0..EXPERTS).collect(),
        },
    )?;
    Ok(merged
        .values
        .par_iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect())
}
