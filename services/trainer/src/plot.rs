//! The loss curve of a run as a PNG, drawn from its log: training loss per step (and its moving
//! average) with the held-out evaluations on the same axes. Labels need a font; where the
//! machine has none of the usual TrueType files the chart is drawn without text.

use std::path::Path;

use plotters::prelude::*;

use crate::error::TrainerError;

/// Fonts tried for labels, in order (Debian's fonts-dejavu-core, then Liberation).
const FONT_FILES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// A moving average over this many steps smooths the per-step loss (each step draws its own
/// block size and noise levels, so single steps scatter widely).
const SMOOTHING: usize = 25;

pub struct Curve {
    pub steps: Vec<(f64, f64)>,
    pub held_out_ar: Vec<(f64, f64)>,
    pub held_out_bound: Vec<(f64, f64)>,
}

/// Reads step losses and evaluations (nats per token) from a run's log.jsonl.
pub fn read_log(log: &Path) -> Result<Curve, TrainerError> {
    let text = std::fs::read_to_string(log).map_err(|e| TrainerError::file(log, e))?;
    let mut curve = Curve {
        steps: vec![],
        held_out_ar: vec![],
        held_out_bound: vec![],
    };
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| TrainerError::file(log, e))?;
        let step = v["step"].as_f64().unwrap_or(0.0);
        if let Some(loss) = v["loss"].as_f64() {
            curve.steps.push((step, loss));
        }
        if let Some(ar) = v["eval"]["ar_nats_per_token"].as_f64() {
            curve.held_out_ar.push((step, ar));
        }
        if let Some(b) = v["eval"]["diffusion_nats_per_token"].as_f64() {
            curve.held_out_bound.push((step, b));
        }
    }
    Ok(curve)
}

fn register_font() -> bool {
    for path in FONT_FILES {
        if let Ok(bytes) = std::fs::read(path) {
            // plotters keeps fonts for the life of the process; one leak per process at most.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

pub fn plot_loss(curve: &Curve, png: &Path, title: &str) -> Result<(), TrainerError> {
    let err = |e: &dyn std::fmt::Display| TrainerError::file(png, e);
    let labels = register_font();
    let root = BitMapBackend::new(png, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let max_step = curve.steps.last().map_or(1.0, |s| s.0).max(1.0);
    let mut values: Vec<f64> = curve.steps.iter().map(|s| s.1).collect();
    values.extend(curve.held_out_ar.iter().map(|s| s.1));
    values.extend(curve.held_out_bound.iter().map(|s| s.1));
    let top = values.iter().cloned().fold(0.0, f64::max).min(12.0) * 1.05;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(16);
    if labels {
        builder
            .caption(title, ("sans-serif", 22))
            .x_label_area_size(40)
            .y_label_area_size(56);
    }
    let mut chart = builder
        .build_cartesian_2d(0.0..max_step, 0.0..top.max(1.0))
        .map_err(|e| err(&e))?;
    let mut mesh = chart.configure_mesh();
    if labels {
        mesh.x_desc("optimizer step").y_desc("nats per token");
    } else {
        mesh.disable_x_mesh()
            .disable_y_mesh()
            .x_labels(0)
            .y_labels(0);
    }
    mesh.draw().map_err(|e| err(&e))?;
    let light = RGBColor(170, 190, 230);
    chart
        .draw_series(LineSeries::new(curve.steps.iter().copied(), &light))
        .map_err(|e| err(&e))?;
    let smooth: Vec<(f64, f64)> = curve
        .steps
        .iter()
        .enumerate()
        .map(|(i, &(s, _))| {
            let from = i.saturating_sub(SMOOTHING - 1);
            let window = &curve.steps[from..=i];
            (
                s,
                window.iter().map(|w| w.1).sum::<f64>() / window.len() as f64,
            )
        })
        .collect();
    let series = chart
        .draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))
        .map_err(|e| err(&e))?;
    if labels {
        series
            .label(format!("training loss ({SMOOTHING}-step mean)"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    }
    for (points, color, name) in [
        (&curve.held_out_ar, RED, "held-out AR (B = 1)"),
        (
            &curve.held_out_bound,
            GREEN,
            "held-out diffusion bound (B = 32)",
        ),
    ] {
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| err(&e))?;
        let series = chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?;
        if labels {
            series
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    if labels {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_becomes_a_png_with_its_steps_and_evaluations() {
        let dir = std::env::temp_dir().join(format!("sdlm-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log.jsonl");
        let mut text = String::new();
        for step in 1..=60 {
            text.push_str(&format!(
                "{{\"step\":{step},\"loss\":{}}}\n",
                8.0 / (step as f64).sqrt()
            ));
        }
        text.push_str(
            "{\"step\":30,\"eval\":{\"ar_nats_per_token\":3.0,\"diffusion_nats_per_token\":3.4}}\n",
        );
        std::fs::write(&log, text).unwrap();
        let curve = read_log(&log).unwrap();
        assert_eq!(curve.steps.len(), 60);
        assert_eq!(curve.held_out_ar, vec![(30.0, 3.0)]);
        assert_eq!(curve.held_out_bound, vec![(30.0, 3.4)]);
        let png = dir.join("loss.png");
        plot_loss(&curve, &png, "test").unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
