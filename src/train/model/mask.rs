//! [`Mask`]: the positions and the attention bias of one forward pass under left padding.
//!
//! A row's positions count from its first real token (a padded prompt gets the same positions
//! as the same prompt alone). A query sees the keys at or before it that are real tokens, and
//! always itself, so that no row of the softmax is empty: a left-padding query attends only to
//! itself, its output is never used, and no NaN appears in the forward or backward pass.

use candle_core::{DType, Device, Tensor};

use super::candle;
use crate::error::{Error, Result};

/// Positions `[b, s]` (u32) and the additive attention bias `[b, 1, s, past + s]` (0 where a
/// query may attend, −∞ elsewhere).
#[derive(Debug, Clone)]
pub struct Mask {
    /// The rotary position of each new token.
    pub positions: Tensor,
    /// Added to the attention scores before the softmax.
    pub bias: Tensor,
}

impl Mask {
    /// The mask for new tokens `new[b][i]` (true for a real token) after `past[b]` cached
    /// ones; positions must stay below `max_positions`.
    pub fn build(
        past: &[Vec<bool>],
        new: &[Vec<bool>],
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Mask> {
        let b = new.len();
        let s = new.first().map_or(0, Vec::len);
        let p = past.first().map_or(0, Vec::len);
        let t = p + s;
        let mut positions = Vec::with_capacity(b * s);
        let mut bias = Vec::with_capacity(b * s * t);
        for (row, (old, cur)) in past.iter().zip(new).enumerate() {
            let keys: Vec<bool> = old.iter().chain(cur).copied().collect();
            let mut real = old.iter().filter(|&&m| m).count();
            for (i, &m) in cur.iter().enumerate() {
                real += usize::from(m);
                let pos = real.saturating_sub(1);
                if pos >= max_positions {
                    return Err(Error::ModelInput {
                        message: format!(
                            "row {row} reaches position {pos}, beyond `max_position_embeddings` ({max_positions})"
                        ),
                    });
                }
                positions.push(pos as u32);
                let query = p + i;
                bias.extend(keys.iter().enumerate().map(|(j, &k)| {
                    if j == query || (j < query && k) {
                        0f32
                    } else {
                        f32::NEG_INFINITY
                    }
                }));
            }
        }
        let positions = Tensor::from_vec(positions, (b, s), device).map_err(candle("positions"))?;
        let bias = Tensor::from_vec(bias, (b, 1, s, t), device)
            .and_then(|m| m.to_dtype(dtype))
            .map_err(candle("attention mask"))?;
        Ok(Mask { positions, bias })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_padding_shifts_positions_and_hides_pad_keys() {
        let past = vec![vec![false, true], vec![true, true]];
        let new = vec![vec![true, true], vec![true, false]];
        let m = Mask::build(&past, &new, 16, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.positions.to_vec2::<u32>().unwrap(), [[1, 2], [2, 2]]);
        let bias = m.bias.squeeze(1).unwrap().to_vec3::<f32>().unwrap();
        let inf = f32::NEG_INFINITY;
        // Row 0: key 0 is padding; query 2 sees 1, 2; query 3 sees 1, 2, 3.
        assert_eq!(bias[0], [[inf, 0., 0., inf], [inf, 0., 0., 0.]]);
        // Row 1: query 3 is padding; it sees itself as well, whatever it is.
        assert_eq!(bias[1], [[0., 0., 0., inf], [0., 0., 0., 0.]]);
        let err = Mask::build(&past, &new, 2, DType::F32, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("position 2"), "{err}");
    }
}
