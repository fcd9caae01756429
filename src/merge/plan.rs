//! A [`Plan`]: every output tensor with its resolved parameters, built and checked before any
//! arithmetic, so that a bad recipe or a mismatched input fails before anything is written.

use std::path::Path;

use super::calibration::{module_of, Calibration};
use super::chunking::{is_streamed, working_bytes};
use super::expert::Expert;
use super::method::{Confidence, ExpertParams, Fallback, GlobalParams, Method};
use super::parameters::{
    check_params_named, check_recipe, parameters_of, reads_statistics, set_expert, set_global,
    spelled, Scope,
};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::recipe::{
    layer_position, CalibrationSpec, OutputKind, Parameters, Recipe, Scalar, Source, Space,
};
use crate::tensor::Dtype;

/// What happens to one output tensor.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    /// The tensor name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its dtype in the output.
    pub dtype: Dtype,
    /// Merge parameters; `None` when no expert changes it and it is copied from the base.
    pub merge: Option<MergeParams>,
    /// Bytes of memory its computation needs at peak (inputs, working copies, output).
    pub working_bytes: u64,
    /// Merged chunk by chunk (large 2-D tensors; CACI's confidence and conflict terms are
    /// not streamed yet, so it merges in memory).
    pub streamed: bool,
}

/// The parameters one tensor is merged with.
#[derive(Debug, Clone)]
pub struct MergeParams {
    /// The method that merges it: the recipe's, or for a data-aware method's tensor without
    /// statistics, the one its fallback names (see [`MergeParams::fallback`]).
    pub method: Method,
    /// Set when a data-aware method's tensor has no statistics and merges by this fallback.
    pub fallback: Option<Fallback>,
    /// Method-wide parameters.
    pub globals: GlobalParams,
    /// Per-expert parameters, in recipe order.
    pub experts: Vec<ExpertParams>,
}

impl MergeParams {
    /// Whether this tensor's merge reads the experts' calibration statistics.
    pub fn reads_statistics(&self) -> bool {
        self.method.data_aware()
            || (self.method == Method::Caci && self.globals.confidence == Confidence::Activation)
    }
}

/// A checked merge, ready to execute.
#[derive(Debug)]
pub struct Plan {
    /// The recipe it comes from.
    pub recipe: Recipe,
    /// The method.
    pub method: Method,
    /// The base model.
    pub base: Option<Checkpoint>,
    /// The experts, in recipe order.
    pub experts: Vec<Expert>,
    /// Output tensors, in output order.
    pub tensors: Vec<TensorPlan>,
    /// What the recipe should change, though it is read as it is (deprecated spellings,
    /// tensors a data-aware method merges by its fallback).
    pub warnings: Vec<String>,
    /// Each expert's calibration statistics, in recipe order (data-aware methods).
    pub calibration: Vec<Option<Calibration>>,
}

/// An error about the recipe as a whole.
pub(crate) fn recipe_error(recipe: &Recipe, message: String) -> Error {
    Error::Recipe {
        path: recipe.path.clone(),
        message,
    }
}

/// The recipe's method, or an error listing the known ones.
pub(crate) fn recipe_method(recipe: &Recipe) -> Result<Method> {
    Method::from_name(&recipe.method).ok_or_else(|| {
        let known: Vec<&str> = Method::all().iter().map(|m| m.name()).collect();
        recipe_error(
            recipe,
            format!(
                "unknown merge method `{}` (known: {})",
                recipe.method,
                known.join(", ")
            ),
        )
    })
}

impl Plan {
    /// Opens every input, checks them against each other and resolves every parameter for
    /// every tensor.
    pub fn build(recipe: Recipe) -> Result<Plan> {
        let method = recipe_method(&recipe)?;
        if method.adapters_only() {
            return Err(recipe_error(
                &recipe,
                format!("`{}` merges LoRA adapters into a LoRA adapter: set `output = \"lora\"` (for a full model, `task_arithmetic` gives the exact weighted sum)", method.name()),
            ));
        }
        if recipe.space == Space::Core {
            return Err(recipe_error(
                &recipe,
                "core-space merging writes a LoRA adapter: set `output = \"lora\"`".to_string(),
            ));
        }
        let mut warnings = check_recipe(&recipe, method)?;
        let calibration = open_calibration(&recipe, method, &mut warnings)?;
        let base = open_base(&recipe)?;
        if base.is_none() && method.needs_base() {
            return Err(recipe_error(
                &recipe,
                format!("method `{}` needs a base model", method.name()),
            ));
        }
        if base.is_none() && recipe.output == OutputKind::Delta {
            return Err(recipe_error(
                &recipe,
                "delta output needs a base model".to_string(),
            ));
        }
        let mut experts = recipe
            .experts
            .iter()
            .enumerate()
            .map(|(i, e)| {
                // `base+lora` is the adapter on the base: opened as such, the tensors it leaves
                // alone are copied instead of merged.
                let source = match (&e.source, &base) {
                    (Source::WithLora { model, lora }, Some(b)) if same_dir(model, b.dir()) => {
                        Source::Dir(lora.clone())
                    }
                    _ => e.source.clone(),
                };
                let mut expert =
                    Expert::open(i, &source, e.parameters.clone(), recipe.registry.as_deref())?;
                expert.label = e.source.to_string();
                Ok(expert)
            })
            .collect::<Result<Vec<_>>>()?;
        // Adapters of a LLaVA model name its tensors as transformers holds it in memory; a
        // checkpoint saves them under other names.
        if let Some(b) = &base {
            for e in experts.iter_mut().filter(|e| e.model().is_none()) {
                if let Some(a) = e.adapter_mut() {
                    a.name_tensors_as(|n| b.info(n).is_some());
                }
            }
        }

        let reference = match &base {
            Some(b) => b,
            None => experts.iter().find_map(|e| e.model()).ok_or_else(|| {
                recipe_error(
                    &recipe,
                    "LoRA adapter experts need a base model (`base`/`base_model`)".to_string(),
                )
            })?,
        };
        for e in &experts {
            check_compatible(reference, e, base.is_some())?;
        }

        let num_layers = reference.num_layers();
        let mut tensors = Vec::new();
        let mut fell_back = Vec::new();
        for name in reference.names() {
            let info = reference
                .info(name)
                .expect("name comes from the checkpoint");
            let touched = experts.iter().filter(|e| e.touches(name)).count();
            let dtype = recipe.dtype.unwrap_or(info.dtype);
            let numel = info.numel() as u64;
            let mergeable = info.dtype.is_float() && (touched > 0 || base.is_none());
            if !mergeable && recipe.output == OutputKind::Delta {
                continue;
            }
            // Integer buffers keep their dtype; only float tensors take the output dtype.
            let dtype = if info.dtype.is_float() {
                dtype
            } else {
                info.dtype
            };
            let merge = if mergeable {
                let t = layer_position(name, num_layers);
                let labelled: Vec<(&str, &Parameters)> = experts
                    .iter()
                    .map(|e| (e.label.as_str(), &e.parameters))
                    .collect();
                let params = resolve(&recipe, method, &labelled, name, t)?;
                if !params.reads_statistics()
                    || has_statistics(method, &experts, &calibration, name, &info.shape)?
                {
                    Some(params)
                } else {
                    fell_back.push(name.to_string());
                    Some(resolve_fallback(params, &recipe, &labelled, name, t)?)
                }
            } else {
                None
            };
            let data_aware = merge.as_ref().is_some_and(MergeParams::reads_statistics);
            let streamed = merge.is_some() && is_streamed(&info.shape) && !data_aware;
            let working_bytes = if streamed {
                // A few chunk buffers per expert; CACI's restore keeps each update both
                // untrimmed and trimmed, with the base's and the merged chunk.
                let restores = merge.as_ref().is_some_and(|m| m.globals.restore.is_some());
                let n = experts.len();
                working_bytes(if restores { 2 * n + 2 } else { n + 4 })
            } else if merge.is_some() {
                // A data-aware merge also holds the experts' in × in matrices and the system's,
                // in f64.
                let side = if data_aware { info.shape[1] as u64 } else { 0 };
                numel * 4 * (experts.len() as u64 + 3)
                    + numel * dtype.size() as u64
                    + side * side * 8 * (experts.len() as u64 + 2)
            } else {
                numel * (info.dtype.size() + dtype.size()) as u64
            };
            tensors.push(TensorPlan {
                name: name.to_string(),
                shape: info.shape.clone(),
                dtype,
                merge,
                working_bytes,
                streamed,
            });
        }
        if !fell_back.is_empty() {
            let fallback = tensors
                .iter()
                .find_map(|t| t.merge.as_ref().and_then(|m| m.fallback))
                .expect("a tensor fell back");
            warnings.push(fallback_warning(method, fallback, &fell_back));
        }
        Ok(Plan {
            recipe,
            method,
            base,
            experts,
            tensors,
            warnings,
            calibration,
        })
    }

    /// The checkpoint whose tensor names and shapes the output follows.
    pub fn reference(&self) -> &Checkpoint {
        self.base
            .as_ref()
            .or_else(|| self.experts.iter().find_map(|e| e.model()))
            .expect("a plan always has a reference checkpoint")
    }

    /// Bytes of tensor data the output will hold.
    pub fn output_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.shape.iter().product::<usize>() as u64 * t.dtype.size() as u64)
            .sum()
    }

    /// The most memory one tensor's computation needs.
    pub fn peak_tensor_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.working_bytes)
            .max()
            .unwrap_or(0)
    }

    /// About the most memory the merge takes at once with `threads` workers under
    /// `max_memory`: as many tensors in flight as the budget admits, but at least the largest.
    pub fn memory_estimate(&self, max_memory: u64, threads: usize) -> u64 {
        let mut sizes: Vec<u64> = self.tensors.iter().map(|t| t.working_bytes).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let in_flight: u64 = sizes.iter().take(threads).sum();
        in_flight.min(max_memory).max(self.peak_tensor_bytes())
    }
}

/// The recipe's base model, if it names one: a directory or a registry reference (a
/// `model+lora` base is refused).
pub(super) fn open_base(recipe: &Recipe) -> Result<Option<Checkpoint>> {
    match &recipe.base {
        Some(Source::Dir(dir)) => Ok(Some(Checkpoint::open(dir)?)),
        Some(Source::Registry(reference)) => Ok(Some(super::stored::open_model(
            recipe.registry.as_deref(),
            reference,
        )?)),
        Some(Source::WithLora { .. }) => Err(recipe_error(
            recipe,
            "a `model+lora` base is not supported; merge the adapter into the model first or list it as an expert".to_string(),
        )),
        None => Ok(None),
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Checks that an expert fits the reference model: same architecture, every tensor present with
/// the same shape, every adapter module aimed at an existing tensor of the right shape.
fn check_compatible(reference: &Checkpoint, expert: &Expert, has_base: bool) -> Result<()> {
    if let Some(model) = expert.model() {
        if model.architecture() != reference.architecture() {
            let show = |c: &Checkpoint| {
                let (a, t) = c.architecture();
                format!("`{}` ({})", a.unwrap_or("?"), t.unwrap_or("?"))
            };
            return Err(Error::Checkpoint {
                path: model.dir().to_path_buf(),
                message: format!(
                    "is a {} model but `{}` is a {} model: checkpoints of different architectures cannot be merged",
                    show(model),
                    reference.dir().display(),
                    show(reference)
                ),
            });
        }
        for name in reference.names() {
            let want = reference.info(name).expect("listed");
            let got = model.info(name).ok_or_else(|| Error::MissingTensor {
                path: model.dir().to_path_buf(),
                tensor: name.to_string(),
            })?;
            if got.shape != want.shape {
                return Err(Error::ShapeMismatch {
                    path: model.dir().to_path_buf(),
                    tensor: name.to_string(),
                    expected: want.shape.clone(),
                    actual: got.shape.clone(),
                });
            }
            if want.dtype.is_float() && !got.dtype.is_float() {
                return Err(Error::Dtype {
                    path: model.dir().to_path_buf(),
                    tensor: name.to_string(),
                    dtype: got.dtype.to_string(),
                    reason: format!("but the base has {}", want.dtype),
                });
            }
        }
    }
    if let Some(adapter) = expert.adapter() {
        if expert.model().is_none() && !has_base {
            return Err(Error::Adapter {
                path: adapter.dir().to_path_buf(),
                message: "an adapter expert needs a base model to apply to".to_string(),
            });
        }
        let target = expert.model().unwrap_or(reference);
        super::expert::check_fits(adapter, target)?;
    }
    Ok(())
}

fn lookup(levels: &[&Parameters], name: &str, tensor: &str, t: f64) -> Option<Scalar> {
    levels
        .iter()
        .find_map(|p| p.get(name).and_then(|v| v.resolve(tensor, t)))
}

/// Resolves the method-wide and per-expert parameters for one tensor and checks their ranges.
/// `experts` are (label, own parameters) in recipe order.
pub(crate) fn resolve(
    recipe: &Recipe,
    method: Method,
    experts: &[(&str, &Parameters)],
    tensor: &str,
    t: f64,
) -> Result<MergeParams> {
    let mut globals = method.default_globals();
    globals.seed = recipe.seed;
    let top = [&recipe.parameters];
    for p in parameters_of(method, Scope::Method) {
        if let Some(v) = lookup(&top, spelled(p, recipe), tensor, t) {
            set_global(&mut globals, p.name, &v);
        }
    }
    let mut per_expert = Vec::with_capacity(experts.len());
    for &(_, parameters) in experts {
        let mut e = method.default_expert();
        let levels = [parameters, &recipe.parameters];
        for p in parameters_of(method, Scope::Expert) {
            if let Some(v) = lookup(&levels, p.name, tensor, t) {
                set_expert(&mut e, p.name, &v);
            }
        }
        per_expert.push(e);
    }
    check_params_named(method, &globals, tensor, &per_expert, &|i| {
        format!("expert `{}`: ", experts[i].0)
    })?;
    Ok(MergeParams {
        method,
        fallback: None,
        globals,
        experts: per_expert,
    })
}

/// The parameters of a tensor a data-aware method has no statistics for, from its `own`: its
/// fallback's, with the recipe's `lambda` and weights (`linear`: the weighted mean of the
/// updates).
fn resolve_fallback(
    mut own: MergeParams,
    recipe: &Recipe,
    experts: &[(&str, &Parameters)],
    tensor: &str,
    t: f64,
) -> Result<MergeParams> {
    if own.method == Method::Caci {
        own.globals.confidence = Confidence::Rms;
        own.fallback = Some(Fallback::RmsConfidence);
        return Ok(own);
    }
    let fallback = own.globals.fallback;
    let mut params = resolve(recipe, Method::TaskArithmetic, experts, tensor, t)?;
    params.globals.lambda = own.globals.lambda;
    params.globals.normalize = fallback == Fallback::Linear;
    params.fallback = Some(fallback);
    Ok(params)
}

/// Opens each expert's calibration statistics for a data-aware method (every expert needs
/// them); for any other method a `calibration` is not read, which `warnings` says.
pub(crate) fn open_calibration(
    recipe: &Recipe,
    method: Method,
    warnings: &mut Vec<String>,
) -> Result<Vec<Option<Calibration>>> {
    recipe
        .experts
        .iter()
        .enumerate()
        .map(|(i, e)| match (&e.calibration, reads_statistics(recipe, method)) {
            (Some(CalibrationSpec::File(path)), true) => Calibration::open(path).map(Some),
            (Some(CalibrationSpec::Cases { .. }), true) => Err(recipe_error(
                recipe,
                format!(
                    "expert {i} (`{}`): `calibration = {{ data = ... }}` is measured before the merge is planned: `mmx merge` does it, or make the file with `mmx calibrate` and name it",
                    e.source
                ),
            )),
            (None, true) => Err(recipe_error(
                recipe,
                format!(
                    "method `{}` (as this recipe sets it) reads each expert's calibration statistics, and expert {i} (`{}`) has no `calibration = \"STATS.safetensors\"` (made by `mmx calibrate`)",
                    method.name(),
                    e.source
                ),
            )),
            (Some(_), false) => {
                warnings.push(format!(
                    "expert {i} (`{}`): `calibration` is read only by regmean, fisher and caci with confidence \"activation\", not by `{}` here",
                    e.source,
                    method.name()
                ));
                Ok(None)
            }
            (None, false) => Ok(None),
        })
        .collect()
}

/// Whether every expert that changes tensor `name` has the statistics `method` reads for its
/// module (a Gram for `regmean`, a Fisher for `fisher`), checked against the tensor's shape.
fn has_statistics(
    method: Method,
    experts: &[Expert],
    calibration: &[Option<Calibration>],
    name: &str,
    shape: &[usize],
) -> Result<bool> {
    let Some(module) = module_of(name, shape) else {
        return Ok(false);
    };
    let mut all = true;
    for (e, stats) in experts.iter().zip(calibration) {
        let Some(stats) = stats else {
            continue;
        };
        stats.check_shapes(&module, shape)?;
        let has = match method {
            Method::Fisher => stats.has_fisher(&module),
            _ => stats.has_gram(&module),
        };
        all &= has || !e.touches(name);
    }
    Ok(all)
}

/// One line naming how many tensors merge by the fallback, and the first few.
pub(crate) fn fallback_warning(method: Method, fallback: Fallback, tensors: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut shown = tensors[..tensors.len().min(SHOWN)].join("`, `");
    if tensors.len() > SHOWN {
        shown.push_str(&format!("` and {} more", tensors.len() - SHOWN));
    } else {
        shown.push('`');
    }
    format!(
        "{} tensors have no `{}` statistics from every expert that changes them and merge by the fallback `{}`: `{shown}",
        tensors.len(),
        method.name(),
        fallback.method_name()
    )
}

/// What a merge reads, per input (base first, then experts in order): its role, the files it
/// reads from disk and the registry manifests it reads, for digests.
pub fn input_files(plan: &Plan) -> Vec<(String, Vec<std::path::PathBuf>, Vec<String>)> {
    let mut out = Vec::new();
    if let Some(b) = &plan.base {
        let role = format!("base:{}", b.dir().display());
        match b.origin() {
            Some(manifest) => out.push((role, Vec::new(), vec![manifest.to_string()])),
            None => {
                let mut files = vec![b.dir().join("config.json")];
                files.extend(b.files().into_iter().map(Path::to_path_buf));
                out.push((role, files, Vec::new()));
            }
        }
    }
    for (e, stats) in plan.experts.iter().zip(&plan.calibration) {
        out.push((format!("expert:{}", e.label), e.files(), e.manifests()));
        if let Some(stats) = stats {
            let role = format!("calibration:{}", e.label);
            out.push((role, vec![stats.path().to_path_buf()], Vec::new()));
        }
    }
    out
}
