//! Small SVG line charts of a stage's curves (loss, learning rate, held-out accuracy), written at the end
//! of every stage from metrics.jsonl.

use anyhow::Result;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One panel: `title` and its (x, y) points.
fn panel(svg: &mut String, x0: f64, y0: f64, w: f64, h: f64, title: &str, pts: &[(f64, f64)]) {
    let _ = write!(svg, r##"<g><rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>"##);
    let _ = write!(svg, r##"<text x="{}" y="{}" font-size="13" font-family="sans-serif">{title}</text>"##, x0 + 4.0, y0 - 6.0);
    if pts.is_empty() {
        svg.push_str("</g>");
        return;
    }
    let (xmin, xmax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (ymin, ymax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (xs, ys) = ((xmax - xmin).max(1e-12), (ymax - ymin).max(1e-12));
    let px = |x: f64| x0 + 40.0 + (x - xmin) / xs * (w - 50.0);
    let py = |y: f64| y0 + h - 20.0 - (y - ymin) / ys * (h - 30.0);
    let path: Vec<String> = pts.iter().map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1))).collect();
    let _ = write!(svg, r##"<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{}"/>"##, path.join(" "));
    if pts.len() < 30 {
        for p in pts {
            let _ = write!(svg, r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="#1f77b4"/>"##, px(p.0), py(p.1));
        }
    }
    let fs = r#"font-size="10" font-family="sans-serif""#;
    let _ = write!(svg, r#"<text x="{}" y="{}" {fs}>{ymax:.4}</text><text x="{}" y="{}" {fs}>{ymin:.4}</text>"#, x0 + 2.0, y0 + 12.0, x0 + 2.0, y0 + h - 22.0);
    let _ = write!(svg, r#"<text x="{}" y="{}" {fs}>step {xmin}</text><text x="{}" y="{}" {fs} text-anchor="end">step {xmax}</text></g>"#, x0 + 40.0, y0 + h - 6.0, x0 + w - 4.0, y0 + h - 6.0);
}

/// Writes `OUTPUT/plots/NN-NAME.svg` for stage `index` and returns its path.
pub fn stage_plot(output: &Path, index: usize, name: &str) -> Result<PathBuf> {
    let text = std::fs::read_to_string(output.join("metrics.jsonl")).unwrap_or_default();
    let rows: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).filter(|v: &Value| v["stage"].as_u64() == Some(index as u64)).collect();
    let series = |key: &str| -> Vec<(f64, f64)> {
        rows.iter().filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?))).collect()
    };
    let panels: Vec<(&str, Vec<(f64, f64)>)> = [("loss", "training loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"), ("eval_loss", "held-out loss"), ("eval_accuracy", "held-out accuracy")]
        .iter()
        .map(|(k, t)| (*t, series(k)))
        .filter(|(_, p)| !p.is_empty())
        .collect();
    let (w, h) = (420.0, 220.0);
    let height = 30.0 + panels.len() as f64 * (h + 30.0);
    let mut svg = format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" viewBox="0 0 {} {height}">"#, w + 20.0, w + 20.0);
    let _ = write!(svg, r#"<text x="10" y="18" font-size="15" font-family="sans-serif">stage {} ({name})</text>"#, index + 1);
    for (i, (title, pts)) in panels.iter().enumerate() {
        panel(&mut svg, 10.0, 50.0 + i as f64 * (h + 30.0), w, h, title, pts);
    }
    svg.push_str("</svg>\n");
    let dir = output.join("plots");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{:02}-{name}.svg", index + 1));
    model::weights::write_atomic(&path, svg.as_bytes())?;
    Ok(path)
}
