//! The floor `mmx publish` and `mmx verify --read-data` are measured against: blake3 of every
//! file under the given directories, and, unless `--hash-only`, a durable copy of each into OUT
//! (write, fsync, fsync of the directory), as any content-addressed store must do at least
//! once per byte. Files are processed in parallel on all cores, as mmx does.
//!
//!     cargo run --release --example hash_copy -- OUT DIR... [--hash-only]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

fn files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let hash_only = args.iter().any(|a| a == "--hash-only");
    let args: Vec<&String> = args.iter().filter(|a| *a != "--hash-only").collect();
    let (out, dirs) = args
        .split_first()
        .ok_or("usage: hash_copy OUT DIR... [--hash-only]")?;
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out)?;
    let mut all = Vec::new();
    for dir in dirs {
        files(Path::new(dir), &mut all)?;
    }
    let start = Instant::now();
    let bytes: u64 = all
        .par_iter()
        .enumerate()
        .map(|(i, path)| -> std::io::Result<u64> {
            let file = std::fs::File::open(path)?;
            // SAFETY: the inputs are not modified while they are read.
            let map = unsafe { memmap2::Mmap::map(&file)? };
            let mut hasher = blake3::Hasher::new();
            hasher.update_rayon(&map);
            let digest = hasher.finalize();
            if !hash_only {
                let target = out.join(format!("{i}-{}", &digest.to_hex()[..16]));
                let mut f = std::fs::File::create(&target)?;
                f.write_all(&map)?;
                f.sync_all()?;
                std::fs::File::open(&out)?.sync_all()?;
            }
            Ok(map.len() as u64)
        })
        .sum::<std::io::Result<u64>>()?;
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{} {} files, {:.3} GB in {seconds:.3} s: {:.2} GB/s",
        if hash_only {
            "hashed"
        } else {
            "hashed and copied"
        },
        all.len(),
        bytes as f64 / 1e9,
        bytes as f64 / 1e9 / seconds
    );
    Ok(())
}
