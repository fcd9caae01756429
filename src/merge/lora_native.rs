//! Adapters merged into an adapter ([`LoraMerge`]), never forming an out×in matrix:
//!
//! - `cat`, exact: for module m, `A' = [w₁·s₁·A₁; …; w_T·s_T·A_T]` and `B' = [B₁ … B_T]`, so
//!   that with scaling 1 `B'·A' = Σ w_t·s_t·B_t·A_t` at rank `Σ r_t`. Where PEFT's
//!   `add_weighted_adapter(combination_type="cat")` gives every module the sum of the adapters'
//!   largest ranks (padding with zeros), each module here gets exactly the sum of its own,
//!   recorded in `rank_pattern` (with `alpha_pattern` keeping every scaling at 1);
//! - `svd`: that exact sum truncated to a rank target through a QR of the stacked factors and
//!   the SVD of the small core (as PEFT's `combination_type="svd"`, without its dense SVD);
//! - core space: any standard method (TIES, DARE, CACI, ...) run on each module's core
//!   matrices, the result factored the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rayon::prelude::*;
use serde_json::{json, Map, Value};

use super::calibration::{module_of, Calibration};
use super::core::{merge_in_core_with, truncate, CoreMerged, CpuProducts, Factors, Products};
use super::device::kernels_for;
use super::method::{Confidence, Fallback, Method};
use super::output::{input_record, whole_file, OutputOptions};
use super::parameters::{check_recipe, reads_statistics};
use super::plan::{
    fallback_warning, open_base, open_calibration, recipe_error, recipe_method, resolve,
};
use super::regmean;
use super::saved_tensors::{self, SavedTensor};
use crate::adapter::{Adapter, LoraKind, PEFT_PREFIX};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::recipe::record::{
    FileRecord, InputRecord, MergeRecord, ModuleEntry, RankRecord, RecipeRecord, SavedEntry,
    ToolRecord,
};
use crate::recipe::{
    check_target, layer_index, layer_position, write_output_dir, OutputKind, RankTarget, Recipe,
    Scalar, Source, Space, MERGE_RECORD,
};
use crate::tensor::{from_f32, Digest, Dtype, TensorSpec};

/// Whether a recipe is merged adapter to adapter: `cat`, `svd`, or LoRA output.
pub fn merges_adapters(recipe: &Recipe) -> bool {
    Method::from_name(&recipe.method).is_some_and(Method::adapters_only)
        || recipe.output == OutputKind::Lora
}

/// How the experts' factors become the output's.
#[derive(Debug, Clone, Copy, PartialEq)]
enum LoraMethod {
    /// Concatenated: exact, rank = Σ r_t.
    Cat,
    /// The exact weighted sum truncated by SVD to a rank target.
    Svd(RankTarget),
    /// A standard method run on each module's core-space matrices, then factored to a rank
    /// target.
    Core(Method, RankTarget),
    /// RegMean from the experts' Grams: the experts' `B`s side by side with new `A`s, exact at
    /// rank Σ r_t, or truncated by SVD to a rank target.
    RegMean(Option<RankTarget>),
}

/// Per module, (expert index, share of its update the merge keeps).
pub type RetainedEnergy = BTreeMap<String, Vec<(usize, f64)>>;

/// A checked adapter-to-adapter merge.
#[derive(Debug)]
pub struct LoraMerge {
    recipe: Recipe,
    method: LoraMethod,
    /// The adapters' base, when the recipe names it (the arithmetic never reads it; it checks
    /// the adapters and is what tensors stored whole are merged against).
    base: Option<Checkpoint>,
    /// The base's layer count, for parameters that vary with depth.
    num_layers: Option<usize>,
    adapters: Vec<(String, Adapter)>,
    /// For each adapted base tensor, the experts that adapt it, in recipe order.
    modules: BTreeMap<String, Vec<usize>>,
    /// The tensors some experts store whole (`modules_to_save`), merged as full tensors.
    saved: Vec<SavedTensor>,
    /// Deprecated spellings the recipe uses, and modules merged by a fallback.
    warnings: Vec<String>,
    /// Each expert's calibration statistics (`regmean`, activation-aware `caci`), in recipe
    /// order.
    calibration: Vec<Option<Calibration>>,
    /// Modules without a Gram from every expert that adapts them, merged by the fallback (when
    /// the merge reads statistics).
    fallback: BTreeSet<String>,
    /// What those modules merge by.
    fallback_method: Fallback,
}

/// What an adapter-to-adapter merge wrote.
#[derive(Debug, Clone)]
pub struct LoraSummary {
    /// Modules in the merged adapter.
    pub modules: usize,
    /// Tensors it stores whole (`modules_to_save`), merged as full tensors.
    pub whole_tensors: usize,
    /// The largest rank of a module.
    pub max_rank: usize,
    /// The largest fraction of a module's squared norm the factoring discarded (0 for `cat`).
    pub max_discarded: f64,
    /// Core space: each expert's update's share the merge keeps (mean over its modules).
    pub retained_by_expert: Vec<(String, f64)>,
    /// Core space, methods that elect signs: the mean share of core coordinates in conflict.
    pub mean_sign_conflict: Option<f64>,
    /// Modules whose module-sized products ran on the GPU.
    pub device_modules: usize,
    /// Files written.
    pub files: Vec<String>,
}

impl LoraMerge {
    /// Opens the base and the adapters and checks that they fit together.
    pub fn build(recipe: Recipe) -> Result<LoraMerge> {
        if recipe.output != OutputKind::Lora {
            return Err(recipe_error(
                &recipe,
                format!("`{}` merges LoRA adapters into a LoRA adapter: set `output = \"lora\"` (for a full model, `task_arithmetic` gives the exact weighted sum)", recipe.method),
            ));
        }
        let method = recipe_method(&recipe)?;
        if !method.adapters_only() && recipe.space != Space::Core {
            return Err(recipe_error(
                &recipe,
                format!(
                    "LoRA output of `{}` is merged in core space: set `space = \"core\"`",
                    recipe.method
                ),
            ));
        }
        if method == Method::Fisher {
            return Err(recipe_error(
                &recipe,
                "`fisher` averages full weights by their Fisher: set `output = \"delta\"` or `\"full\"` (an adapter's factors have no shared coordinates to weigh)".to_string(),
            ));
        }
        let mut warnings = check_recipe(&recipe, method)?;
        let calibration = open_calibration(&recipe, method, &mut warnings)?;
        let statistics = reads_statistics(&recipe, method);
        let own_method = method;
        // Without a base the adapters say what it is: the arithmetic reads only their factors.
        let base = open_base(&recipe)?;
        let mut adapters = Vec::with_capacity(recipe.experts.len());
        for (i, expert) in recipe.experts.iter().enumerate() {
            let mut adapter = match &expert.source {
                Source::Dir(dir) if Adapter::is_adapter_dir(dir) => Adapter::open(dir)?,
                Source::Registry(reference) => {
                    super::stored::open_adapter(recipe.registry.as_deref(), reference)?
                }
                other => {
                    return Err(recipe_error(
                        &recipe,
                        format!(
                        "expert {i} (`{other}`) is not a PEFT adapter; `cat` merges adapters only"
                    ),
                    ))
                }
            };
            // A LLaVA adapter names tensors as transformers holds the model in memory; the
            // base checkpoint saves them under other names.
            if let Some(base) = &base {
                adapter.name_tensors_as(|n| base.info(n).is_some());
            }
            adapters.push((expert.source.to_string(), adapter));
        }
        let fifo: BTreeSet<bool> = adapters
            .iter()
            .map(|(_, a)| a.config().fan_in_fan_out)
            .collect();
        if fifo.len() > 1 {
            return Err(recipe_error(
                &recipe,
                "the adapters disagree on `fan_in_fan_out`, so they cannot share one adapter"
                    .to_string(),
            ));
        }
        let shapes = match &base {
            Some(base) => shapes_in_base(base, &adapters)?,
            None => {
                let all: Vec<&Adapter> = adapters.iter().map(|(_, a)| a).collect();
                crate::adapter::module_shapes(&all)?
            }
        };
        let mut modules: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (e, (_, adapter)) in adapters.iter().enumerate() {
            for name in adapter.modules().keys() {
                modules.entry(name.clone()).or_default().push(e);
            }
        }
        for (name, experts) in &modules {
            let kind = |e: usize| adapters[e].1.modules()[name].kind;
            if experts.iter().any(|&e| kind(e) != kind(experts[0])) {
                return Err(recipe_error(
                    &recipe,
                    format!("`{name}` is adapted as a linear layer by one adapter and as an embedding by another"),
                ));
            }
        }
        let (saved, num_layers) = match &base {
            Some(base) => (saved_tensors::collect(base, &adapters)?, base.num_layers()),
            None => {
                refuse_saved_without_base(&adapters)?;
                (Vec::new(), layer_count(&recipe, &adapters)?)
            }
        };
        let largest_rank = adapters
            .iter()
            .flat_map(|(_, a)| a.modules().values().map(|m| m.rank))
            .max()
            .unwrap_or(1);
        let method = match (method, recipe.rank) {
            (Method::Cat, None) => LoraMethod::Cat,
            (Method::Cat, Some(_)) => {
                return Err(recipe_error(
                    &recipe,
                    "`cat` is exact and its rank is the sum of the experts' ranks: drop `rank`, or use `svd` to truncate".to_string(),
                ))
            }
            (Method::Svd, Some(target)) => LoraMethod::Svd(target),
            // PEFT's default: the largest rank among the experts.
            (Method::Svd, None) => LoraMethod::Svd(RankTarget::Fixed(largest_rank)),
            (Method::RegMean, rank) => LoraMethod::RegMean(rank),
            (standard, rank) => {
                LoraMethod::Core(standard, rank.unwrap_or(RankTarget::Fixed(largest_rank)))
            }
        };
        let mut fallback = BTreeSet::new();
        if statistics {
            for (name, experts) in &modules {
                let shape = shapes[name].to_vec();
                let Some(module) = module_of(name, &shape) else {
                    fallback.insert(name.clone());
                    continue;
                };
                let mut all = true;
                for (e, stats) in calibration.iter().enumerate() {
                    if let Some(stats) = stats {
                        stats.check_shapes(&module, &shape)?;
                        all &= stats.has_gram(&module) || !experts.contains(&e);
                    }
                }
                if !all {
                    fallback.insert(name.clone());
                }
            }
        }
        let fallback_method = fallback_of(&recipe, own_method)?;
        if !fallback.is_empty() {
            let names: Vec<String> = fallback.iter().cloned().collect();
            warnings.push(fallback_warning(own_method, fallback_method, &names));
        }
        Ok(LoraMerge {
            recipe,
            method,
            base,
            num_layers,
            adapters,
            modules,
            saved,
            warnings,
            calibration,
            fallback,
            fallback_method,
        })
    }

    /// The weight of expert `e` for base tensor `name` (scalars, filters and layer gradients as
    /// for every method).
    fn weight(&self, e: usize, name: &str) -> Result<f32> {
        let t = layer_position(name, self.num_layers);
        let expert = &self.recipe.experts[e].parameters;
        let value = [expert, &self.recipe.parameters]
            .iter()
            .find_map(|p| p.get("weight").and_then(|v| v.resolve(name, t)));
        match value {
            None => Ok(1.0),
            Some(Scalar::Number(w)) if w.is_finite() => Ok(w as f32),
            Some(other) => Err(Error::Parameter {
                name: "weight".to_string(),
                tensor: name.to_string(),
                message: format!("expected a finite number, found {other:?}"),
            }),
        }
    }

    /// The recipe it was built from.
    pub fn recipe(&self) -> &Recipe {
        &self.recipe
    }

    /// What the recipe should change, though it is read as it is (deprecated spellings).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Number of modules and the largest rank a module can get, for a dry run.
    pub fn shape(&self) -> (usize, usize) {
        let max_rank = self
            .modules
            .iter()
            .map(|(name, experts)| match self.method {
                LoraMethod::Svd(RankTarget::Fixed(k))
                | LoraMethod::Core(_, RankTarget::Fixed(k))
                | LoraMethod::RegMean(Some(RankTarget::Fixed(k))) => {
                    k.min(self.rank(name, experts))
                }
                _ => self.rank(name, experts),
            })
            .max()
            .unwrap_or(0);
        (self.modules.len(), max_rank)
    }

    fn rank(&self, name: &str, experts: &[usize]) -> usize {
        experts
            .iter()
            .map(|&e| self.adapters[e].1.modules()[name].rank)
            .sum()
    }

    /// The experts' factors side by side, `w_t·s_t` folded into each `A_t` as PEFT does:
    /// `A` is `rank × cols`, `B` is `rows × rank`, and `B·A = Σ w_t·s_t·B_t·A_t`.
    fn concatenated(
        &self,
        name: &str,
        experts: &[usize],
        rank: usize,
        a_rows_len: usize,
        b_rows: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut a = Vec::with_capacity(rank * a_rows_len);
        for &e in experts {
            let adapter = &self.adapters[e].1;
            let module = &adapter.modules()[name];
            let factor = self.weight(e, name)? * module.scaling;
            a.extend(
                adapter
                    .file()
                    .read_f32(&module.a_key)?
                    .into_iter()
                    .map(|v| v * factor),
            );
        }
        Ok((a, self.stacked_b(name, experts, rank, b_rows)?))
    }

    /// The experts' `B`s side by side, `b_rows × rank` row-major.
    fn stacked_b(
        &self,
        name: &str,
        experts: &[usize],
        rank: usize,
        b_rows: usize,
    ) -> Result<Vec<f32>> {
        let mut b = vec![0f32; b_rows * rank];
        let mut column = 0;
        for &e in experts {
            let adapter = &self.adapters[e].1;
            let module = &adapter.modules()[name];
            let be = adapter.file().read_f32(&module.b_key)?;
            for (row, src) in b.chunks_exact_mut(rank).zip(be.chunks_exact(module.rank)) {
                row[column..column + module.rank].copy_from_slice(src);
            }
            column += module.rank;
        }
        Ok(b)
    }

    /// A RegMean module: the experts' `B`s side by side with `A`s solved from their Grams
    /// (`λ·w_t·s_t·A_t·G̃_t·M⁻¹`), so that `B·A` is the full-space RegMean update; a module
    /// without a Gram from every adapting expert merges by the fallback (the exact weighted
    /// mean or sum of the updates).
    fn regmean(
        &self,
        name: &str,
        experts: &[usize],
        rank: usize,
        cols: usize,
        rows: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let t = layer_position(name, self.num_layers);
        let labelled: Vec<(&str, &crate::recipe::Parameters)> = self
            .recipe
            .experts
            .iter()
            .zip(&self.adapters)
            .map(|(spec, (label, _))| (label.as_str(), &spec.parameters))
            .collect();
        let params = resolve(&self.recipe, Method::RegMean, &labelled, name, t)?;
        let lambda = params.globals.lambda;
        if self.fallback.contains(name) {
            let (mut a, b) = self.concatenated(name, experts, rank, cols, rows)?;
            // `concatenated` folds each expert's weight in: the sum; the mean divides by Σ w.
            let divisor = match params.globals.fallback {
                Fallback::Linear => experts.iter().map(|&e| params.experts[e].weight).sum(),
                Fallback::TaskArithmetic | Fallback::RmsConfidence => 1.0,
            };
            if divisor == 0.0 {
                return Err(Error::Parameter {
                    name: "weight".to_string(),
                    tensor: name.to_string(),
                    message: "the weights of the experts that adapt it sum to 0".to_string(),
                });
            }
            a.iter_mut().for_each(|v| *v *= lambda / divisor);
            return Ok((a, b));
        }
        let b = self.stacked_b(name, experts, rank, rows)?;
        let module = module_of(name, &[rows, cols]).expect("planned for 2-D weights only");
        // Every expert with a Gram of the module counts, adapting it or not (an expert that
        // leaves the module alone has update zero there: no rows of `A`, but its inputs).
        let mut grams = Vec::new();
        let mut weights = Vec::new();
        let mut blocks: Vec<(Vec<f32>, usize)> = Vec::new();
        for (e, stats) in self.calibration.iter().enumerate() {
            let Some(gram) = stats
                .as_ref()
                .map(|s| s.gram(&module))
                .transpose()?
                .flatten()
            else {
                continue;
            };
            // The expert's `A` with its scaling (RegMean weighs by `w` itself).
            let block = if experts.contains(&e) {
                let adapter = &self.adapters[e].1;
                let m = &adapter.modules()[name];
                let mut values = adapter.file().read_f32(&m.a_key)?;
                values.iter_mut().for_each(|v| *v *= m.scaling);
                (values, m.rank)
            } else {
                (Vec::new(), 0)
            };
            grams.push(gram);
            weights.push(params.experts[e].weight);
            blocks.push(block);
        }
        let gram_refs: Vec<_> = grams.iter().collect();
        let block_refs: Vec<(&[f32], usize)> =
            blocks.iter().map(|(v, r)| (v.as_slice(), *r)).collect();
        let mut solved = regmean::merge_factors(
            name,
            cols,
            &block_refs,
            &gram_refs,
            &weights,
            params.globals.alpha,
            params.globals.ridge,
        )?;
        solved.iter_mut().for_each(|v| *v *= lambda);
        Ok((solved, b))
    }

    /// A module's `A` row length and `B` row count (`A` is `r × k` and `B` is `m × r` whatever
    /// the layout of the base weight).
    fn dims(&self, name: &str, experts: &[usize]) -> (usize, usize) {
        let adapter = &self.adapters[experts[0]].1;
        let module = &adapter.modules()[name];
        let shape = |key: &str| adapter.file().info(key).expect("indexed").shape.clone();
        (shape(&module.a_key)[1], shape(&module.b_key)[0])
    }

    /// Core-space merges: for every module, the share of each adapting expert's update that
    /// the merge keeps, by expert index (computed as the merge computes it, without writing).
    /// `None` for `cat` (exact) and `svd`.
    pub fn retained_energy(&self) -> Result<Option<RetainedEnergy>> {
        let LoraMethod::Core(method, target) = self.method else {
            return Ok(None);
        };
        self.modules
            .par_iter()
            .map(|(name, experts)| {
                let (cols, rows) = self.dims(name, experts);
                let merged =
                    self.core_merge(&CpuProducts, name, experts, method, target, cols, rows)?;
                Ok((
                    name.clone(),
                    experts.iter().copied().zip(merged.retained).collect(),
                ))
            })
            .collect::<Result<_>>()
            .map(Some)
    }

    /// Merges one module: its two output tensors, its path, its rank and the energy the
    /// factoring discarded (`None` for `cat`, which is exact).
    fn merge_module(
        &self,
        products: &dyn Products,
        name: &str,
        experts: &[usize],
        dtype: Dtype,
    ) -> Result<ModuleOutput> {
        let mut tensors = Vec::with_capacity(2);
        let mut lost = None;
        let mut retained = Vec::new();
        let mut sign_conflict = None;
        let rank = self.rank(name, experts);
        let first = &self.adapters[experts[0]].1.modules()[name];
        let (a_rows_len, b_rows) = self.dims(name, experts);
        let (a, b, rank) = match self.method {
            LoraMethod::Core(method, target) => {
                let merged =
                    self.core_merge(products, name, experts, method, target, a_rows_len, b_rows)?;
                lost = Some(merged.factored.discarded);
                retained = experts.iter().copied().zip(merged.retained).collect();
                sign_conflict = merged.sign_conflict;
                (merged.factored.a, merged.factored.b, merged.factored.rank)
            }
            LoraMethod::Cat => {
                let (a, b) = self.concatenated(name, experts, rank, a_rows_len, b_rows)?;
                (a, b, rank)
            }
            LoraMethod::Svd(target) => {
                let (a, b) = self.concatenated(name, experts, rank, a_rows_len, b_rows)?;
                let truncated = truncate(&a, &b, rank, a_rows_len, b_rows, target, name)?;
                lost = Some(truncated.discarded);
                (truncated.a, truncated.b, truncated.rank)
            }
            LoraMethod::RegMean(target) => {
                let (a, b) = self.regmean(name, experts, rank, a_rows_len, b_rows)?;
                match target {
                    None => (a, b, rank),
                    Some(target) => {
                        let truncated = truncate(&a, &b, rank, a_rows_len, b_rows, target, name)?;
                        lost = Some(truncated.discarded);
                        (truncated.a, truncated.b, truncated.rank)
                    }
                }
            }
        };
        // The module as the experts' keys name it (for a LLaVA model, as transformers holds
        // it in memory, which is what PEFT matches), not as the base checkpoint saves it.
        let module_path = module_path(&first.a_key, first.kind).unwrap_or(name);
        let (a_key, b_key) = match first.kind {
            LoraKind::Linear => (
                format!("{PEFT_PREFIX}{module_path}.lora_A.weight"),
                format!("{PEFT_PREFIX}{module_path}.lora_B.weight"),
            ),
            LoraKind::Embedding => (
                format!("{PEFT_PREFIX}{module_path}.lora_embedding_A"),
                format!("{PEFT_PREFIX}{module_path}.lora_embedding_B"),
            ),
        };
        let encode = |values: &[f32]| from_f32(dtype, values).expect("output dtype");
        tensors.push((
            TensorSpec {
                name: a_key,
                dtype,
                shape: vec![rank, a_rows_len],
            },
            encode(&a),
        ));
        tensors.push((
            TensorSpec {
                name: b_key,
                dtype,
                shape: vec![b_rows, rank],
            },
            encode(&b),
        ));
        Ok(ModuleOutput {
            tensors,
            path: module_path.to_string(),
            rank,
            discarded: lost,
            retained,
            sign_conflict,
            fallback: self.fallback.contains(name),
        })
    }

    /// Writes the merged adapter (PEFT layout) and `mmx-merge.json` into `target`; with a CUDA
    /// backend, the module-sized products of core-space merges run on the GPU (cuBLAS).
    pub fn write(&self, target: &Path, options: &OutputOptions) -> Result<LoraSummary> {
        check_target(target, options.force)?;
        let kernels = kernels_for(options.backend)?;
        let products = kernels.products();
        let dtype = match self.recipe.dtype {
            Some(d) => d,
            None => {
                let (_, first) = &self.adapters[0];
                let module = first.modules().values().next();
                match module {
                    Some(m) => first.file().dtype(&m.a_key)?,
                    None => Dtype::F32,
                }
            }
        };
        // Modules are independent: merged in parallel, gathered in order, while the inputs
        // are hashed for the record.
        let ((outputs, saved), inputs) = rayon::join(
            || {
                rayon::join(
                    || {
                        self.modules
                            .par_iter()
                            .map(|(name, experts)| {
                                self.merge_module(products, name, experts, dtype)
                            })
                            .collect::<Result<Vec<ModuleOutput>>>()
                    },
                    || {
                        self.saved
                            .par_iter()
                            .map(|saved| self.merge_saved(saved))
                            .collect::<Result<Vec<_>>>()
                    },
                )
            },
            || self.digests(),
        );
        let (outputs, saved, inputs) = (outputs?, saved?, inputs?);
        let mut tensors = Vec::with_capacity(outputs.len() * 2);
        let mut ranks = BTreeMap::new();
        let mut discarded = BTreeMap::new();
        let mut conflicts = BTreeMap::new();
        let mut fell_back = BTreeSet::new();
        let mut kept_by_expert = vec![(0f64, 0usize); self.adapters.len()];
        for output in outputs {
            let module = format!("{}.weight", output.path);
            if let Some(d) = output.discarded {
                discarded.insert(module.clone(), d);
            }
            for &(e, share) in &output.retained {
                kept_by_expert[e].0 += share;
                kept_by_expert[e].1 += 1;
            }
            let retained: BTreeMap<String, f64> = output
                .retained
                .iter()
                .map(|&(e, share)| (self.adapters[e].0.clone(), share))
                .collect();
            conflicts.insert(module, (output.sign_conflict, retained));
            if output.fallback {
                fell_back.insert(output.path.clone());
            }
            ranks.insert(output.path, output.rank);
            tensors.extend(output.tensors);
        }
        let mut whole = Vec::with_capacity(saved.len());
        for (output, tensor) in saved.into_iter().zip(&self.saved) {
            let experts: Vec<String> = tensor
                .experts
                .iter()
                .map(|&e| self.adapters[e].0.clone())
                .collect();
            whole.push(SavedEntry {
                tensor: tensor.name.clone(),
                key: tensor.key.clone(),
                experts,
                base_blake3: output.base_blake3,
            });
            tensors.push(output.tensor);
        }
        let retained_by_expert: Vec<(String, f64)> = kept_by_expert
            .iter()
            .zip(&self.adapters)
            .filter(|((_, count), _)| *count > 0)
            .map(|((sum, count), (label, _))| (label.clone(), sum / *count as f64))
            .collect();
        let conflict_values: Vec<f64> = conflicts
            .values()
            .filter_map(|(c, _)| c.map(f64::from))
            .collect();
        let mean_sign_conflict = (!conflict_values.is_empty())
            .then(|| conflict_values.iter().sum::<f64>() / conflict_values.len() as f64);

        // Only core-space merges have products to run on a device.
        let device = if matches!(self.method, LoraMethod::Core(..)) {
            kernels.device()
        } else {
            "cpu"
        };
        let modules = ranks
            .iter()
            .map(|(m, &rank)| {
                let module = format!("{m}.weight");
                let (sign_conflict, retained_energy) =
                    conflicts.remove(&module).unwrap_or_default();
                ModuleEntry {
                    module: m.clone(),
                    rank,
                    discarded_energy: discarded.get(&module).copied(),
                    sign_conflict,
                    retained_energy,
                    device: Some(device.to_string()),
                    fallback: fell_back
                        .contains(m)
                        .then(|| self.fallback_method.method_name().to_string()),
                }
            })
            .collect();
        let recipe = &self.recipe;
        let mut record = MergeRecord {
            tool: ToolRecord::this(),
            recipe: RecipeRecord {
                path: recipe.path.clone(),
                format: Some(recipe.format.record_name().to_string()),
                text: recipe.text.clone(),
            },
            method: recipe.method.clone(),
            output: OutputKind::Lora,
            space: Some(
                if matches!(self.method, LoraMethod::Core(..)) {
                    "core"
                } else {
                    "factors"
                }
                .to_string(),
            ),
            rank: Some(match self.method {
                LoraMethod::Cat => RankRecord::Text("sum of the experts' ranks".to_string()),
                LoraMethod::RegMean(None) => {
                    RankRecord::Text("sum of the experts' ranks".to_string())
                }
                LoraMethod::Svd(RankTarget::Fixed(k))
                | LoraMethod::Core(_, RankTarget::Fixed(k))
                | LoraMethod::RegMean(Some(RankTarget::Fixed(k))) => RankRecord::Fixed(k),
                LoraMethod::Svd(RankTarget::Energy(e))
                | LoraMethod::Core(_, RankTarget::Energy(e))
                | LoraMethod::RegMean(Some(RankTarget::Energy(e))) => {
                    RankRecord::Text(format!("energy:{e}"))
                }
            }),
            dtype: recipe.dtype.map(|d| d.name().to_string()),
            seed: Some(recipe.seed),
            inputs,
            files: vec![
                "adapter_config.json".to_string(),
                "adapter_model.safetensors".to_string(),
                MERGE_RECORD.to_string(),
            ],
            tensors: Vec::new(),
            modules,
            modules_to_save: Some(whole),
        };
        let config = self.config(&ranks);
        let files = write_output_dir(target, options.force, |tmp| {
            Adapter::save(tmp, &config, &tensors)?;
            record.write(tmp)?;
            Ok(std::mem::take(&mut record.files))
        })?;
        Ok(LoraSummary {
            modules: ranks.len(),
            whole_tensors: self.saved.len(),
            max_rank: ranks.values().copied().max().unwrap_or(0),
            max_discarded: discarded.values().copied().fold(0.0, f64::max),
            retained_by_expert,
            mean_sign_conflict,
            device_modules: if device == "cpu" { 0 } else { ranks.len() },
            files,
        })
    }

    /// Merges one tensor the experts store whole, by the recipe's method in full space (`cat`
    /// and `svd`: the exact weighted sum).
    fn merge_saved(&self, saved: &SavedTensor) -> Result<saved_tensors::SavedOutput> {
        let method = match self.method {
            LoraMethod::Core(method, _) => method,
            LoraMethod::Cat | LoraMethod::Svd(_) | LoraMethod::RegMean(_) => Method::TaskArithmetic,
        };
        saved_tensors::merge(
            &self.recipe,
            method,
            self.base
                .as_ref()
                .expect("tensors stored whole are collected against the base"),
            &self.adapters,
            saved,
            self.recipe.dtype,
        )
    }

    /// Runs a standard method on the core-space matrices of one module and factors the result
    /// (see [`super::core`]).
    #[allow(clippy::too_many_arguments)]
    fn core_merge(
        &self,
        products: &dyn Products,
        name: &str,
        experts: &[usize],
        method: Method,
        target: RankTarget,
        cols: usize,
        rows: usize,
    ) -> Result<CoreMerged> {
        let mut read = Vec::with_capacity(experts.len());
        for &e in experts {
            let adapter = &self.adapters[e].1;
            let module = &adapter.modules()[name];
            read.push((
                adapter.file().read_f32(&module.b_key)?,
                adapter.file().read_f32(&module.a_key)?,
                module.rank,
                module.scaling,
            ));
        }
        let factors: Vec<Factors<'_>> = read
            .iter()
            .map(|(b, a, rank, scale)| Factors {
                b,
                a,
                rank: *rank,
                scale: *scale,
            })
            .collect();
        // Parameters as for the full tensor: filters and gradients see the module's name.
        let t = layer_position(name, self.num_layers);
        let labelled: Vec<(&str, &crate::recipe::Parameters)> = experts
            .iter()
            .map(|&e| {
                (
                    self.adapters[e].0.as_str(),
                    &self.recipe.experts[e].parameters,
                )
            })
            .collect();
        let mut params = resolve(&self.recipe, method, &labelled, name, t)?;
        // Activation-aware CACI scores core coordinates by the experts' own inputs; a module
        // without them merges by weight-only CACI.
        let mut grams = None;
        if method == Method::Caci && params.globals.confidence == Confidence::Activation {
            if self.fallback.contains(name) {
                params.globals.confidence = Confidence::Rms;
            } else {
                let module = module_of(name, &[rows, cols]).expect("2-D weights only");
                let mut read = Vec::with_capacity(experts.len());
                for &e in experts {
                    let stats = self.calibration[e].as_ref().expect("opened when built");
                    read.push(stats.gram(&module)?.expect("checked when built"));
                }
                grams = Some(read);
            }
        }
        merge_in_core_with(
            products,
            name,
            (rows, cols),
            &factors,
            method,
            &params.globals,
            params.experts,
            experts.to_vec(),
            target,
            grams.as_deref(),
        )
    }

    /// The merged adapter's config: the first adapter's, with the ranks of the merge, every
    /// scaling 1 (alpha = rank), the experts' own `target_modules` where they all give the same
    /// (a LLaVA adapter's regex keeps LoRA off the vision tower's projections of the same
    /// names), else the union of the module types, and the union of `modules_to_save`.
    fn config(&self, ranks: &BTreeMap<String, usize>) -> Map<String, Value> {
        let mut config = self.adapters[0].1.config().raw.clone();
        let r = ranks.values().copied().max().unwrap_or(1);
        let pattern = |value: &dyn Fn(usize) -> Value| -> Map<String, Value> {
            ranks
                .iter()
                .filter(|(_, &rank)| rank != r)
                .map(|(module, &rank)| (regex::escape(module), value(rank)))
                .collect()
        };
        let targets: BTreeSet<&str> = ranks
            .keys()
            .map(|m| m.rsplit('.').next().unwrap_or(m))
            .collect();
        config.insert("r".into(), json!(r));
        config.insert("lora_alpha".into(), json!(r));
        config.insert("rank_pattern".into(), Value::Object(pattern(&|k| json!(k))));
        config.insert(
            "alpha_pattern".into(),
            Value::Object(pattern(&|k| json!(k))),
        );
        config.insert("use_rslora".into(), json!(false));
        let first_targets = &self.adapters[0].1.config().raw.get("target_modules");
        let shared = self
            .adapters
            .iter()
            .all(|(_, a)| &a.config().raw.get("target_modules") == first_targets);
        match first_targets {
            Some(targets) if shared => config.insert("target_modules".into(), (*targets).clone()),
            _ => config.insert("target_modules".into(), json!(targets)),
        };
        let saved: BTreeSet<&String> = self
            .adapters
            .iter()
            .flat_map(|(_, a)| &a.config().modules_to_save)
            .collect();
        config.insert(
            "modules_to_save".into(),
            if self.saved.is_empty() {
                Value::Null
            } else {
                json!(saved)
            },
        );
        config
    }

    /// Digests of the inputs for `mmx-merge.json`: every file the merge reads whole. The base's
    /// weights are read only where experts store a tensor whole (recorded by that tensor's
    /// digest under `modules_to_save`), so its safetensors files are recorded by size and by
    /// the digest of their header, rather than hashed whole.
    fn digests(&self) -> Result<Vec<InputRecord>> {
        let mut inputs = Vec::new();
        if let Some(base) = &self.base {
            let role = format!("base:{}", base.dir().display());
            match base.origin() {
                Some(manifest) => {
                    inputs.push(input_record(role, Vec::new(), vec![manifest.into()]))
                }
                None => {
                    let config = base.dir().join("config.json");
                    let mut files = vec![whole_file(&config)?];
                    for shard in base.shards() {
                        let file = shard.path();
                        let bytes = std::fs::metadata(file)
                            .map_err(|e| Error::io(file, e))?
                            .len();
                        // The header as the open file holds it: names, dtypes, shapes, offsets.
                        let header = Digest::of(shard.header_bytes()).hex();
                        files.push(FileRecord {
                            path: file.display().to_string(),
                            bytes: Some(bytes),
                            blake3: None,
                            header_blake3: Some(header),
                        });
                    }
                    inputs.push(input_record(role, files, Vec::new()));
                }
            }
        }
        for (label, adapter) in &self.adapters {
            let role = format!("expert:{label}");
            if let Some(manifest) = adapter.origin() {
                inputs.push(input_record(role, Vec::new(), vec![manifest.into()]));
                continue;
            }
            let files = [
                adapter.dir().join("adapter_config.json"),
                adapter.file().path().to_path_buf(),
            ]
            .iter()
            .map(|f| whole_file(f))
            .collect::<Result<Vec<_>>>()?;
            inputs.push(input_record(role, files, Vec::new()));
        }
        Ok(inputs)
    }
}

/// The shape of every module the adapters update, each adapter checked against the base.
fn shapes_in_base(
    base: &Checkpoint,
    adapters: &[(String, Adapter)],
) -> Result<BTreeMap<String, [usize; 2]>> {
    let mut shapes = BTreeMap::new();
    for (_, adapter) in adapters {
        super::expert::check_fits(adapter, base)?;
        for (name, module) in adapter.modules() {
            shapes.insert(name.clone(), module.target_shape);
        }
    }
    Ok(shapes)
}

/// A tensor an adapter stores whole (`modules_to_save`) is merged as a task vector against the
/// base's, so a merge without a base cannot take it.
fn refuse_saved_without_base(adapters: &[(String, Adapter)]) -> Result<()> {
    match adapters
        .iter()
        .find_map(|(_, a)| a.saved_tensors().keys().next().map(|name| (a, name)))
    {
        Some((adapter, name)) => Err(Error::Adapter {
            path: adapter.dir().to_path_buf(),
            message: format!(
                "stores `{name}` whole (`modules_to_save`), which is merged against the base's: set `base` to the adapters' base model"
            ),
        }),
        None => Ok(()),
    }
}

/// Without a base, its layer count as the adapters show it: one past the deepest layer they
/// adapt. An adapter limited to some layers (`layers_to_transform`) does not show it; then only
/// a recipe whose parameters are the same at every depth can do without it.
fn layer_count(recipe: &Recipe, adapters: &[(String, Adapter)]) -> Result<Option<usize>> {
    let partial = adapters.iter().find(|(_, a)| {
        a.config()
            .raw
            .get("layers_to_transform")
            .is_some_and(|v| !v.is_null())
    });
    let Some((label, _)) = partial else {
        let deepest = adapters
            .iter()
            .flat_map(|(_, a)| a.modules().keys())
            .filter_map(|name| layer_index(name))
            .max();
        return Ok(deepest.map(|d| d + 1));
    };
    let by_depth = std::iter::once(&recipe.parameters)
        .chain(recipe.experts.iter().map(|e| &e.parameters))
        .flat_map(|p| p.iter())
        .find(|(_, v)| v.varies_with_depth());
    match by_depth {
        Some((parameter, _)) => Err(recipe_error(
            recipe,
            format!(
                "`{parameter}` changes with depth, but `{label}` adapts only some layers (`layers_to_transform`), so the model's layer count is unknown: set `base` to the adapters' base model"
            ),
        )),
        None => Ok(None),
    }
}

/// One module of the output.
struct ModuleOutput {
    tensors: Vec<(TensorSpec, Vec<u8>)>,
    path: String,
    rank: usize,
    discarded: Option<f64>,
    /// (expert index, share of its update kept) for core-space merges.
    retained: Vec<(usize, f64)>,
    sign_conflict: Option<f32>,
    /// Merged by the fallback of a data-aware method (no statistics for it).
    fallback: bool,
}

/// The module path a LoRA factor's key names (`base_model.model.<path>.lora_A.weight`).
fn module_path(a_key: &str, kind: LoraKind) -> Option<&str> {
    let suffix = match kind {
        LoraKind::Linear => ".lora_A.weight",
        LoraKind::Embedding => ".lora_embedding_A",
    };
    a_key.strip_prefix(PEFT_PREFIX)?.strip_suffix(suffix)
}

/// What the modules of a merge by `method` without statistics merge by.
fn fallback_of(recipe: &Recipe, method: Method) -> Result<Fallback> {
    Ok(if method == Method::Caci {
        Fallback::RmsConfidence
    } else {
        resolve(recipe, method, &[], "", 0.0)?.globals.fallback
    })
}
