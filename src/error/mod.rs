//! The library's error type. Every variant names what it is about (a file, a tensor, a
//! parameter) so that the CLI can print it as is.

use std::path::PathBuf;

mod header;

pub use header::HeaderError;

/// Everything the library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on a file or directory failed.
    #[error("`{}`: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A safetensors file failed validation.
    #[error("`{}`: invalid safetensors file: {source}", path.display())]
    Header {
        /// The safetensors file.
        path: PathBuf,
        /// What is wrong with it.
        source: HeaderError,
    },
    /// A JSON file could not be parsed.
    #[error("`{}`: invalid JSON: {source}", path.display())]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// The parser's error (it carries line and column).
        source: serde_json::Error,
    },
    /// A tensor that the merge needs is absent.
    #[error("`{}`: tensor `{tensor}` is missing", path.display())]
    MissingTensor {
        /// The file or checkpoint that should hold it.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
    },
    /// A tensor's shape differs from what it must be.
    #[error("`{}`: tensor `{tensor}` has shape {actual:?}, expected {expected:?}", path.display())]
    ShapeMismatch {
        /// The file that holds the tensor.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The shape it must have.
        expected: Vec<usize>,
        /// The shape it has.
        actual: Vec<usize>,
    },
    /// A tensor's dtype cannot be used here.
    #[error("`{}`: tensor `{tensor}` has dtype {dtype}, {reason}", path.display())]
    Dtype {
        /// The file that holds the tensor.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Its dtype as safetensors spells it.
        dtype: String,
        /// Why it is refused.
        reason: String,
    },
    /// A tensor holds NaN or infinity.
    #[error("`{}`: tensor `{tensor}` has a non-finite value ({value}) at element {index}", path.display())]
    NonFinite {
        /// The file (or the input, for computed tensors) the value comes from.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The flat element index.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A PEFT adapter is malformed or uses a feature mmx does not support.
    #[error("`{}`: {message}", path.display())]
    Adapter {
        /// The adapter directory or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A model directory is malformed or does not match the others.
    #[error("`{}`: {message}", path.display())]
    Checkpoint {
        /// The model directory or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A recipe (TOML or mergekit YAML) is invalid.
    #[error("`{}`: {message}", path.display())]
    Recipe {
        /// The recipe file.
        path: PathBuf,
        /// What is wrong, with the line where known.
        message: String,
    },
    /// A calibration statistics file is malformed or does not fit the module it describes.
    #[error("`{}`: module `{module}`: {message}", path.display())]
    Calibration {
        /// The statistics file.
        path: PathBuf,
        /// The module (its weight's name without `.weight`), or the tensor the problem is in.
        module: String,
        /// What is wrong.
        message: String,
    },
    /// A merge parameter has a value outside its domain.
    #[error("parameter `{name}` for tensor `{tensor}`: {message}")]
    Parameter {
        /// The parameter.
        name: String,
        /// The tensor it applies to.
        tensor: String,
        /// What is wrong.
        message: String,
    },
    /// A decomposition of one tensor's numbers failed (not a user's parameter: the inputs'
    /// values, e.g. NaN, or a degenerate matrix).
    #[error("tensor `{tensor}`: {message}")]
    Numerical {
        /// The tensor.
        tensor: String,
        /// What failed.
        message: String,
    },
    /// The output cannot be written where asked.
    #[error("`{}`: {message}", path.display())]
    Output {
        /// The output path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The registry refused an operation or found a problem (a corrupt or missing blob, a
    /// tag that moved, an invalid name).
    #[error("registry `{}`: {message}", path.display())]
    Registry {
        /// The registry, or the file in it the problem is about.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The requested device cannot be used (`--device cuda` without a usable GPU).
    #[error("--device cuda: {message}")]
    Device {
        /// Why.
        message: String,
    },
    /// A data file (cases, JSON Lines) has an invalid line.
    #[error("`{}` line {line}: {message}", path.display())]
    Data {
        /// The data file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong, naming the field.
        message: String,
    },
    /// Synthetic data cannot be generated as asked.
    #[error("synthetic data: {message}")]
    Synth {
        /// Why.
        message: String,
    },
    /// A plot cannot be drawn or written.
    #[error("`{}`: {message}", path.display())]
    Plot {
        /// The image file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A model directory cannot be loaded as the trainers' causal LM (an unsupported
    /// architecture, an invalid `config.json` field, a LoRA target that matches nothing).
    #[error("`{}`: {message}", path.display())]
    Model {
        /// The model directory or the file in it.
        path: PathBuf,
        /// What is wrong, naming the field or tensor.
        message: String,
    },
    /// An input to the trainers' model is invalid (a token id outside the vocabulary, an
    /// attention mask of the wrong shape, a sampling option out of range).
    #[error("{message}")]
    ModelInput {
        /// What is wrong, naming the input.
        message: String,
    },
    /// A tensor operation of the trainers' model failed inside candle.
    #[error("{context}: {source}")]
    Candle {
        /// What was being computed (a layer, a tensor).
        context: String,
        /// candle's error.
        source: Box<candle_core::Error>,
    },
    /// A `tokenizer.json` cannot be read or does not fit the model.
    #[error("`{}`: {message}", path.display())]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A job scheduler (Slurm) refused or failed a submission.
    #[error("`{}`: {message}", path.display())]
    Scheduler {
        /// The job script.
        path: PathBuf,
        /// What the scheduler said.
        message: String,
    },
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
