//! Which tensors are merged chunk by chunk ([`super::stream`]) and what that costs in memory:
//! the sizes the plan budgets with and the streaming executor works in.

/// Elements per chunk (rounded to whole rows).
pub(crate) const CHUNK_ELEMENTS: usize = 1 << 18;

/// Tensors at least this large (and 2-D) are streamed.
const STREAM_MIN_ELEMENTS: usize = 1 << 21;

/// Whether a tensor of this shape is merged chunk by chunk.
pub(crate) fn is_streamed(shape: &[usize]) -> bool {
    shape.len() == 2 && shape[0].saturating_mul(shape[1]) >= STREAM_MIN_ELEMENTS
}

/// Peak memory of one streamed tensor: `buffers` chunk buffers on every worker.
pub(crate) fn working_bytes(buffers: usize) -> u64 {
    (rayon::current_num_threads() * buffers * CHUNK_ELEMENTS * 4) as u64
}
