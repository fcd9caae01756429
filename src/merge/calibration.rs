//! Calibration statistics: what each linear module of an expert sees on the expert's own data,
//! for the data-aware methods (`regmean`, `fisher`).
//!
//! The file is safetensors, one group of tensors per module, where `<module>` is the module's
//! weight name in the base model without `.weight` (`model.layers.0.mlp.down_proj`):
//!
//! | tensor | dtype | shape | what |
//! |---|---|---|---|
//! | `<module>.gram` | f32 | [in, in] | `Σ x·xᵀ` over the calibration tokens' inputs `x` to the module |
//! | `<module>.tokens` | f32, f64, i32 or i64 | [1] or [] | how many tokens the Gram sums |
//! | `<module>.fisher` | f32 | the weight's shape | the diagonal Fisher: mean squared gradient of the expert's loss |
//! | `<module>.fisher_A`, `<module>.fisher_B` | f32 | the LoRA factors' shapes | the same for an adapter's factors |
//!
//! Any of the groups may be absent for a module. A Gram needs its token count, since the methods
//! use the mean `G / tokens` (so that an expert calibrated on more tokens does not count for
//! more). Opening a file checks names, dtypes and shapes from the header; a Gram's values
//! (finite, symmetric, non-negative diagonal) and a Fisher's (finite, non-negative) are checked
//! when they are read, before anything is written.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::tensor::{from_f32, write_safetensors, Dtype, SafetensorsFile, TensorSpec};

/// The suffixes a statistics tensor may have.
const KINDS: [&str; 5] = ["gram", "tokens", "fisher", "fisher_A", "fisher_B"];

/// One expert's statistics file, opened and checked against itself.
#[derive(Debug)]
pub struct Calibration {
    file: SafetensorsFile,
    /// Per module: the Gram's side and the token count.
    grams: BTreeMap<String, (usize, f64)>,
    /// Modules with a full-weight Fisher, with its shape.
    fishers: BTreeMap<String, Vec<usize>>,
}

/// A module's mean input second moment `G / tokens`, symmetric (to the rounding of the f32 sums
/// it was read from), in f64, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Gram {
    /// The side: the module's input features.
    pub dim: usize,
    /// `dim × dim` values.
    pub values: Vec<f64>,
}

impl Gram {
    /// The values as a matrix, without a copy: symmetric, so the row-major values read as
    /// column-major.
    pub fn matrix(&self) -> faer::MatRef<'_, f64> {
        faer::MatRef::from_column_major_slice(&self.values, self.dim, self.dim)
    }
}

/// A module's statistics, to write.
#[derive(Debug, Clone, Default)]
pub struct ModuleStats {
    /// `Σ x·xᵀ`, `in × in` row-major, with the token count it sums over.
    pub gram: Option<(Vec<f32>, usize, u64)>,
    /// The diagonal Fisher of the weight, with its shape.
    pub fisher: Option<(Vec<f32>, Vec<usize>)>,
}

impl Calibration {
    /// Opens a statistics file and checks its names, dtypes and shapes.
    pub fn open(path: &Path) -> Result<Calibration> {
        let file = SafetensorsFile::open(path)?;
        let fail = |module: &str, message: String| Error::Calibration {
            path: path.to_path_buf(),
            module: module.to_string(),
            message,
        };
        let mut grams = BTreeMap::new();
        let mut tokens = BTreeMap::new();
        let mut fishers = BTreeMap::new();
        for name in file.names() {
            let Some((module, kind)) = name
                .rsplit_once('.')
                .filter(|(m, k)| !m.is_empty() && KINDS.contains(k))
            else {
                return Err(fail(
                    name,
                    format!(
                        "`{name}` is not a statistics tensor: expected `<module>.{}`",
                        KINDS.join("|")
                    ),
                ));
            };
            let info = file.info(name).expect("listed");
            let float_only = |info: &crate::tensor::TensorInfo| {
                if info.dtype == Dtype::F32 {
                    Ok(())
                } else {
                    Err(fail(
                        module,
                        format!("`{name}` has dtype {}, expected F32", info.dtype),
                    ))
                }
            };
            match kind {
                "gram" => {
                    float_only(info)?;
                    match info.shape.as_slice() {
                        [a, b] if a == b && *a > 0 => {
                            grams.insert(module.to_string(), *a);
                        }
                        other => {
                            return Err(fail(
                                module,
                                format!("`{name}` has shape {other:?}, expected a square [in, in]"),
                            ))
                        }
                    }
                }
                "tokens" => {
                    tokens.insert(
                        module.to_string(),
                        read_count(&file, name).map_err(|m| fail(module, m))?,
                    );
                }
                "fisher" => {
                    float_only(info)?;
                    fishers.insert(module.to_string(), info.shape.clone());
                }
                _ => float_only(info)?,
            }
        }
        let mut with_tokens = BTreeMap::new();
        for (module, dim) in grams {
            let count = tokens.remove(&module).ok_or_else(|| {
                fail(
                    &module,
                    format!("`{module}.gram` has no `{module}.tokens` (the number of tokens it sums over)"),
                )
            })?;
            with_tokens.insert(module, (dim, count));
        }
        Ok(Calibration {
            file,
            grams: with_tokens,
            fishers,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Whether `module` has a Gram.
    pub fn has_gram(&self, module: &str) -> bool {
        self.grams.contains_key(module)
    }

    /// Whether `module` has a full-weight Fisher.
    pub fn has_fisher(&self, module: &str) -> bool {
        self.fishers.contains_key(module)
    }

    fn fail(&self, module: &str, message: String) -> Error {
        Error::Calibration {
            path: self.path().to_path_buf(),
            module: module.to_string(),
            message,
        }
    }

    /// Checks that `module`'s statistics fit its weight of shape `shape` ([out, in]), from the
    /// header only.
    pub fn check_shapes(&self, module: &str, shape: &[usize]) -> Result<()> {
        if let Some(&(dim, _)) = self.grams.get(module) {
            if shape.len() != 2 || shape[1] != dim {
                return Err(self.fail(
                    module,
                    format!(
                        "the Gram is {dim}×{dim} but the module's weight has shape {shape:?}: a Gram is [in, in] for a weight [out, in]"
                    ),
                ));
            }
        }
        if let Some(fisher) = self.fishers.get(module) {
            if fisher != shape {
                return Err(self.fail(
                    module,
                    format!(
                        "the Fisher has shape {fisher:?} but the module's weight has shape {shape:?}"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `module`'s mean input second moment (`G / tokens`, symmetric to f32 rounding), or `None`
    /// without a Gram. Refuses a non-finite or asymmetric Gram, or a negative diagonal.
    pub fn gram(&self, module: &str) -> Result<Option<Gram>> {
        let Some(&(dim, tokens)) = self.grams.get(module) else {
            return Ok(None);
        };
        // Reading refuses NaN and infinity, naming the tensor and the element. The file's pages
        // are let go once read: a module's Gram is read once per merge.
        let name = format!("{module}.gram");
        let raw = self.file.read_f32(&name)?;
        self.file.release(&name);
        for i in 0..dim {
            let d = raw[i * dim + i];
            if d < 0.0 {
                return Err(self.fail(
                    module,
                    format!(
                        "the Gram's diagonal entry [{i}, {i}] is negative ({d}): not a sum of x·xᵀ"
                    ),
                ));
            }
        }
        // f32 sums of the same products in different orders differ in their last bits; a real
        // asymmetry is far above that. |G_ij| ≤ sqrt(G_ii·G_jj) for a Gram, so the tolerance is
        // relative to that bound. Tile by tile, so that the transposed reads stay in cache, and
        // reading only: the values are then converted in memory order (within the tolerance the
        // row-major values are the column-major ones).
        const TILE: usize = 64;
        let roots: Vec<f32> = (0..dim).map(|i| raw[i * dim + i].sqrt()).collect();
        for i0 in (0..dim).step_by(TILE) {
            for j0 in (i0..dim).step_by(TILE) {
                for i in i0..(i0 + TILE).min(dim) {
                    for j in j0.max(i)..(j0 + TILE).min(dim) {
                        let (a, b) = (raw[i * dim + j], raw[j * dim + i]);
                        if (a - b).abs() > 1e-3 * roots[i] * roots[j] + 1e-30 {
                            return Err(self.fail(
                                module,
                                format!(
                                    "the Gram is not symmetric: [{i}, {j}] is {a} but [{j}, {i}] is {b}"
                                ),
                            ));
                        }
                    }
                }
            }
        }
        let values = raw.iter().map(|&v| f64::from(v) / tokens).collect();
        Ok(Some(Gram { dim, values }))
    }

    /// The RMS of each of `module`'s input features over the tokens, `sqrt(G_jj / tokens)`,
    /// or `None` without a Gram: read from the Gram's diagonal alone (the rest of it is neither
    /// read nor checked). Refuses a non-finite or negative diagonal entry.
    pub fn input_rms(&self, module: &str) -> Result<Option<Vec<f32>>> {
        let Some(&(dim, tokens)) = self.grams.get(module) else {
            return Ok(None);
        };
        let name = format!("{module}.gram");
        let mut rms = Vec::with_capacity(dim);
        for i in 0..dim {
            let at = i * dim + i;
            let d = self.file.read_f32_range(&name, at, at + 1)?[0];
            if d < 0.0 {
                return Err(self.fail(
                    module,
                    format!(
                        "the Gram's diagonal entry [{i}, {i}] is negative ({d}): not a sum of x·xᵀ"
                    ),
                ));
            }
            rms.push((f64::from(d) / tokens).sqrt() as f32);
        }
        Ok(Some(rms))
    }

    /// `module`'s diagonal Fisher of the full weight, or `None` without one. Refuses
    /// non-finite or negative entries.
    pub fn fisher(&self, module: &str) -> Result<Option<Vec<f32>>> {
        if !self.fishers.contains_key(module) {
            return Ok(None);
        }
        let values = self.file.read_f32(&format!("{module}.fisher"))?;
        if let Some((i, v)) = values
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite() || **v < 0.0)
        {
            return Err(self.fail(
                module,
                format!(
                    "the Fisher has entry {v} at element {i}: expected finite and non-negative"
                ),
            ));
        }
        Ok(Some(values))
    }
}

/// A token count: one element of a float or integer dtype, positive and finite.
fn read_count(file: &SafetensorsFile, name: &str) -> std::result::Result<f64, String> {
    let info = file.info(name).expect("listed");
    if info.shape.iter().product::<usize>() != 1 {
        return Err(format!(
            "`{name}` has shape {:?}, expected one element",
            info.shape
        ));
    }
    let bytes = file.bytes(name).map_err(|e| e.to_string())?;
    let value = match (info.dtype, bytes.len()) {
        (Dtype::F32, 4) => f64::from(f32::from_le_bytes(bytes.try_into().expect("4 bytes"))),
        (Dtype::F64, 8) => f64::from_le_bytes(bytes.try_into().expect("8 bytes")),
        (Dtype::I32, 4) => f64::from(i32::from_le_bytes(bytes.try_into().expect("4 bytes"))),
        (Dtype::I64, 8) => i64::from_le_bytes(bytes.try_into().expect("8 bytes")) as f64,
        (dtype, _) => {
            return Err(format!(
                "`{name}` has dtype {dtype}, expected F32, F64, I32 or I64"
            ))
        }
    };
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(format!(
            "`{name}` is {value}: expected a positive number of tokens"
        ))
    }
}

/// Writes a statistics file (atomically): per module, its Gram and token count (I64) and its
/// Fisher, as [`Calibration::open`] reads them.
pub fn write_calibration(path: &Path, modules: &BTreeMap<String, ModuleStats>) -> Result<()> {
    let mut tensors = Vec::new();
    for (module, stats) in modules {
        if let Some((gram, dim, tokens)) = &stats.gram {
            let spec = TensorSpec {
                name: format!("{module}.gram"),
                dtype: Dtype::F32,
                shape: vec![*dim, *dim],
            };
            tensors.push((spec, from_f32(Dtype::F32, gram).expect("f32")));
            let spec = TensorSpec {
                name: format!("{module}.tokens"),
                dtype: Dtype::I64,
                shape: vec![1],
            };
            tensors.push((spec, (*tokens as i64).to_le_bytes().to_vec()));
        }
        if let Some((fisher, shape)) = &stats.fisher {
            let spec = TensorSpec {
                name: format!("{module}.fisher"),
                dtype: Dtype::F32,
                shape: shape.clone(),
            };
            tensors.push((spec, from_f32(Dtype::F32, fisher).expect("f32")));
        }
    }
    let metadata = BTreeMap::from([("format".to_string(), "mmx-calibration".to_string())]);
    write_safetensors(path, &tensors, &metadata)
}

/// The module a weight tensor belongs to: its name without `.weight`, for 2-D weights.
pub fn module_of(tensor: &str, shape: &[usize]) -> Option<String> {
    (shape.len() == 2)
        .then(|| tensor.strip_suffix(".weight").map(str::to_string))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor to write as it is: name, dtype, shape, bytes.
    type Raw<'a> = (&'a str, Dtype, Vec<usize>, Vec<u8>);

    fn write_raw(dir: &Path, tensors: &[Raw<'_>]) -> std::path::PathBuf {
        let path = dir.join("stats.safetensors");
        let tensors: Vec<(TensorSpec, Vec<u8>)> = tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                (
                    TensorSpec {
                        name: name.to_string(),
                        dtype: *dtype,
                        shape: shape.clone(),
                    },
                    bytes.clone(),
                )
            })
            .collect();
        write_safetensors(&path, &tensors, &BTreeMap::new()).unwrap();
        path
    }

    fn f32s(values: &[f32]) -> Vec<u8> {
        from_f32(Dtype::F32, values).unwrap()
    }

    #[test]
    fn a_written_file_reads_back_as_mean_second_moments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.safetensors");
        let modules = BTreeMap::from([(
            "model.layers.0.mlp.down_proj".to_string(),
            ModuleStats {
                gram: Some((vec![4.0, 2.0, 2.0, 8.0], 2, 2)),
                fisher: Some((vec![0.5; 6], vec![3, 2])),
            },
        )]);
        write_calibration(&path, &modules).unwrap();
        let c = Calibration::open(&path).unwrap();
        let module = "model.layers.0.mlp.down_proj";
        assert!(c.has_gram(module) && c.has_fisher(module));
        assert_eq!(
            c.gram(module).unwrap().unwrap(),
            Gram {
                dim: 2,
                values: vec![2.0, 1.0, 1.0, 4.0]
            }
        );
        assert_eq!(c.fisher(module).unwrap().unwrap(), vec![0.5; 6]);
        c.check_shapes(module, &[3, 2]).unwrap();
        let err = c.check_shapes(module, &[2, 3]).unwrap_err().to_string();
        assert!(err.contains(module) && err.contains("[2, 3]"), "{err}");
        assert_eq!(c.gram("other").unwrap(), None);
    }

    #[test]
    fn bad_files_are_refused_naming_module_and_shape() {
        let dir = tempfile::tempdir().unwrap();
        let count = |n: i64| n.to_le_bytes().to_vec();
        let cases: Vec<(Vec<Raw<'_>>, &str)> = vec![
            (
                vec![("m.gram", Dtype::F32, vec![2, 3], f32s(&[0.0; 6]))],
                "[2, 3], expected a square",
            ),
            (
                vec![(
                    "m.gram",
                    Dtype::F32,
                    vec![2, 2],
                    f32s(&[1.0, 0.0, 0.0, 1.0]),
                )],
                "has no `m.tokens`",
            ),
            (
                vec![("m.weight", Dtype::F32, vec![1], f32s(&[1.0]))],
                "not a statistics tensor",
            ),
            (
                vec![
                    ("m.gram", Dtype::F16, vec![1, 1], vec![0, 0]),
                    ("m.tokens", Dtype::I64, vec![1], count(1)),
                ],
                "dtype F16",
            ),
            (
                vec![
                    ("m.gram", Dtype::F32, vec![1, 1], f32s(&[1.0])),
                    ("m.tokens", Dtype::I64, vec![1], count(0)),
                ],
                "positive number of tokens",
            ),
        ];
        for (tensors, expected) in cases {
            let path = write_raw(dir.path(), &tensors);
            let err = Calibration::open(&path).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}: {err}");
            assert!(err.contains("stats.safetensors"), "{err}");
        }
        // Values are checked when read.
        let values: Vec<(Vec<f32>, &str)> = vec![
            (
                vec![1.0, 0.5, -0.5, 1.0],
                "not symmetric: [0, 1] is 0.5 but [1, 0] is -0.5",
            ),
            (
                vec![1.0, f32::NAN, f32::NAN, 1.0],
                "non-finite value (NaN) at element 1",
            ),
            (
                vec![-1.0, 0.0, 0.0, 1.0],
                "diagonal entry [0, 0] is negative",
            ),
        ];
        for (gram, expected) in values {
            let path = write_raw(
                dir.path(),
                &[
                    ("layer.q.gram", Dtype::F32, vec![2, 2], f32s(&gram)),
                    ("layer.q.tokens", Dtype::F32, vec![1], f32s(&[3.0])),
                ],
            );
            let c = Calibration::open(&path).unwrap();
            let err = c.gram("layer.q").unwrap_err().to_string();
            assert!(err.contains(expected) && err.contains("layer.q"), "{err}");
        }
        let path = write_raw(
            dir.path(),
            &[("layer.q.fisher", Dtype::F32, vec![2], f32s(&[1.0, -2.0]))],
        );
        let err = Calibration::open(&path)
            .unwrap()
            .fisher("layer.q")
            .unwrap_err();
        assert!(err.to_string().contains("entry -2 at element 1"), "{err}");
    }

    #[test]
    fn modules_are_weights_without_their_suffix() {
        assert_eq!(
            module_of("model.layers.0.self_attn.q_proj.weight", &[4, 4]).as_deref(),
            Some("model.layers.0.self_attn.q_proj")
        );
        assert_eq!(module_of("model.norm.weight", &[4]), None);
        assert_eq!(module_of("lm_head.bias", &[4, 4]), None);
    }
}
