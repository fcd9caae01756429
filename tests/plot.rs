//! Figures as files: PNGs are real PNGs of the figure's size, SVGs carry every label and paint
//! each heatmap cell in its value's colour, bad requests are errors that write nothing, and
//! `mmx conflicts --plot` draws the report.

use std::path::Path;

mod common;

use common::{assert_ok, mmx};
use mmx::plot::{heatmap, heatmaps, scatter_panels, ColorMap, Heatmap, Panel, Series, EMPTY};

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1A, b'\n'];

/// Width and height from a PNG's header chunk, which must come first.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(bytes[..8], PNG_SIGNATURE, "not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR", "first chunk is not IHDR");
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn sample_heatmap(title: &str, rows: &[&str], columns: &[&str]) -> Heatmap {
    Heatmap {
        title: title.to_string(),
        rows: strings(rows),
        columns: strings(columns),
        values: (0..rows.len())
            .map(|r| {
                (0..columns.len())
                    .map(|c| Some((r * columns.len() + c) as f64 / 10.0))
                    .collect()
            })
            .collect(),
        range: (0.0, 1.0),
        colors: ColorMap::Sequential,
    }
}

fn panel(x_label: &str, series: Vec<Series>) -> Panel {
    Panel {
        x_label: x_label.to_string(),
        y_label: "score".to_string(),
        series,
    }
}

fn series(name: &str, points: &[(f64, f64)]) -> Series {
    Series {
        name: name.to_string(),
        points: points.to_vec(),
    }
}

/// Whether the SVG has a text element that reads exactly `text`.
fn has_text(svg: &str, text: &str) -> bool {
    svg.contains(&format!(">\n{text}\n</text>"))
}

/// A `<rect>`'s position, size and fill.
#[derive(Debug)]
struct Rect {
    x: i64,
    y: i64,
    size: (i64, i64),
    fill: String,
}

fn rects(svg: &str) -> Vec<Rect> {
    svg.lines()
        .filter(|l| l.trim_start().starts_with("<rect"))
        .map(|l| {
            let attr = |name: &str| {
                let key = format!(" {name}=\"");
                let start = l.find(&key).unwrap() + key.len();
                l[start..start + l[start..].find('"').unwrap()].to_string()
            };
            let num = |name: &str| attr(name).parse::<i64>().unwrap();
            Rect {
                x: num("x"),
                y: num("y"),
                size: (num("width"), num("height")),
                fill: attr("fill"),
            }
        })
        .collect()
}

#[test]
fn pngs_carry_the_signature_and_the_size_of_their_grid_of_panels() {
    let dir = tempfile::tempdir().unwrap();
    let one = vec![series("ties", &[(0.1, 0.5), (0.9, 0.6)])];
    let size = |n: usize| {
        let path = dir.path().join(format!("s{n}.PNG"));
        let panels: Vec<Panel> = (0..n)
            .map(|i| panel(&format!("p{i}"), one.clone()))
            .collect();
        scatter_panels(&path, "sweep", &panels).unwrap();
        png_size(&path)
    };
    let (s1, s3, s4, s5) = (size(1), size(3), size(4), size(5));
    assert!(s1.0 > 100 && s1.1 > 100, "{s1:?}");
    // Three panels to a row, but four as two by two; a row adds a panel's height.
    assert_eq!(s3, (3 * s1.0, s1.1));
    assert_eq!(s4.0, 2 * s1.0);
    assert_eq!(s5.0, 3 * s1.0);
    assert_eq!(s4.1, s5.1);
    assert!(s4.1 > s3.1 + s1.1 / 2, "{s4:?} vs {s3:?}");

    let path = dir.path().join("h.png");
    let small = sample_heatmap("small", &["a"], &["x"]);
    heatmap(&path, &small).unwrap();
    let (w1, h1) = png_size(&path);
    let big = sample_heatmap("big", &["a", "b", "c", "d"], &["x", "y", "z"]);
    heatmaps(&path, "", &[small.clone(), big]).unwrap();
    let (w2, h2) = png_size(&path);
    assert!(
        w2 > 2 * w1 && h2 > h1,
        "side by side, the taller one sets the height"
    );
}

#[test]
fn svgs_name_the_title_and_every_row_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.svg");
    let a = sample_heatmap(
        "first panel",
        &["row one", "row two"],
        &["alpha", "beta", "gamma"],
    );
    let b = sample_heatmap("second panel", &["r10", "r11"], &["delta", "epsilon"]);
    heatmaps(&path, "the figure", &[a.clone(), b.clone()]).unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    assert!(svg.starts_with("<svg"));
    for label in ["the figure", "first panel", "second panel"]
        .into_iter()
        .chain(a.rows.iter().chain(&a.columns).map(String::as_str))
        .chain(b.rows.iter().chain(&b.columns).map(String::as_str))
    {
        assert!(has_text(&svg, label), "`{label}` missing");
    }
    // The colour bar's ends.
    assert!(has_text(&svg, "0") && has_text(&svg, "1"));
    // Cell values are printed.
    assert!(has_text(&svg, "0.40"));
}

#[test]
fn svg_cells_are_filled_with_their_values_colour_in_row_major_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.svg");
    let values = vec![
        vec![Some(-0.8), Some(0.0), None],
        vec![Some(0.3), Some(f64::NAN), Some(2.5)],
    ];
    let panel = Heatmap {
        title: "cells".to_string(),
        rows: strings(&["a", "b"]),
        columns: strings(&["x", "y", "z"]),
        values: values.clone(),
        range: (-1.0, 1.0),
        colors: ColorMap::Diverging,
    };
    heatmap(&path, &panel).unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    let all = rects(&svg);
    // The cells are the only six rectangles of one size.
    let mut cells: Vec<&Rect> = Vec::new();
    for r in &all {
        if all.iter().filter(|o| o.size == r.size).count() == 6 {
            cells.push(r);
        }
    }
    assert_eq!(cells.len(), 6, "{all:?}");
    cells.sort_by_key(|r| (r.y, r.x));
    let expected: Vec<String> = values
        .iter()
        .flatten()
        .map(|v| {
            v.filter(|v| !v.is_nan())
                .map_or(EMPTY, |v| ColorMap::Diverging.color(v, (-1.0, 1.0)))
                .hex()
        })
        .collect();
    let fills: Vec<&str> = cells.iter().map(|r| r.fill.as_str()).collect();
    assert_eq!(fills, expected);
    // Out of range clamps to the end; the middle of the range is near white.
    assert_eq!(fills[5], ColorMap::Diverging.color(1.0, (-1.0, 1.0)).hex());
    assert_eq!(fills[1], "#F7F7F7");
    assert!(has_text(&svg, "no data"), "empty cells are explained");
}

#[test]
fn colour_maps_order_low_and_high_values() {
    let seq = ColorMap::Sequential;
    let (low, high) = (seq.color(0.1, (0.0, 1.0)), seq.color(0.9, (0.0, 1.0)));
    assert_ne!(low, high);
    assert!(low.luminance() < high.luminance(), "higher is brighter");
    let steps: Vec<_> = (0..=10).map(|i| seq.color(i as f64, (0.0, 10.0))).collect();
    for w in steps.windows(2) {
        assert!(w[0] != w[1] && w[0].luminance() < w[1].luminance());
    }
    let div = ColorMap::Diverging;
    let (neg, mid, pos) = (
        div.color(-0.9, (-1.0, 1.0)),
        div.color(0.0, (-1.0, 1.0)),
        div.color(0.9, (-1.0, 1.0)),
    );
    assert!(neg.2 > neg.0, "negative is blue: {neg:?}");
    assert!(pos.0 > pos.2, "positive is red: {pos:?}");
    assert!(mid.luminance() > neg.luminance() && mid.luminance() > pos.luminance());
}

#[test]
fn unknown_extensions_are_errors_naming_the_file_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let h = sample_heatmap("h", &["a"], &["x"]);
    let p = panel("x", vec![series("m", &[(0.0, 1.0)])]);
    for name in ["plot.jpg", "plot.svg.txt", "plot"] {
        let path = dir.path().join(name);
        for err in [
            heatmap(&path, &h).unwrap_err(),
            scatter_panels(&path, "t", std::slice::from_ref(&p)).unwrap_err(),
        ] {
            let message = err.to_string();
            assert!(message.contains(name), "{message}");
            assert!(
                message.contains(".png") && message.contains(".svg"),
                "{message}"
            );
        }
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn empty_matrices_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.png");
    let no_rows = Heatmap {
        title: "nothing".to_string(),
        rows: vec![],
        columns: strings(&["x"]),
        values: vec![],
        range: (0.0, 1.0),
        colors: ColorMap::Sequential,
    };
    let no_columns = Heatmap {
        rows: strings(&["a"]),
        columns: vec![],
        values: vec![vec![]],
        ..no_rows.clone()
    };
    for h in [no_rows, no_columns] {
        let message = heatmap(&path, &h).unwrap_err().to_string();
        assert!(
            message.contains("`nothing` is empty") && message.contains("h.png"),
            "{message}"
        );
    }
    let message = heatmaps(&path, "t", &[]).unwrap_err().to_string();
    assert!(message.contains("no heatmap"), "{message}");
    assert!(!path.exists());
}

#[test]
fn scatter_survives_degenerate_ranges_and_skips_non_finite_points() {
    let dir = tempfile::tempdir().unwrap();
    let panels = vec![
        panel(
            "density",
            vec![
                series("ties", &[(0.5, 0.1), (0.5, 0.3), (f64::NAN, 0.2)]),
                series("dare", &[(0.5, 0.2), (0.5, f64::INFINITY)]),
            ],
        ),
        panel("lambda", vec![series("ties", &[(1.0, 0.7)])]),
        panel("gamma", vec![series("caci", &[(f64::NAN, f64::NAN)])]),
        panel("empty", vec![]),
    ];
    for name in ["s.svg", "s.png"] {
        scatter_panels(&dir.path().join(name), "degenerate", &panels).unwrap();
    }
    let svg = std::fs::read_to_string(dir.path().join("s.svg")).unwrap();
    for label in [
        "degenerate",
        "density",
        "lambda",
        "gamma",
        "score",
        "ties",
        "dare",
        "caci",
    ] {
        assert!(has_text(&svg, label), "`{label}` missing");
    }
    assert!(
        has_text(&svg, "no data"),
        "the panels without points say so"
    );
    // One marker per finite point (4) and one per legend entry (3).
    assert_eq!(svg.matches("<circle").count(), 4 + 3);
    // Each series keeps its colour across panels: `ties` is the first colour in both.
    let ties = mmx::plot::Rgb(0x00, 0x72, 0xB2).hex();
    assert!(svg.matches(&format!("fill=\"{ties}\"")).count() >= 4);
}

#[test]
fn conflicts_plot_names_the_module_types_layers_and_experts() {
    let work = tempfile::tempdir().unwrap();
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/quickstart.toml");
    let recipe = recipe.to_str().unwrap();
    let out = mmx(&["conflicts", recipe, "--plot", "out.svg"], work.path());
    assert_ok(&out);
    let svg = std::fs::read_to_string(work.path().join("out.svg")).unwrap();
    for label in [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "layer 0",
        "cardiology",
        "radiology",
        "pathology",
        "dermatology",
        "sign-conflict rate",
    ] {
        assert!(has_text(&svg, label), "`{label}` missing");
    }
    // The cosine diagonal is 1 and drawn in the top colour of the diverging map.
    let top = ColorMap::Diverging.color(1.0, (-1.0, 1.0)).hex();
    assert!(svg.matches(&format!("fill=\"{top}\"")).count() >= 4);

    let out = mmx(&["conflicts", recipe, "--plot", "out.png"], work.path());
    assert_ok(&out);
    let (w, h) = png_size(&work.path().join("out.png"));
    assert!(w > 400 && h > 200, "{w}×{h}");
}

#[test]
fn conflicts_refuses_a_plot_it_cannot_write_before_analysing() {
    let work = tempfile::tempdir().unwrap();
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/quickstart.toml");
    let out = mmx(
        &["conflicts", recipe.to_str().unwrap(), "--plot", "out.gif"],
        work.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("out.gif") && stderr.contains(".svg"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "refused before printing the report");
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
}
