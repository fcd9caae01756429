//! Why a safetensors header was refused: one variant per check that `tensor::parse_header`
//! makes.

/// Why a safetensors file was refused. Each check has its own variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer than the 8 bytes that hold the header length.
    #[error("file is {len} bytes, too short to hold a header length")]
    TooShort {
        /// The file length.
        len: u64,
    },
    /// The declared header length exceeds the cap.
    #[error("header length {len} exceeds the {cap} byte cap")]
    HeaderTooLarge {
        /// The declared length.
        len: u64,
        /// The cap.
        cap: u64,
    },
    /// The declared header runs past the end of the file.
    #[error("header of {len} bytes runs past the end of the {file_len} byte file (truncated?)")]
    HeaderOutOfBounds {
        /// The declared length.
        len: u64,
        /// The file length.
        file_len: u64,
    },
    /// The header is not a JSON object of the expected form.
    #[error("header is not valid JSON: {0}")]
    Json(String),
    /// A tensor names a dtype safetensors does not define.
    #[error("tensor `{tensor}` has unknown dtype `{dtype}`")]
    UnknownDtype {
        /// The tensor.
        tensor: String,
        /// The dtype string.
        dtype: String,
    },
    /// A tensor's offsets are reversed.
    #[error("tensor `{tensor}` has offsets [{start}, {end}) with end before start")]
    ReversedOffsets {
        /// The tensor.
        tensor: String,
        /// Its start offset.
        start: u64,
        /// Its end offset.
        end: u64,
    },
    /// The element count times the dtype size overflows.
    #[error("tensor `{tensor}` has a shape whose byte size overflows")]
    Overflow {
        /// The tensor.
        tensor: String,
    },
    /// A tensor's byte range does not match its shape and dtype.
    #[error("tensor `{tensor}` spans {actual} bytes but its shape and dtype need {expected}")]
    SizeMismatch {
        /// The tensor.
        tensor: String,
        /// Bytes its shape and dtype need.
        expected: u64,
        /// Bytes its offsets span.
        actual: u64,
    },
    /// Tensors overlap or leave a gap between them.
    #[error("tensor `{tensor}` starts at {start}, expected {expected} (tensors must tile the data without gaps or overlap)")]
    NotContiguous {
        /// The tensor.
        tensor: String,
        /// Where it starts.
        start: u64,
        /// Where the previous tensor ended.
        expected: u64,
    },
    /// The data section is shorter or longer than the tensors say.
    #[error("data section is {actual} bytes but the tensors cover {expected} (truncated file or trailing bytes)")]
    DataLength {
        /// Bytes the tensors cover.
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
}
