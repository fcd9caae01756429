//! Recipe parameters are checked once, against one table, when the merge is planned: every value
//! a tensor could resolve to, the same domains as the per-tensor merge, and CACI's attenuation
//! under its own name with the old one still read.

mod common;

use std::path::Path;
use std::process::Output;

use common::{assert_ok, mmx, write_two_lora_recipe};

/// Writes a delta-output recipe of `method` over lora_a and lora_b with `parameters` (TOML
/// lines of `[merge.parameters]`) and runs `mmx merge` on it into `dir/NAME`.
fn merge(dir: &Path, name: &str, method: &str, parameters: &str) -> Output {
    let recipe = dir.join(format!("{name}.toml"));
    write_two_lora_recipe(
        &recipe,
        method,
        "delta",
        &format!("[merge.parameters]\n{parameters}"),
    );
    let out_dir = dir.join(name);
    mmx(
        &[
            "merge",
            recipe.to_str().unwrap(),
            "--device",
            "cpu",
            "-o",
            out_dir.to_str().unwrap(),
        ],
        dir,
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn cacis_old_gamma_is_read_as_attenuation_with_a_warning() {
    let work = tempfile::tempdir().unwrap();
    let new = merge(
        work.path(),
        "new",
        "caci",
        "density = 0.5\nattenuation = 2.0",
    );
    assert_ok(&new);
    assert!(!stderr(&new).contains("deprecated"), "{}", stderr(&new));
    let old = merge(work.path(), "old", "caci", "density = 0.5\ngamma = 2.0");
    assert_ok(&old);
    assert!(
        stderr(&old)
            .contains("warning: `gamma` of method `caci` is deprecated: it is now `attenuation`"),
        "{}",
        stderr(&old)
    );
    let bytes =
        |name: &str| std::fs::read(work.path().join(name).join("delta.safetensors")).unwrap();
    assert_eq!(bytes("new"), bytes("old"));
    // Another attenuation is another merge, so the old spelling was not ignored.
    assert_ok(&merge(
        work.path(),
        "one",
        "caci",
        "density = 0.5\nattenuation = 1.0",
    ));
    assert_ne!(bytes("new"), bytes("one"));

    let both = merge(
        work.path(),
        "both",
        "caci",
        "gamma = 2.0\nattenuation = 1.0",
    );
    assert_eq!(both.status.code(), Some(2), "{}", stderr(&both));
    assert!(stderr(&both).contains("both `gamma` and `attenuation` are set"));
    // Breadcrumbs' gamma is mergekit's and keeps its meaning: a per-expert share in [0, 1).
    assert_ok(&merge(
        work.path(),
        "crumbs",
        "breadcrumbs",
        "density = 0.9\ngamma = 0.05",
    ));
    let out = merge(work.path(), "crumbs-bad", "breadcrumbs", "gamma = 2.0");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("`gamma` of method `breadcrumbs`: 2 is outside [0, 1)"),
        "{}",
        stderr(&out)
    );
}

/// A value no tensor resolves to is still checked: a filter that matches nothing, or one point
/// of a gradient. Nothing is written.
#[test]
fn every_value_a_tensor_could_get_is_checked_before_anything_is_merged() {
    let work = tempfile::tempdir().unwrap();
    for (name, parameters, expected) in [
        (
            "filter",
            "density = [{filter = 'no_such_module', value = 7.0}, {value = 0.5}]",
            "`density` of method `ties`: 7 is outside (0, 1]",
        ),
        (
            "gradient",
            "density = [0.5, 0.0, 0.5]",
            "`density` of method `ties`: 0 is outside (0, 1]",
        ),
        (
            "choice",
            "sign_election = 'majority'",
            "`sign_election` of method `ties`: `majority` is not one of weighted, unweighted",
        ),
        (
            "flag",
            "normalize = 1",
            "`normalize` of method `ties`: expected true or false",
        ),
    ] {
        let out = merge(work.path(), name, "ties", parameters);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains(expected), "{name}: {}", stderr(&out));
        assert!(
            !work.path().join(name).exists(),
            "{name}: something was written"
        );
    }
}
