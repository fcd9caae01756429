//! [`KvCache`]: the keys and values of every layer for the tokens already seen, and which of
//! those tokens are real, so that generation feeds one new token per step.

use candle_core::Tensor;

/// Per-layer keys and values `[b, kv_heads, t, head_dim]` plus the attention mask of the `t`
/// cached positions. Cached tensors are detached: the cache serves generation, and gradients
/// do not flow into earlier steps through it.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    mask: Vec<Vec<bool>>,
}

impl KvCache {
    /// An empty cache for a model of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            mask: Vec::new(),
        }
    }

    /// The number of layers it serves.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Cached positions per row.
    pub fn len(&self) -> usize {
        self.mask.first().map_or(0, Vec::len)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The batch size of what is cached, if anything is.
    pub fn batch_size(&self) -> Option<usize> {
        (!self.mask.is_empty()).then_some(self.mask.len())
    }

    /// Which cached positions hold real tokens, per row.
    pub fn mask(&self) -> &[Vec<bool>] {
        &self.mask
    }

    /// Records the mask of the tokens of one forward pass.
    pub(crate) fn push_mask(&mut self, new: &[Vec<bool>]) {
        if self.mask.is_empty() {
            self.mask = vec![Vec::new(); new.len()];
        }
        for (row, add) in self.mask.iter_mut().zip(new) {
            row.extend_from_slice(add);
        }
    }

    /// Appends one step's keys and values `[b, kv_heads, s, head_dim]` to layer `layer` and
    /// returns all of them, the new ones last (still attached to the graph).
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let Some(slot) = self.layers.get_mut(layer) else {
            candle_core::bail!(
                "the cache has {} layers, layer {layer} asked for it",
                self.layers.len()
            );
        };
        let (k_all, v_all) = match slot {
            Some((k_old, v_old)) => (
                Tensor::cat(&[&*k_old, k], 2)?,
                Tensor::cat(&[&*v_old, v], 2)?,
            ),
            None => (k.clone(), v.clone()),
        };
        *slot = Some((k_all.detach(), v_all.detach()));
        Ok((k_all, v_all))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn appends_along_the_sequence() {
        let mut cache = KvCache::new(2);
        assert!(cache.is_empty() && cache.batch_size().is_none());
        let step = |n: usize| Tensor::ones((1, 2, n, 4), DType::F32, &Device::Cpu).unwrap();
        cache.push_mask(&[vec![false, true, true]]);
        cache.append(1, &step(3), &step(3)).unwrap();
        cache.push_mask(&[vec![true]]);
        let (k, v) = cache.append(1, &step(1), &step(1)).unwrap();
        assert_eq!(k.dims(), [1, 2, 4, 4]);
        assert_eq!(v.dims(), [1, 2, 4, 4]);
        assert_eq!(cache.len(), 4);
        assert_eq!(cache.mask(), [vec![false, true, true, true]]);
        assert!(cache.append(2, &step(1), &step(1)).is_err());
    }
}
