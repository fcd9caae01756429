//! [`Weights`]: the model's weights as plain f32 vectors for the fused engine, each tagged with
//! where its gradient goes in the flat gradient buffer (if it is trained).

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use super::matmul::{gemm, View};
use crate::adapter::PEFT_PREFIX;
use crate::error::{Error, Result};
use crate::train::model::{candle, CausalLm, LoraLinear, Projection, RmsNorm};

/// A trained tensor: its name, shape and offset in the gradient buffer.
#[derive(Debug, Clone)]
pub(crate) struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
}

/// Where each trained tensor's gradient lives; a tensor without a slot is frozen.
#[derive(Debug, Clone)]
pub(crate) struct Slots {
    by_name: HashMap<String, usize>,
    pub params: Vec<Param>,
    /// The gradient buffer's length.
    pub len: usize,
}

impl Slots {
    /// Slots for `names` (with shapes) laid out one after another in the order given.
    pub(crate) fn new(trained: &[(String, Vec<usize>)]) -> Slots {
        let mut params = Vec::with_capacity(trained.len());
        let mut len = 0;
        for (name, shape) in trained {
            params.push(Param {
                name: name.clone(),
                shape: shape.clone(),
                offset: len,
            });
            len += shape.iter().product::<usize>();
        }
        let by_name = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        Slots {
            by_name,
            params,
            len,
        }
    }

    /// The offset of `name`'s gradient, if it is trained; refused unless the trained tensor
    /// has the `len` elements of the model's.
    fn offset(&self, name: &str, len: usize) -> Result<Option<usize>> {
        let Some(p) = self.by_name.get(name).map(|&i| &self.params[i]) else {
            return Ok(None);
        };
        if p.shape.iter().product::<usize>() != len {
            return Err(Error::ModelInput {
                message: format!(
                    "the trained `{name}` has shape {:?}, the model's {len} elements",
                    p.shape
                ),
            });
        }
        Ok(Some(p.offset))
    }
}

/// A tensor's values as f32 (it must already be f32: the engine runs f32 models only).
fn values(t: &Tensor, what: &str) -> Result<Vec<f32>> {
    if t.dtype() != DType::F32 {
        return Err(Error::ModelInput {
            message: format!("the fused engine needs f32 `{what}`, not {:?}", t.dtype()),
        });
    }
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(candle(format!("reading `{what}`")))
}

/// A LoRA update `s·(x·Aᵀ)·Bᵀ`.
#[derive(Debug, Clone)]
pub(crate) struct Lora {
    /// `[r, in]`.
    pub a: Vec<f32>,
    /// `[out, r]`.
    pub b: Vec<f32>,
    pub r: usize,
    pub scaling: f32,
    pub grad_a: Option<usize>,
    pub grad_b: Option<usize>,
}

/// A projection `x·Wᵀ + bias` with an optional LoRA update.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub out: usize,
    pub inp: usize,
    /// `[out, in]`: the frozen weight with the LoRA update merged in, `W + s·B·A`.
    pub w: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub lora: Option<Lora>,
    pub grad_w: Option<usize>,
    pub grad_bias: Option<usize>,
}

/// An RMSNorm scale.
#[derive(Debug, Clone)]
pub(crate) struct Norm {
    pub w: Vec<f32>,
    pub grad: Option<usize>,
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub input_norm: Norm,
    pub post_norm: Norm,
    /// q, k, v, o, gate, up, down, in [`Projection::ALL`] order.
    pub proj: Vec<Linear>,
}

/// The whole model.
#[derive(Debug, Clone)]
pub(crate) struct Weights {
    /// `[vocab, hidden]`.
    pub embed: Vec<f32>,
    pub grad_embed: Option<usize>,
    /// `[vocab, hidden]`; `None` when tied to the embedding.
    pub lm_head: Option<Vec<f32>>,
    pub grad_lm_head: Option<usize>,
    pub final_norm: Norm,
    pub layers: Vec<Layer>,
}

/// A norm's scale, with the gradient slot of `name` if trained; `used` counts the slots found.
fn norm(n: &RmsNorm, name: &str, slots: &Slots, used: &mut usize) -> Result<Norm> {
    let w = values(n.weight(), name)?;
    let grad = slots.offset(name, w.len())?;
    *used += usize::from(grad.is_some());
    Ok(Norm { w, grad })
}

/// A projection at module `path`; its tensors are named as [`CausalLm::weight_vars`] (Hugging
/// Face names) and [`CausalLm::lora_vars`] (PEFT keys) name them.
/// `path` names its weight and bias as the trained variables do, `module` its LoRA factors
/// (the adapter's module path).
fn linear(
    l: &LoraLinear,
    path: &str,
    module: &str,
    lora_on: bool,
    slots: &Slots,
    used: &mut usize,
) -> Result<Linear> {
    let (out, inp) = l.shape();
    let mut slot = |name: String, len: usize| -> Result<Option<usize>> {
        let s = slots.offset(&name, len)?;
        *used += usize::from(s.is_some());
        Ok(s)
    };
    let weight_name = format!("{path}.weight");
    let mut w = values(l.weight(), &weight_name)?;
    let grad_w = slot(weight_name, out * inp)?;
    let bias_name = format!("{path}.bias");
    let bias = l.bias().map(|b| values(b, &bias_name)).transpose()?;
    let grad_bias = slot(bias_name, out)?;
    let lora = match (l.lora_a(), l.lora_b(), l.scaling()) {
        (Some(a), Some(b), Some(s)) if lora_on => {
            let (a_name, b_name) = (
                format!("{PEFT_PREFIX}{module}.lora_A.weight"),
                format!("{PEFT_PREFIX}{module}.lora_B.weight"),
            );
            let a = values(a.as_tensor(), &a_name)?;
            let r = a.len() / inp;
            Some(Lora {
                r,
                a,
                b: values(b.as_tensor(), &b_name)?,
                scaling: s as f32,
                grad_a: slot(a_name, r * inp)?,
                grad_b: slot(b_name, out * r)?,
            })
        }
        _ => None,
    };
    if let Some(f) = &lora {
        gemm(
            out,
            f.r,
            inp,
            f.scaling,
            View::rows(&f.b, f.r),
            View::rows(&f.a, inp),
            1.0,
            &mut w,
            inp,
        );
    }
    Ok(Linear {
        out,
        inp,
        w,
        bias,
        lora,
        grad_w,
        grad_bias,
    })
}

impl Weights {
    /// The output head `[vocab, hidden]`: its own, or the embedding it is tied to.
    pub(crate) fn head(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
    }

    /// A copy of `model`'s weights, with gradient slots for the tensors `slots` names; every
    /// name in `slots` must be one of the model's tensors.
    pub(crate) fn read(model: &CausalLm, slots: &Slots) -> Result<Weights> {
        let mut used = 0;
        let lora_on = model.adapter_enabled();
        let embed_name = "model.embed_tokens.weight";
        let embed = values(model.embed(), embed_name)?;
        let grad_embed = slots.offset(embed_name, embed.len())?;
        used += usize::from(grad_embed.is_some());
        let (lm_head, grad_lm_head) = if model.config().tie_word_embeddings {
            (None, grad_embed)
        } else {
            let head = values(model.lm_head(), "lm_head.weight")?;
            let g = slots.offset("lm_head.weight", head.len())?;
            used += usize::from(g.is_some());
            (Some(head), g)
        };
        let final_norm = norm(model.final_norm(), "model.norm.weight", slots, &mut used)?;
        let mut layers = Vec::with_capacity(model.layers().len());
        for (i, block) in model.layers().iter().enumerate() {
            let (n1, n2) = block.norms();
            let input_norm = norm(
                n1,
                &format!("model.layers.{i}.input_layernorm.weight"),
                slots,
                &mut used,
            )?;
            let post_norm = norm(
                n2,
                &format!("model.layers.{i}.post_attention_layernorm.weight"),
                slots,
                &mut used,
            )?;
            let proj = Projection::ALL
                .iter()
                .map(|&p| {
                    let (path, module) = (p.path(i), model.module_path(i, p));
                    linear(
                        block.projection(p),
                        &path,
                        &module,
                        lora_on,
                        slots,
                        &mut used,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            layers.push(Layer {
                input_norm,
                post_norm,
                proj,
            });
        }
        if used != slots.params.len() {
            return Err(Error::ModelInput {
                message: format!(
                    "the fused engine found {used} of the {} trained tensors in the model",
                    slots.params.len()
                ),
            });
        }
        Ok(Weights {
            embed,
            grad_embed,
            lm_head,
            grad_lm_head,
            final_norm,
            layers,
        })
    }
}
