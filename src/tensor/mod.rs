//! Tensors on disk: dtypes, zero-copy safetensors reading with validated headers, and atomic,
//! sharded writing.
//!
//! The main types are [`SafetensorsFile`] (read) and [`ShardedWriter`] (write).

mod atomic_dir;
mod digest;
mod dtype;
mod file;
mod header;
mod writer;

pub use atomic_dir::replace_dir_atomically;
pub use digest::Digest;
pub use dtype::{from_f32, to_f32, Dtype};
pub use file::{check_finite, check_finite_from, SafetensorsFile};
pub use header::{encode_header, parse_header, Header, HeaderError, TensorInfo, MAX_HEADER_BYTES};
pub use writer::{
    sync_dir, temp_sibling, write_atomic, write_atomic_parts, write_atomic_via, write_safetensors,
    ShardedWriter, TensorSpec,
};
