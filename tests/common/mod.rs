//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod tiny;

/// A directory under tests/fixtures/reference.
pub fn reference(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference")
        .join(name)
}

/// The largest elementwise error of `ours` against `theirs`, relative to the largest magnitude
/// of `theirs` (elementwise ratios are meaningless where merges leave zeros).
pub fn max_relative_error(ours: &[f32], theirs: &[f32]) -> f64 {
    assert_eq!(
        ours.len(),
        theirs.len(),
        "compared tensors differ in length"
    );
    let scale = theirs.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let worst = ours
        .iter()
        .zip(theirs)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
    worst / scale.max(f64::MIN_POSITIVE)
}

/// Writes a recipe at `path` merging the reference adapters lora_a (weight 0.8) and lora_b
/// (0.5) onto the reference base with `method` into `output`; `extra` is TOML for the
/// `[merge]` table (and tables after it).
pub fn write_two_lora_recipe(path: &Path, method: &str, output: &str, extra: &str) {
    std::fs::write(
        path,
        format!(
            "[merge]\nmethod = '{method}'\nbase = '{}'\noutput = '{output}'\n{extra}\n\
             [[merge.experts]]\nsource = '{}'\nweight = 0.8\n\
             [[merge.experts]]\nsource = '{}'\nweight = 0.5\n",
            reference("base").display(),
            reference("lora_a").display(),
            reference("lora_b").display(),
        ),
    )
    .unwrap();
}

/// Copies the fixture LLaVA (tests/fixtures/vlm/tiny-llava, with the training fixture's
/// tokenizer) into `llava`, and the cases' images (square.png, wide.png) into `images`.
pub fn copy_tiny_llava(llava: &Path, images: &Path) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vlm");
    std::fs::create_dir_all(llava).unwrap();
    for file in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ] {
        std::fs::copy(fixtures.join("tiny-llava").join(file), llava.join(file)).unwrap();
    }
    std::fs::copy(
        fixtures.join("train/tokenizer.json"),
        llava.join("tokenizer.json"),
    )
    .unwrap();
    for image in ["square.png", "wide.png"] {
        std::fs::copy(fixtures.join(image), images.join(image)).unwrap();
    }
}

/// Runs the built `mmx` in `cwd` with `args`.
pub fn mmx(args: &[&str], cwd: &Path) -> Output {
    mmx_with_env(args, cwd, &[])
}

/// [`mmx`] with environment variables set (`Some`) or removed (`None`).
pub fn mmx_with_env(args: &[&str], cwd: &Path, env: &[(&str, Option<&str>)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mmx"));
    command.current_dir(cwd).args(args);
    for (name, value) in env {
        match value {
            Some(v) => command.env(name, v),
            None => command.env_remove(name),
        };
    }
    command.output().unwrap()
}

/// Asserts that a command succeeded, showing its stderr if not.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A xorshift stream for test weights and tokens.
pub struct Rng(pub u64);

impl Rng {
    /// Uniform in [0, 1) with 53 bits.
    pub fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Roughly normal (a sum of uniforms), mean 0, standard deviation `std`.
    pub fn normal(&mut self, std: f64) -> f32 {
        let s: f64 = (0..4).map(|_| self.next()).sum::<f64>() - 2.0;
        (s * std * 3f64.sqrt()) as f32
    }

    /// Uniform in ±`bound`.
    pub fn uniform(&mut self, bound: f64) -> f32 {
        ((2.0 * self.next() - 1.0) * bound) as f32
    }

    /// Uniform in 0..`n`.
    pub fn below(&mut self, n: usize) -> u32 {
        (self.next() * n as f64) as u32
    }
}
