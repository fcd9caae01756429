//! `mmx data generate` (synthetic cases for the trainers), `mmx data check` (validate case
//! files and count their cases) and `mmx data embed` (vision features of the cases' images).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use super::print::{say, Printer};
use mmx::tensor::write_atomic;
use mmx::train::embed::embed_cases;
use mmx::train::model::vision::ImageProcessor;
use mmx::train::model::Llava;
use mmx::train::synth::{generate, generate_with_images, image_path, Specialty, SynthSpec};
use mmx::train::{read_cases, write_cases, Case};

/// How many questions shared between files `check` lists before it only counts them.
const SHOWN_SHARED: usize = 10;

/// Arguments of `mmx data`.
#[derive(Debug, Args)]
pub struct DataArgs {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Write synthetic cases: DIR/SPECIALTY/{train,validation,test}.jsonl and DIR/README.md.
    Generate(GenerateArgs),
    /// Validate case files (JSON Lines) and count their cases per specialty; questions found in
    /// more than one file exit 1.
    Check(CheckArgs),
    /// Run a LLaVA model's vision tower once on every case's image: OUT/<id>.safetensors
    /// (`image_embeds`) and OUT/<the case file's name> pointing at them.
    Embed(EmbedArgs),
}

/// Arguments of `mmx data embed`.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// A LLaVA model directory (config.json, safetensors, preprocessor_config.json).
    #[arg(value_name = "MODEL")]
    model: PathBuf,
    /// The case file (JSON Lines); each case's `image` is relative to it.
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// The output directory.
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,
}

/// Arguments of `mmx data generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The output directory.
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,
    /// The seed: the same seed and counts give the same files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training cases per specialty.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    train: usize,
    /// Validation cases per specialty.
    #[arg(long, value_name = "N", default_value_t = 100)]
    validation: usize,
    /// Test cases per specialty.
    #[arg(long, value_name = "N", default_value_t = 100)]
    test: usize,
    /// Shuffle each case's options (by default each specialty lists its diagnoses in one fixed
    /// order; the cases are the same either way).
    #[arg(long)]
    shuffle_options: bool,
    /// Write each case's reasoning under one of four guidelines in turn (differential,
    /// analytical, Bayesian, intuitive), named in the case and its prompt.
    #[arg(long)]
    guidelines: bool,
    /// Answer-only training cases per specialty (no reasoning), in `answers.jsonl`.
    #[arg(long, value_name = "N", default_value_t = 0)]
    answer_only: usize,
    /// Image cases: one finding of each case (the ECG, the mass's margin, the lesion's
    /// asymmetry, border and colours, the nuclei's pleomorphism) drawn in a 32×32 PNG beside
    /// its case file (`<specialty>/images/<id>.png`) instead of written in its question.
    #[arg(long)]
    images: bool,
    /// Hold the test split out from these case files: drop every test case whose question
    /// one of them holds (e.g. another corpus's train.jsonl and validation.jsonl). Repeatable.
    #[arg(long, value_name = "FILE")]
    held_out_from: Vec<PathBuf>,
    /// Overwrite case files and a README already in DIR.
    #[arg(long)]
    force: bool,
}

/// Arguments of `mmx data check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Case files (JSON Lines).
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

/// Runs `mmx data`.
pub fn run(args: DataArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        DataCommand::Generate(args) => run_generate(args),
        DataCommand::Check(args) => run_check(args),
        DataCommand::Embed(args) => run_embed(args),
    }
}

fn run_embed(args: EmbedArgs) -> anyhow::Result<ExitCode> {
    let p = Printer::text();
    let model = Llava::load(
        &args.model,
        None,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?;
    let processor = ImageProcessor::read(&args.model.join("preprocessor_config.json"))?;
    let cases = read_cases(&args.data)?.len() as u64;
    let bar = super::progress::bar("embedding", super::progress::Counting::Items, cases, false);
    let summary = embed_cases(&model, &processor, &args.data, &args.output, &mut |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    say!(
        p,
        "embedded {} of {} cases' images into {}",
        summary.embedded,
        summary.cases,
        args.output.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    let p = Printer::text();
    let spec = SynthSpec {
        seed: args.seed,
        per_specialty: args.train,
        validation: args.validation,
        test: args.test,
        shuffle_options: args.shuffle_options,
        guidelines: args.guidelines,
        answer_only: args.answer_only,
    };
    let (mut splits, pictures) = if args.images {
        generate_with_images(&spec)?
    } else {
        (generate(&spec)?, Default::default())
    };
    let mut seen = Vec::new();
    for path in &args.held_out_from {
        seen.extend(read_cases(path)?);
    }
    let dropped = splits.hold_out_test(&seen);
    let readme = args.output.join("README.md");
    let mut files = Vec::new();
    for specialty in Specialty::ALL {
        for (split, cases) in [
            ("train", &splits.train),
            ("validation", &splits.validation),
            ("test", &splits.test),
            ("answers", &splits.answer_only),
        ] {
            if split == "answers" && args.answer_only == 0 {
                continue;
            }
            let path = args
                .output
                .join(specialty.name())
                .join(format!("{split}.jsonl"));
            let mine: Vec<Case> = cases
                .iter()
                .filter(|c| c.specialty() == specialty.name())
                .cloned()
                .collect();
            files.push((path, mine));
        }
    }
    if !args.force {
        let paths = files.iter().map(|(p, _)| p).chain([&readme]);
        if let Some(existing) = paths.into_iter().find(|p| p.exists()) {
            bail!(
                "`{}` exists; generated data replaces nothing unless asked\nhint: pass --force to overwrite it",
                existing.display()
            );
        }
    }
    for (path, cases) in &files {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create `{}`", dir.display()))?;
        }
        write_cases(path, cases)?;
        for case in cases {
            if let (Some(image), Some(dir)) = (pictures.get(case.id()), path.parent()) {
                let file = dir.join(image_path(case.id()));
                write_png(&file, image)?;
            }
        }
    }
    write_atomic(&readme, readme_text(&args).as_bytes())?;
    say!(p,
        "wrote {} synthetic cases to {} (seed {}; per specialty {} train, {} validation, {} test, {} answer-only)",
        splits.train.len() + splits.validation.len() + splits.test.len() + splits.answer_only.len(),
        args.output.display(),
        args.seed,
        args.train,
        args.validation,
        args.test,
        args.answer_only
    );
    if !args.held_out_from.is_empty() {
        say!(p,
            "held the test split out from {} files ({} cases): {dropped} test cases dropped, {} kept",
            args.held_out_from.len(),
            seen.len(),
            splits.test.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The command that makes these files, as a person would type it.
fn command_line(args: &GenerateArgs) -> String {
    format!(
        "mmx data generate -o {} --seed {} --train {} --validation {} --test {}{}{}{}{}",
        shell_word(&args.output.display().to_string()),
        args.seed,
        args.train,
        args.validation,
        args.test,
        if args.shuffle_options {
            " --shuffle-options"
        } else {
            ""
        },
        if args.guidelines { " --guidelines" } else { "" },
        if args.images { " --images" } else { "" },
        if args.answer_only > 0 {
            format!(" --answer-only {}", args.answer_only)
        } else {
            String::new()
        }
    ) + &args
        .held_out_from
        .iter()
        .map(|f| format!(" --held-out-from {}", shell_word(&f.display().to_string())))
        .collect::<String>()
}

/// `text` quoted for a POSIX shell where it needs it.
fn shell_word(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./".contains(c));
    if plain {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// The README of a generated directory: that the data is synthetic, how it was made, the
/// files and the rules.
fn readme_text(args: &GenerateArgs) -> String {
    let mut text = String::new();
    let _ = write!(
        text,
        "# Synthetic clinical cases\n\n\
         **Every case in this directory is synthetic.** No case comes from a patient, and none is \
         medical advice: mmx {} drew the findings at random from seed {}, and each diagnosis \
         follows a simplified rule written for this toolkit (listed below). Every case has \
         `\"synthetic\": true`.\n\n\
         Generated with:\n\n    {}\n\n\
         The same command with the same mmx version writes the same files, byte for byte.\n\n\
         ## Files\n\n\
         `<specialty>/train.jsonl`, `validation.jsonl` and `test.jsonl`, one case per line \
         (`id`, `specialty`, `question`, `options`, `answer`, `reasoning`, `synthetic`); per \
         specialty {} train, {} validation and {} test cases, the four diagnoses equally \
         frequent (to within one case). No question appears twice, in one file or across \
         files. `mmx data check FILE...` validates them. {}{}{}\n",
        env!("CARGO_PKG_VERSION"),
        args.seed,
        command_line(args),
        args.train,
        args.validation,
        args.test,
        if args.shuffle_options {
            "Each case lists its options in its own shuffled order."
        } else {
            "Each specialty lists its options in the order below in every case."
        },
        if args.guidelines {
            " Each case's reasoning is written under one of four guidelines in turn \
             (differential, analytical, Bayesian, intuitive), named in its `guideline` field; \
             `answers.jsonl` holds answer-only training cases (no reasoning)."
        } else {
            ""
        },
        if args.images {
            "\n\n## Images\n\nThese are image cases: one finding of each case is drawn, not \
             written, in `<specialty>/images/<id>.png` (32 x 32 pixels, RGB; the case's `image` \
             field), and its question leaves that finding out (its reasoning still states it). \
             The images are synthetic cartoons drawn by mmx from the seed, not medical images: \
             cardiology an ECG of three strips (leads II/III/aVF, V1 to V4, V4 to V6) whose ST \
             segment is raised, lowered or level; radiology a bright mass whose margin is smooth \
             (circumscribed), wavy (irregular) or spiculated; dermatology a brown lesion, round \
             or lobed (asymmetric), its border smooth or jagged (irregular), one colour or three; \
             pathology nine nuclei alike in size (mild pleomorphism) or not (moderate, marked)."
        } else {
            ""
        }
    );
    if !args.held_out_from.is_empty() {
        text.push_str(
            "\n\n## Held out\n\nThe test split is held out from the case files named by \
             `--held-out-from` above: every test case whose question one of them holds was \
             dropped, so `test.jsonl` holds at most the number of cases given, and its diagnoses \
             are no longer exactly balanced.\n",
        );
    }
    text.push_str("\n## Rules\n");
    for specialty in Specialty::ALL {
        let _ = write!(
            text,
            "\n### {specialty}\n\nOptions: {}.\n\n",
            specialty.diagnoses().join(", ")
        );
        for (i, rule) in specialty.rules().iter().enumerate() {
            let _ = writeln!(text, "{}. {rule}", i + 1);
        }
    }
    text
}

/// Writes `image` as a PNG file at `path` (its directory made), atomically.
fn write_png(path: &std::path::Path, image: &image::RgbImage) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create `{}`", dir.display()))?;
    }
    let mut bytes = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, image::ImageFormat::Png)
        .with_context(|| format!("cannot encode `{}`", path.display()))?;
    write_atomic(path, bytes.get_ref())?;
    Ok(())
}

fn run_check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let p = Printer::text();
    let mut files: Vec<(PathBuf, Vec<Case>)> = Vec::with_capacity(args.files.len());
    for path in &args.files {
        let cases = read_cases(path)?;
        let synthetic = cases.iter().filter(|c| c.is_synthetic()).count();
        say!(
            p,
            "{}: {} cases ({synthetic} synthetic)",
            path.display(),
            cases.len()
        );
        files.push((path.clone(), cases));
    }
    let mut counts: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for case in files.iter().flat_map(|(_, cases)| cases) {
        let entry = counts.entry(case.specialty()).or_default();
        entry.0 += 1;
        entry.1 += usize::from(case.is_synthetic());
    }
    let width = counts.keys().map(|s| s.len()).max().unwrap_or(0).max(9);
    say!(
        p,
        "{:<width$}  {:>8}  {:>9}",
        "specialty",
        "cases",
        "synthetic"
    );
    for (specialty, (cases, synthetic)) in &counts {
        say!(p, "{specialty:<width$}  {cases:>8}  {synthetic:>9}");
    }
    let (cases, synthetic) = counts
        .values()
        .fold((0, 0), |(c, s), (dc, ds)| (c + dc, s + ds));
    say!(p, "{:<width$}  {cases:>8}  {synthetic:>9}", "total");
    let shared = shared_questions(&files);
    for (first, again) in shared.iter().take(SHOWN_SHARED) {
        say!(p, "question of {again} is also in {first}");
    }
    if shared.len() > SHOWN_SHARED {
        say!(p, "... and {} more", shared.len() - SHOWN_SHARED);
    }
    if shared.is_empty() {
        say!(p, "ok");
        Ok(ExitCode::SUCCESS)
    } else {
        say!(
            p,
            "PROBLEMS FOUND: {} questions are in more than one file (a split leaks into another)",
            shared.len()
        );
        Ok(ExitCode::from(1))
    }
}

/// Questions found in two different files, as (`file` line N of the first, of the repeat).
fn shared_questions(files: &[(PathBuf, Vec<Case>)]) -> Vec<(String, String)> {
    let place = |path: &Path, index: usize| format!("`{}` line {}", path.display(), index + 1);
    let mut first: HashMap<&str, (usize, usize)> = HashMap::new();
    let mut shared = Vec::new();
    for (file, (path, cases)) in files.iter().enumerate() {
        for (index, case) in cases.iter().enumerate() {
            match first.get(case.question()) {
                Some(&(f, i)) if f != file => {
                    shared.push((place(&files[f].0, i), place(path, index)));
                }
                Some(_) => {}
                None => {
                    first.insert(case.question(), (file, index));
                }
            }
        }
    }
    shared
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_are_quoted_only_when_needed() {
        assert_eq!(shell_word("out/data-1"), "out/data-1");
        assert_eq!(shell_word("my data"), "'my data'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }
}
