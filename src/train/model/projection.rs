//! [`Projection`]: the seven linear layers of a Llama/Qwen2 decoder layer, with the names
//! Hugging Face gives them.

/// One of the linear layers of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Projection {
    /// Attention query, `self_attn.q_proj`.
    Q,
    /// Attention key, `self_attn.k_proj`.
    K,
    /// Attention value, `self_attn.v_proj`.
    V,
    /// Attention output, `self_attn.o_proj`.
    O,
    /// MLP gate (the SiLU branch), `mlp.gate_proj`.
    Gate,
    /// MLP up, `mlp.up_proj`.
    Up,
    /// MLP down, `mlp.down_proj`.
    Down,
}

impl Projection {
    /// Every projection, in the order of the forward pass.
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// The module's own name (`q_proj`).
    pub fn name(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }

    /// The submodule that holds it (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            Projection::Q | Projection::K | Projection::V | Projection::O => "self_attn",
            Projection::Gate | Projection::Up | Projection::Down => "mlp",
        }
    }

    /// Its module path in layer `layer` (`model.layers.3.self_attn.q_proj`).
    pub fn path(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}", self.parent(), self.name())
    }

    /// The projection and layer a module path names, if it is one of these.
    pub fn parse_path(path: &str) -> Option<(usize, Projection)> {
        let rest = path.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        // Reject `+3`, `03` and the like: the path must be exactly what `path` writes.
        if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let layer: usize = layer.parse().ok()?;
        let projection = Projection::ALL
            .into_iter()
            .find(|p| rest == format!("{}.{}", p.parent(), p.name()))?;
        (projection.path(layer) == path).then_some((layer, projection))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip() {
        for p in Projection::ALL {
            assert_eq!(Projection::parse_path(&p.path(12)), Some((12, p)));
        }
        assert_eq!(
            Projection::path(Projection::Gate, 0),
            "model.layers.0.mlp.gate_proj"
        );
        for bad in [
            "model.layers.0.mlp.q_proj",
            "model.layers.x.self_attn.q_proj",
            "model.layers.01.self_attn.q_proj",
            "model.layers.0.self_attn.q_proj.base_layer",
            "lm_head",
        ] {
            assert_eq!(Projection::parse_path(bad), None, "{bad}");
        }
    }
}
