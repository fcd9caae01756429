//! Every method's parameters in one table ([`PARAMETERS`]: name, scope, domain, default,
//! meaning, which methods read it), and the one validator that checks them: a recipe's values
//! when the plan is built (every scalar of every gradient and filter list, so that no tensor
//! can resolve to a value outside the domain), and a resolved set when one tensor is merged.
//!
//! Where mergekit and mmx would spell two things the same, mergekit's spelling keeps its
//! meaning: `gamma` is breadcrumbs' outlier share, and CACI's attenuation exponent is
//! `attenuation` (CACI's old `gamma` is still read, with a deprecation warning).

use super::consensus::{DisjointMean, SignElection};
use super::method::{Confidence, ExpertParams, Fallback, GlobalParams, Method, RescaleMode};
use super::sparsify;
use crate::error::{Error, Result};
use crate::recipe::{ParamValue, Recipe, Scalar};

/// Where a parameter is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Once for the merge (in the recipe's parameters), one value per tensor.
    Method,
    /// Per expert (or for all experts in the recipe's parameters), one value per tensor.
    Expert,
}

/// The values a parameter takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Domain {
    /// A finite number between `min` and `max`, each bound included unless `open`.
    Number {
        /// The lower bound.
        min: f64,
        /// Whether `min` itself is excluded.
        min_open: bool,
        /// The upper bound.
        max: f64,
        /// Whether `max` itself is excluded.
        max_open: bool,
    },
    /// `true` or `false`.
    Bool,
    /// One of these strings.
    Choice(&'static [&'static str]),
}

/// One parameter of the table.
#[derive(Debug, Clone, Copy)]
pub struct Parameter {
    /// Its name in recipes.
    pub name: &'static str,
    /// Where it is set.
    pub scope: Scope,
    /// The values it takes.
    pub domain: Domain,
    /// Its default, as the docs give it (`default_globals` and `default_expert` hold the values).
    pub default: &'static str,
    /// What it does.
    pub meaning: &'static str,
    /// Whether `method` reads it.
    pub read_by: fn(Method) -> bool,
    /// An older spelling still read, with a deprecation warning.
    pub deprecated_alias: Option<&'static str>,
}

const ANY_FINITE: Domain = Domain::Number {
    min: f64::NEG_INFINITY,
    min_open: true,
    max: f64::INFINITY,
    max_open: true,
};
const NON_NEGATIVE: Domain = Domain::Number {
    min: 0.0,
    min_open: false,
    max: f64::INFINITY,
    max_open: true,
};

fn task_arithmetic_family(m: Method) -> bool {
    !matches!(m, Method::Linear | Method::MagnitudePrune | Method::Caci)
        && !m.adapters_only()
        && !m.data_aware()
}

/// Every method that merges tensor by tensor but `linear`.
fn with_a_base(m: Method) -> bool {
    m != Method::Linear && !m.adapters_only()
}

fn trims(m: Method) -> bool {
    task_arithmetic_family(m) && m != Method::TaskArithmetic
}

/// Every parameter a recipe may set (the seed is the recipe's own, not a method parameter).
pub const PARAMETERS: &[Parameter] = &[
    Parameter {
        name: "lambda",
        scope: Scope::Method,
        domain: ANY_FINITE,
        default: "1",
        meaning: "multiplies the merged delta",
        read_by: with_a_base,
        deprecated_alias: None,
    },
    Parameter {
        name: "normalize",
        scope: Scope::Method,
        domain: Domain::Bool,
        default: "true for linear, ties, della and caci; false otherwise",
        meaning: "divide the merged delta by the sum of weights (or the disjoint-mean divisor)",
        read_by: |m| m != Method::MagnitudePrune && !m.adapters_only() && !m.data_aware(),
        deprecated_alias: None,
    },
    Parameter {
        name: "rescale",
        scope: Scope::Method,
        domain: Domain::Bool,
        default: "true for dare_linear, dare_ties, della and della_linear; false otherwise",
        meaning: "scale trimmed deltas back up (see rescale_mode); nothing on task_arithmetic",
        read_by: task_arithmetic_family,
        deprecated_alias: None,
    },
    Parameter {
        name: "int8_mask",
        scope: Scope::Method,
        domain: Domain::Bool,
        default: "false",
        meaning: "mergekit's dtype of its sign masks: accepted, no effect here",
        read_by: task_arithmetic_family,
        deprecated_alias: None,
    },
    Parameter {
        name: "rescale_mode",
        scope: Scope::Method,
        domain: Domain::Choice(&["l1", "inverse_density"]),
        default: "l1",
        meaning: "match the untrimmed L1 norm (mergekit) or divide by density (DARE, PEFT)",
        read_by: trims,
        deprecated_alias: None,
    },
    Parameter {
        name: "sign_election",
        scope: Scope::Method,
        domain: Domain::Choice(&["weighted", "unweighted"]),
        default: "weighted",
        meaning: "what the sign vote sums: weighted deltas (mergekit) or their signs",
        read_by: Method::has_consensus,
        deprecated_alias: None,
    },
    Parameter {
        name: "disjoint_mean",
        scope: Scope::Method,
        domain: Domain::Choice(&["weights", "counts"]),
        default: "weights",
        meaning:
            "what the disjoint mean divides by: the agreeing weights (mergekit) or their count",
        read_by: Method::has_consensus,
        deprecated_alias: None,
    },
    Parameter {
        name: "attenuation",
        scope: Scope::Method,
        domain: NON_NEGATIVE,
        default: "1",
        meaning: "CACI: contested coordinates are multiplied by (1 − κ)^attenuation",
        read_by: |m| m == Method::Caci,
        deprecated_alias: Some("gamma"),
    },
    Parameter {
        name: "confidence",
        scope: Scope::Method,
        domain: Domain::Choice(&["rms", "none", "activation"]),
        default: "rms",
        meaning: "CACI: an expert's vote weight, w / rms(Δ) or w; activation: each coordinate scored by its effect on the expert's outputs on its own inputs (reads calibration statistics)",
        read_by: |m| m == Method::Caci,
        deprecated_alias: None,
    },
    Parameter {
        name: "restore",
        scope: Scope::Method,
        domain: Domain::Number {
            min: 0.0,
            min_open: true,
            max: f64::INFINITY,
            max_open: true,
        },
        default: "unset (no restore)",
        meaning: "CACI: each expert's share of the merge is made restore·w_t",
        read_by: |m| m == Method::Caci,
        deprecated_alias: None,
    },
    Parameter {
        name: "alpha",
        scope: Scope::Method,
        domain: Domain::Number {
            min: 0.0,
            min_open: false,
            max: 1.0,
            max_open: false,
        },
        default: "1",
        meaning: "RegMean: the factor on the Grams' off-diagonal entries (1: exact least squares, 0: each input coordinate alone)",
        read_by: |m| m == Method::RegMean,
        deprecated_alias: None,
    },
    Parameter {
        name: "ridge",
        scope: Scope::Method,
        domain: NON_NEGATIVE,
        default: "0.0001",
        meaning: "RegMean: added to the summed Gram's diagonal, relative to its mean diagonal entry",
        read_by: |m| m == Method::RegMean,
        deprecated_alias: None,
    },
    Parameter {
        name: "fisher_floor",
        scope: Scope::Method,
        domain: Domain::Number {
            min: 0.0,
            min_open: true,
            max: f64::INFINITY,
            max_open: true,
        },
        default: "0.000001",
        meaning: "Fisher: added to every Fisher entry, relative to the mean entry of the expert's Fisher of that tensor",
        read_by: |m| m == Method::Fisher,
        deprecated_alias: None,
    },
    Parameter {
        name: "fallback",
        scope: Scope::Method,
        domain: Domain::Choice(&["linear", "task_arithmetic"]),
        default: "linear",
        meaning: "regmean, fisher: how tensors without statistics merge (the weighted mean of the updates, or their weighted sum), times lambda",
        read_by: Method::data_aware,
        deprecated_alias: None,
    },
    Parameter {
        name: "weight",
        scope: Scope::Expert,
        domain: ANY_FINITE,
        default: "1",
        meaning: "the expert's weight",
        read_by: |_| true,
        deprecated_alias: None,
    },
    Parameter {
        name: "density",
        scope: Scope::Expert,
        domain: Domain::Number {
            min: 0.0,
            min_open: true,
            max: 1.0,
            max_open: false,
        },
        default: "1 (caci: 0.5)",
        meaning: "the fraction of the delta kept (task_arithmetic accepts it and keeps all)",
        read_by: |m| with_a_base(m) && !m.data_aware(),
        deprecated_alias: None,
    },
    Parameter {
        name: "gamma",
        scope: Scope::Expert,
        domain: Domain::Number {
            min: 0.0,
            min_open: false,
            max: 1.0,
            max_open: true,
        },
        default: "0.01",
        meaning: "breadcrumbs: the fraction of largest-magnitude entries dropped",
        read_by: |m| matches!(m, Method::Breadcrumbs | Method::BreadcrumbsTies),
        deprecated_alias: None,
    },
    Parameter {
        name: "epsilon",
        scope: Scope::Expert,
        domain: NON_NEGATIVE,
        default: "0.15",
        meaning: "DELLA: the spread of keep probabilities around density",
        read_by: |m| matches!(m, Method::Della | Method::DellaLinear),
        deprecated_alias: None,
    },
];

/// The parameters `method` reads in `scope`, in table order.
pub fn parameters_of(method: Method, scope: Scope) -> impl Iterator<Item = &'static Parameter> {
    PARAMETERS
        .iter()
        .filter(move |p| p.scope == scope && (p.read_by)(method))
}

impl Method {
    /// The method-wide parameter names a recipe may set (see [`PARAMETERS`]).
    pub fn global_parameters(self) -> Vec<&'static str> {
        parameters_of(self, Scope::Method).map(|p| p.name).collect()
    }

    /// The per-expert parameter names a recipe may set (see [`PARAMETERS`]).
    pub fn expert_parameters(self) -> Vec<&'static str> {
        parameters_of(self, Scope::Expert).map(|p| p.name).collect()
    }
}

/// The table as Markdown (name, scope, values, default, methods, meaning), as the README shows
/// it.
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| parameter | set | values | default | methods | meaning |\n|---|---|---|---|---|---|\n",
    );
    for p in PARAMETERS {
        let scope = match p.scope {
            Scope::Method => "method",
            Scope::Expert => "expert",
        };
        let values = match p.domain {
            Domain::Number {
                min,
                min_open,
                max,
                max_open,
            } if min.is_finite() || max.is_finite() => format!(
                "{}{}, {}{}",
                if min_open { "(" } else { "[" },
                bound(min),
                bound(max),
                if max_open { ")" } else { "]" }
            ),
            Domain::Number { .. } => "a finite number".to_string(),
            Domain::Bool => "true, false".to_string(),
            Domain::Choice(options) => options
                .iter()
                .map(|o| format!("`{o}`"))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let methods: Vec<&str> = Method::all()
            .iter()
            .filter(|&&m| (p.read_by)(m))
            .map(|m| m.name())
            .collect();
        let others: Vec<&str> = Method::all()
            .iter()
            .filter(|&&m| !(p.read_by)(m))
            .map(|m| m.name())
            .collect();
        let methods = match others.len() {
            0 => "all".to_string(),
            1..=3 => format!("all but {}", others.join(", ")),
            _ => methods.join(", "),
        };
        let alias = p
            .deprecated_alias
            .map(|a| format!(" (formerly `{a}`)"))
            .unwrap_or_default();
        out.push_str(&format!(
            "| `{}`{alias} | {scope} | {values} | {} | {methods} | {} |\n",
            p.name, p.default, p.meaning
        ));
    }
    out
}

/// Whether `value` is in `domain`; the error says what was expected.
fn check_domain(domain: Domain, value: &Scalar) -> std::result::Result<(), String> {
    match (domain, value) {
        (
            Domain::Number {
                min,
                min_open,
                max,
                max_open,
            },
            Scalar::Number(x),
        ) => {
            let above = if min_open { *x > min } else { *x >= min };
            let below = if max_open { *x < max } else { *x <= max };
            if x.is_finite() && above && below {
                return Ok(());
            }
            let (open, close) = (
                if min_open { "(" } else { "[" },
                if max_open { ")" } else { "]" },
            );
            Err(match (min.is_finite(), max.is_finite()) {
                (false, false) => format!("{x} is not finite"),
                _ => format!("{x} is outside {open}{}, {}{close}", bound(min), bound(max)),
            })
        }
        (Domain::Number { .. }, other) => Err(format!("expected a number, found {other:?}")),
        (Domain::Bool, Scalar::Bool(_)) => Ok(()),
        (Domain::Bool, other) => Err(format!("expected true or false, found {other:?}")),
        (Domain::Choice(options), Scalar::Text(s)) if options.contains(&s.as_str()) => Ok(()),
        (Domain::Choice(options), Scalar::Text(s)) => {
            Err(format!("`{s}` is not one of {}", options.join(", ")))
        }
        (Domain::Choice(options), other) => Err(format!(
            "expected one of {}, found {other:?}",
            options.join(", ")
        )),
    }
}

fn bound(x: f64) -> String {
    if x.is_infinite() {
        "∞".to_string()
    } else {
        x.to_string()
    }
}

/// Every scalar a value can resolve to, for any tensor.
fn scalars(value: &ParamValue) -> Vec<&Scalar> {
    match value {
        ParamValue::Scalar(s) => vec![s],
        ParamValue::Gradient(values) => values.iter().collect(),
        ParamValue::Filtered(entries) => entries.iter().flat_map(|(_, v)| scalars(v)).collect(),
    }
}

fn recipe_error(recipe: &Recipe, message: String) -> Error {
    Error::Recipe {
        path: recipe.path.clone(),
        message,
    }
}

/// Checks a recipe's parameters for `method` before anything is merged: every name is one the
/// method reads, at a level it may be set at, and every value any tensor can resolve to is in
/// its domain (gradients interpolate between their points, and every domain is an interval, so
/// checking the points is enough). Returns the deprecation warnings.
pub(crate) fn check_recipe(recipe: &Recipe, method: Method) -> Result<Vec<String>> {
    let readable: Vec<&Parameter> = PARAMETERS.iter().filter(|p| (p.read_by)(method)).collect();
    let describe = || {
        let mut all: Vec<&str> = readable.iter().map(|p| p.name).collect();
        all.sort_unstable();
        all.join(", ")
    };
    let mut warnings = Vec::new();
    let known = |name: &str| readable.iter().copied().find(|p| p.name == name);
    let alias = |name: &str| {
        readable
            .iter()
            .copied()
            .find(|p| p.deprecated_alias == Some(name) && known(name).is_none())
    };
    let check_values = |p: &Parameter, value: &ParamValue, at: &str| -> Result<()> {
        for scalar in scalars(value) {
            check_domain(p.domain, scalar).map_err(|message| {
                recipe_error(
                    recipe,
                    format!("{at}`{}` of method `{}`: {message}", p.name, method.name()),
                )
            })?;
        }
        Ok(())
    };
    for (name, value) in &recipe.parameters {
        let p = match (known(name), alias(name)) {
            (Some(p), _) => p,
            (None, Some(p)) => {
                warnings.push(format!(
                    "`{name}` of method `{}` is deprecated: it is now `{}` (mergekit's `{name}` is breadcrumbs' outlier share); read as `{}`",
                    method.name(),
                    p.name,
                    p.name
                ));
                if recipe.parameters.contains_key(p.name) {
                    return Err(recipe_error(
                        recipe,
                        format!("both `{name}` and `{}` are set: keep `{}`", p.name, p.name),
                    ));
                }
                p
            }
            (None, None) => {
                return Err(recipe_error(
                    recipe,
                    format!(
                        "unknown parameter `{name}` for method `{}` (it takes: {})",
                        method.name(),
                        describe()
                    ),
                ))
            }
        };
        check_values(p, value, "")?;
    }
    for (i, e) in recipe.experts.iter().enumerate() {
        for (name, value) in &e.parameters {
            match known(name) {
                Some(p) if p.scope == Scope::Method => {
                    return Err(recipe_error(
                        recipe,
                        format!("expert {i} (`{}`): `{name}` is method-wide; set it in the recipe's parameters", e.source),
                    ))
                }
                Some(p) => check_values(p, value, &format!("expert {i} (`{}`): ", e.source))?,
                None => {
                    return Err(recipe_error(
                        recipe,
                        format!(
                            "expert {i} (`{}`): unknown parameter `{name}` for method `{}` (it takes: {})",
                            e.source,
                            method.name(),
                            describe()
                        ),
                    ))
                }
            }
        }
    }
    Ok(warnings)
}

/// Whether a merge by `method` under `recipe` reads calibration statistics: `regmean`,
/// `fisher`, and `caci` where some tensor's `confidence` is `activation`.
pub(crate) fn reads_statistics(recipe: &Recipe, method: Method) -> bool {
    method.data_aware()
        || (method == Method::Caci
            && recipe.parameters.get("confidence").is_some_and(|v| {
                scalars(v)
                    .iter()
                    .any(|s| matches!(s, Scalar::Text(t) if t == "activation"))
            }))
}

/// The name a recipe gives `parameter` at the method level: its own, else its deprecated alias
/// where the recipe uses that.
pub(crate) fn spelled<'a>(parameter: &'a Parameter, recipe: &Recipe) -> &'a str {
    match parameter.deprecated_alias {
        Some(alias)
            if !recipe.parameters.contains_key(parameter.name)
                && recipe.parameters.contains_key(alias) =>
        {
            alias
        }
        _ => parameter.name,
    }
}

fn number(value: &Scalar) -> f64 {
    match value {
        Scalar::Number(x) => *x,
        _ => f64::NAN,
    }
}

/// Sets a method-wide parameter from a value [`check_recipe`] accepted.
pub(crate) fn set_global(globals: &mut GlobalParams, name: &str, value: &Scalar) {
    let text = match value {
        Scalar::Text(s) => s.as_str(),
        _ => "",
    };
    let flag = matches!(value, Scalar::Bool(true));
    match name {
        "lambda" => globals.lambda = number(value) as f32,
        "normalize" => globals.normalize = flag,
        "rescale" => globals.rescale = flag,
        "int8_mask" => {}
        "rescale_mode" => {
            globals.rescale_mode = match text {
                "inverse_density" => RescaleMode::InverseDensity,
                _ => RescaleMode::L1,
            }
        }
        "sign_election" => {
            globals.sign_election = match text {
                "unweighted" => SignElection::Unweighted,
                _ => SignElection::Weighted,
            }
        }
        "disjoint_mean" => {
            globals.disjoint_mean = match text {
                "counts" => DisjointMean::Counts,
                _ => DisjointMean::Weights,
            }
        }
        "attenuation" => globals.attenuation = number(value) as f32,
        "confidence" => {
            globals.confidence = match text {
                "none" => Confidence::None,
                "activation" => Confidence::Activation,
                _ => Confidence::Rms,
            }
        }
        "restore" => globals.restore = Some(number(value) as f32),
        "alpha" => globals.alpha = number(value) as f32,
        "ridge" => globals.ridge = number(value) as f32,
        "fisher_floor" => globals.fisher_floor = number(value) as f32,
        "fallback" => {
            globals.fallback = match text {
                "task_arithmetic" => Fallback::TaskArithmetic,
                _ => Fallback::Linear,
            }
        }
        other => unreachable!("the table has no method-wide parameter `{other}`"),
    }
}

/// Sets a per-expert parameter from a value [`check_recipe`] accepted.
pub(crate) fn set_expert(expert: &mut ExpertParams, name: &str, value: &Scalar) {
    let x = number(value) as f32;
    match name {
        "weight" => expert.weight = x,
        "density" => expert.density = x,
        "gamma" => expert.gamma = x,
        "epsilon" => expert.epsilon = x,
        other => unreachable!("the table has no per-expert parameter `{other}`"),
    }
}

pub(super) fn parameter_error(name: &str, tensor: &str, message: String) -> Error {
    Error::Parameter {
        name: name.into(),
        tensor: tensor.into(),
        message,
    }
}

/// Checks the parameters `method` reads for one tensor against the table, and DELLA's
/// `density ± epsilon` inside (0, 1). `expert` names expert `i` in errors.
pub(crate) fn check_params_named(
    method: Method,
    globals: &GlobalParams,
    tensor: &str,
    params: &[ExpertParams],
    expert: &dyn Fn(usize) -> String,
) -> Result<()> {
    for p in parameters_of(method, Scope::Method) {
        let value = match p.name {
            "lambda" => globals.lambda,
            "attenuation" => globals.attenuation,
            "alpha" => globals.alpha,
            "ridge" => globals.ridge,
            "fisher_floor" => globals.fisher_floor,
            "restore" => match globals.restore {
                Some(r) => r,
                None => continue,
            },
            _ => continue,
        };
        check_domain(p.domain, &Scalar::Number(f64::from(value)))
            .map_err(|message| parameter_error(p.name, tensor, message))?;
    }
    for (i, e) in params.iter().enumerate() {
        for p in parameters_of(method, Scope::Expert) {
            let value = match p.name {
                "weight" => e.weight,
                "density" => e.density,
                "gamma" => e.gamma,
                _ => e.epsilon,
            };
            check_domain(p.domain, &Scalar::Number(f64::from(value))).map_err(|message| {
                parameter_error(p.name, tensor, format!("{}{message}", expert(i)))
            })?;
        }
        if matches!(method, Method::Della | Method::DellaLinear) {
            sparsify::check_della(e.density, e.epsilon, tensor).map_err(|err| match err {
                Error::Parameter {
                    name,
                    tensor,
                    message,
                } => Error::Parameter {
                    name,
                    tensor,
                    message: format!("{}{message}", expert(i)),
                },
                other => other,
            })?;
        }
    }
    Ok(())
}

/// [`check_params_named`] with experts named by their position in the job.
pub(crate) fn check_params(
    method: Method,
    globals: &GlobalParams,
    tensor: &str,
    params: &[ExpertParams],
) -> Result<()> {
    check_params_named(method, globals, tensor, params, &|_| String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_parameter_is_read_by_some_method_and_named_once_per_scope() {
        for p in PARAMETERS {
            assert!(
                Method::all().iter().any(|&m| (p.read_by)(m)),
                "{} is read by no method",
                p.name
            );
            let same = PARAMETERS
                .iter()
                .filter(|q| q.name == p.name && q.scope == p.scope)
                .count();
            assert_eq!(same, 1, "{}", p.name);
        }
        // What a method reads is what it used to accept, CACI's gamma renamed.
        assert_eq!(Method::Linear.global_parameters(), ["normalize"]);
        assert_eq!(Method::MagnitudePrune.global_parameters(), ["lambda"]);
        assert_eq!(
            Method::Caci.global_parameters(),
            [
                "lambda",
                "normalize",
                "attenuation",
                "confidence",
                "restore"
            ]
        );
        assert_eq!(
            Method::Ties.global_parameters(),
            [
                "lambda",
                "normalize",
                "rescale",
                "int8_mask",
                "rescale_mode",
                "sign_election",
                "disjoint_mean"
            ]
        );
        assert_eq!(
            Method::TaskArithmetic.global_parameters(),
            ["lambda", "normalize", "rescale", "int8_mask"]
        );
        assert_eq!(
            Method::Breadcrumbs.expert_parameters(),
            ["weight", "density", "gamma"]
        );
        assert_eq!(
            Method::Della.expert_parameters(),
            ["weight", "density", "epsilon"]
        );
        assert_eq!(Method::Caci.expert_parameters(), ["weight", "density"]);
        assert_eq!(Method::Cat.global_parameters(), Vec::<&str>::new());
        assert_eq!(Method::Svd.expert_parameters(), ["weight"]);
    }

    #[test]
    fn the_readme_shows_the_table_as_it_is() {
        let readme = include_str!("../../README.md");
        let table = markdown_table();
        assert!(
            readme.contains(&table),
            "README.md's parameter table differs from the code's; put this in:\n{table}"
        );
    }

    #[test]
    fn domains_take_their_bounds_as_written() {
        let density = PARAMETERS
            .iter()
            .find(|p| p.name == "density")
            .unwrap()
            .domain;
        for (x, ok) in [
            (0.0, false),
            (1e-9, true),
            (1.0, true),
            (1.0001, false),
            (f64::NAN, false),
        ] {
            assert_eq!(check_domain(density, &Scalar::Number(x)).is_ok(), ok, "{x}");
        }
        let gamma = PARAMETERS
            .iter()
            .find(|p| p.name == "gamma")
            .unwrap()
            .domain;
        assert!(check_domain(gamma, &Scalar::Number(0.0)).is_ok());
        assert_eq!(
            check_domain(gamma, &Scalar::Number(1.0)).unwrap_err(),
            "1 is outside [0, 1)"
        );
        assert_eq!(
            check_domain(ANY_FINITE, &Scalar::Number(f64::INFINITY)).unwrap_err(),
            "inf is not finite"
        );
        assert!(check_domain(Domain::Bool, &Scalar::Number(1.0)).is_err());
        let mode = Domain::Choice(&["l1", "inverse_density"]);
        assert_eq!(
            check_domain(mode, &Scalar::Text("l2".into())).unwrap_err(),
            "`l2` is not one of l1, inverse_density"
        );
    }
}
