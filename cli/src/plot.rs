//! `bert2bert plot JOB_OR_LOGDIR --out curves.png`: the loss curves of a job's TensorBoard event
//! files, drawn to a PNG without TensorBoard.
//!
//! One panel per tag group (loss train + eval, learning rate, gradient norm, tokens/s,
//! BLEU/ROUGE), on one step axis. plotters draws the lines; axes, ticks, grid and labels are
//! drawn here, the labels with the bitmap font of `font` (no system font needed).

mod font;

use std::path::{Path, PathBuf};

use model::job::JobSpec;
use plotters::coord::Shift;
use plotters::prelude::*;
use worker::tensorboard::{Scalar, event_files, read_scalars};

use crate::{CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// A job file (its `logging.dir` is read) or a directory of event files.
    job_or_logdir: PathBuf,
    /// The PNG to write.
    #[arg(long, default_value = "curves.png", value_name = "FILE")]
    out: PathBuf,
    #[arg(long, default_value_t = 1200)]
    width: u32,
    #[arg(long, default_value_t = 900)]
    height: u32,
}

/// A panel: its title and its tags, each with its legend name and colour.
struct Group {
    title: &'static str,
    tags: &'static [(&'static str, &'static str, RGBColor)],
}

const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(230, 110, 10);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const RED: RGBColor = RGBColor(214, 39, 40);
const PURPLE: RGBColor = RGBColor(148, 103, 189);
const INK: RGBColor = RGBColor(40, 40, 40);
const GRID: RGBColor = RGBColor(225, 225, 225);

const GROUPS: &[Group] = &[
    Group { title: "loss", tags: &[("train/loss", "train", BLUE), ("eval/loss", "eval", ORANGE)] },
    Group { title: "learning rate", tags: &[("train/lr", "train/lr", GREEN)] },
    Group { title: "grad norm", tags: &[("train/grad_norm", "train/grad_norm", RED)] },
    Group { title: "tokens/s", tags: &[("train/tokens_per_s", "train/tokens_per_s", PURPLE)] },
    Group {
        title: "BLEU / ROUGE",
        tags: &[
            ("eval/bleu", "BLEU", BLUE),
            ("eval/rouge1", "R-1", ORANGE),
            ("eval/rouge2", "R-2", GREEN),
            ("eval/rougeL", "R-L", RED),
        ],
    },
];

const TEXT_SCALE: i32 = 2;

pub fn run(a: Args) -> CliResult {
    if !(200..=10_000).contains(&a.width) || !(150..=10_000).contains(&a.height) {
        return Err(CliError::usage("--width must be in 200..=10000 and --height in 150..=10000"));
    }
    let (dir, title) = log_dir(&a.job_or_logdir)?;
    if !dir.is_dir() {
        return Err(CliError::usage(format!("{}: no such log directory (has the job trained yet?)", dir.display())));
    }
    let files = event_files(&dir).map_err(|e| CliError::usage(format!("{}: {e}", dir.display())))?;
    if files.is_empty() {
        return Err(CliError::usage(format!("{}: no TensorBoard event files (events.out.tfevents.*)", dir.display())));
    }
    let (scalars, warnings) = read_scalars(&dir).map_err(CliError::usage)?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let curves = curves(&scalars);
    if curves.iter().all(|g| g.iter().all(|(_, _, points)| points.is_empty())) {
        return Err(CliError::usage(format!("{}: the event files hold none of the training scalars", dir.display())));
    }
    draw(&a.out, (a.width, a.height), &title, &curves)?;
    eprintln!(
        "wrote {} ({} points from {} event files in {})",
        a.out.display(),
        scalars.len(),
        files.len(),
        dir.display()
    );
    Ok(())
}

/// The directory of event files, and a title for the figure.
fn log_dir(arg: &Path) -> CliResult<(PathBuf, String)> {
    if arg.is_dir() {
        let name = std::path::absolute(arg).ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        return Ok((arg.to_path_buf(), name.unwrap_or_else(|| arg.display().to_string())));
    }
    if !arg.exists() {
        return Err(CliError::usage(format!("{}: no such job file or log directory", arg.display())));
    }
    let job = JobSpec::from_file(arg)?;
    Ok((job.logging.dir, job.name))
}

/// A group's curves: (legend name, colour, points sorted by step) for each of its tags.
type Curves = Vec<(&'static str, RGBColor, Vec<(f64, f64)>)>;

fn curves(scalars: &[Scalar]) -> Vec<Curves> {
    GROUPS
        .iter()
        .map(|g| {
            g.tags
                .iter()
                .map(|&(tag, name, colour)| {
                    let mut points: Vec<(f64, f64)> = scalars
                        .iter()
                        .filter(|s| s.tag == tag && s.value.is_finite())
                        .map(|s| (s.step as f64, s.value as f64))
                        .collect();
                    // Stable: of equal steps (a step logged twice), the later one wins.
                    points.sort_by(|a, b| a.0.total_cmp(&b.0));
                    points.dedup_by(|later, earlier| {
                        let same = later.0 == earlier.0;
                        if same {
                            *earlier = *later;
                        }
                        same
                    });
                    (name, colour, points)
                })
                .collect()
        })
        .collect()
}

/// About `want` round ticks (1, 2 or 5 times a power of ten) covering [lo, hi], and the step.
pub fn nice_ticks(lo: f64, hi: f64, want: usize) -> (Vec<f64>, f64) {
    let span = (hi - lo).abs().max(f64::MIN_POSITIVE);
    let rough = span / want.max(1) as f64;
    let magnitude = 10f64.powf(rough.log10().floor());
    // The round step whose tick count comes closest to `want`.
    let misses = |s: f64| (span / s - want as f64).abs();
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .min_by(|a, b| misses(*a).total_cmp(&misses(*b)))
        .unwrap_or(magnitude);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    let ticks = (first..=last).map(|i| i as f64 * step).map(|t| if t.abs() < step * 1e-9 { 0.0 } else { t }).collect();
    (ticks, step)
}

/// The labels of an axis's ticks, `step` apart: plain decimals with as many places as the step
/// needs or, when the largest tick is below 1e-3 or from 1e6 up, one power of ten for all
/// (`1.5E-4`), so that the labels of one axis look alike.
pub fn tick_labels(ticks: &[f64], step: f64) -> Vec<String> {
    let largest = ticks.iter().fold(0f64, |m, t| m.max(t.abs()));
    let step_exp = step.log10().floor();
    if largest > 0.0 && !(1e-3..1e6).contains(&largest) {
        let exp = largest.log10().floor() as i32;
        let places = (exp as f64 - step_exp).clamp(0.0, 15.0) as usize;
        let label = |v: f64| if v == 0.0 { "0".into() } else { format!("{:.places$}E{exp}", v / 10f64.powi(exp)) };
        return ticks.iter().map(|&v| label(v)).collect();
    }
    let places = (-step_exp).clamp(0.0, 15.0) as usize;
    ticks.iter().map(|&v| if v == 0.0 { "0".into() } else { format!("{v:.places$}") }).collect()
}

/// [lo, hi] with a margin, never empty; data that is never negative (scores, rates, norms) gets
/// no negative ticks.
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    let (a, b) = if hi > lo {
        let pad = (hi - lo) * 0.06;
        (lo - pad, hi + pad)
    } else if lo == 0.0 {
        (0.0, 1.0)
    } else {
        (lo - lo.abs() * 0.1, hi + hi.abs() * 0.1)
    };
    if lo >= 0.0 && a < 0.0 { (-(b * 0.03), b) } else { (a, b) }
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn text(root: &Area, s: &str, at: (i32, i32), scale: i32, colour: &RGBColor) {
    for p in font::pixels(s, at, scale) {
        // A pixel outside the image is clipped, which is what we want.
        let _ = root.draw_pixel(p, colour);
    }
}

fn draw(out: &Path, size: (u32, u32), title: &str, groups: &[Curves]) -> CliResult {
    let root = BitMapBackend::new(out, size).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<_>| CliError::failure(format!("drawing {}: {e}", out.display()));
    root.fill(&WHITE).map_err(err)?;
    let heading = format!("{title}: training curves");
    text(&root, &heading, ((size.0 as i32 - font::text_width(&heading, 3)) / 2, 14), 3, &INK);
    let (_, body) = root.split_vertically(24 + font::HEIGHT * 3);
    let shown: Vec<(&Group, &Curves)> =
        GROUPS.iter().zip(groups).filter(|(_, c)| c.iter().any(|(_, _, p)| !p.is_empty())).collect();
    let cols = if shown.len() > 1 { 2 } else { 1 };
    let rows = shown.len().div_ceil(cols);
    let all_steps = groups.iter().flatten().flat_map(|(_, _, p)| p.iter().map(|q| q.0));
    let (x_lo, x_hi) = all_steps.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    let (x_lo, x_hi) = if x_hi > x_lo { (x_lo, x_hi) } else { (x_lo - 1.0, x_hi + 1.0) };
    for (area, (group, curves)) in body.split_evenly((rows, cols)).iter().zip(shown) {
        panel(&root, area, group, curves, (x_lo, x_hi)).map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

type DrawResult = Result<(), DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

/// One group's panel in `area`: grid, curves, frame, ticks with labels, title and legend.
fn panel(root: &Area, area: &Area, group: &Group, curves: &Curves, (x_lo, x_hi): (f64, f64)) -> DrawResult {
    let glyph_h = font::HEIGHT * TEXT_SCALE;
    let (area_w, area_h) = area.dim_in_pixel();
    let (top, bottom) = (glyph_h * 2 + 12, glyph_h * 2 + 20);
    let values = curves.iter().flat_map(|(_, _, p)| p.iter().map(|q| q.1));
    let (y_lo, y_hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| (a.min(y), b.max(y)));
    let (y_lo, y_hi) = padded(y_lo, y_hi);
    // About one tick per 35 pixels of height and 100 of width.
    let y_want = ((area_h as i32 - top - bottom) / 35).clamp(2, 8) as usize;
    let (y_ticks, y_step) = nice_ticks(y_lo, y_hi, y_want);
    let labels = tick_labels(&y_ticks, y_step);
    let label_w = labels.iter().map(|l| font::text_width(l, TEXT_SCALE)).max().unwrap_or(0);
    let mut chart = ChartBuilder::on(area)
        .margin_top(top)
        .margin_bottom(bottom)
        .margin_left(label_w + 22)
        .margin_right(24)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)?;
    let x_want = ((area_w as i32 - label_w - 46) / 100).clamp(2, 8) as usize;
    let (x_ticks, x_step) = nice_ticks(x_lo, x_hi, x_want);
    let grid =
        x_ticks.iter().map(|&x| vec![(x, y_lo), (x, y_hi)]).chain(y_ticks.iter().map(|&y| vec![(x_lo, y), (x_hi, y)]));
    chart.draw_series(grid.map(|line| PathElement::new(line, GRID.stroke_width(1))))?;
    for (_, colour, points) in curves {
        chart.draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2)))?;
        // Sparse curves (evaluations) get a dot at each point.
        if points.len() <= 60 {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
        }
    }
    let (px, py) = chart.plotting_area().get_pixel_range();
    root.draw(&Rectangle::new([(px.start, py.start), (px.end, py.end)], INK.stroke_width(1)))?;
    for (&y, label) in y_ticks.iter().zip(&labels) {
        let (_, ty) = chart.backend_coord(&(x_lo, y));
        root.draw(&PathElement::new(vec![(px.start - 5, ty), (px.start, ty)], INK.stroke_width(1)))?;
        let w = font::text_width(label, TEXT_SCALE);
        text(root, label, (px.start - 9 - w, ty - glyph_h / 2), TEXT_SCALE, &INK);
    }
    let mut last_right = i32::MIN;
    for (&x, label) in x_ticks.iter().zip(tick_labels(&x_ticks, x_step)) {
        let (tx, _) = chart.backend_coord(&(x, y_lo));
        root.draw(&PathElement::new(vec![(tx, py.end), (tx, py.end + 5)], INK.stroke_width(1)))?;
        let w = font::text_width(&label, TEXT_SCALE);
        // Skip a label that would run into the previous one.
        if tx - w / 2 > last_right + 8 {
            text(root, &label, (tx - w / 2, py.end + 9), TEXT_SCALE, &INK);
            last_right = tx + w / 2;
        }
    }
    let step_w = font::text_width("step", TEXT_SCALE);
    text(root, "step", ((px.start + px.end - step_w) / 2, py.end + 15 + glyph_h), TEXT_SCALE, &INK);

    // Title left and legend right above the plot. Where they would collide the legend uses the
    // small font, and where even that is too wide, the legend stands alone.
    let legend: Vec<_> = curves.iter().rev().filter(|(_, _, p)| !p.is_empty()).collect();
    let legend_w = |scale| legend.iter().map(|(n, _, _)| font::text_width(n, scale) + 34).sum::<i32>();
    let room = px.end - px.start - font::text_width(group.title, TEXT_SCALE) - 16;
    let scale = if legend_w(TEXT_SCALE) <= room { TEXT_SCALE } else { 1 };
    let label_y = py.start - glyph_h - 10;
    if legend_w(scale) <= room {
        text(root, group.title, (px.start, label_y), TEXT_SCALE, &INK);
    }
    let mut right = px.end;
    for (name, colour, points) in legend {
        let w = font::text_width(name, scale);
        let y = label_y + (glyph_h - font::HEIGHT * scale) / 2;
        text(root, name, (right - w, y), scale, colour);
        let mid = y + font::HEIGHT * scale / 2;
        root.draw(&PathElement::new(vec![(right - w - 26, mid), (right - w - 6, mid)], colour.stroke_width(3)))?;
        if points.len() <= 60 {
            root.draw(&Circle::new((right - w - 16, mid), 3, colour.filled()))?;
        }
        right -= w + 34;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        for i in 0..200 {
            let a = kernels::rng::normal(seed, 2 * i) as f64 * 10f64.powi((i % 13) as i32 - 6);
            // Spans from 1e-5 to 1e5, but not below what an f64 label of `a` can resolve.
            let span = (kernels::rng::normal(seed, 2 * i + 1) as f64).abs() * 10f64.powi((i % 11) as i32 - 5);
            let b = a + span.max(a.abs() * 1e-9).max(1e-12);
            let (ticks, step) = nice_ticks(a, b, 5);
            assert!((2..=12).contains(&ticks.len()), "{a}..{b}: {ticks:?} (seed {seed})");
            assert!(ticks.iter().all(|t| *t >= a - step * 1e-9 && *t <= b + step * 1e-9), "{a}..{b}: {ticks:?}");
            let mantissa = step / 10f64.powf(step.log10().floor());
            assert!([1.0, 2.0, 5.0].iter().any(|m| (m - mantissa).abs() < 1e-9), "step {step}");
            // Labels of neighbouring ticks differ: enough places are shown.
            let labels = tick_labels(&ticks, step);
            assert!(labels.windows(2).all(|w| w[0] != w[1]), "{labels:?}");
        }
        assert_eq!(nice_ticks(0.0, 10.0, 5).0, vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(tick_labels(&[2.0, 2.5, 3.0], 0.5), ["2.0", "2.5", "3.0"]);
        assert_eq!(tick_labels(&[0.0, 200.0, 400.0], 200.0), ["0", "200", "400"]);
        assert_eq!(tick_labels(&[0.0, 5e-5, 1e-4, 1.5e-4], 5e-5), ["0", "0.5E-4", "1.0E-4", "1.5E-4"]);
        assert_eq!(tick_labels(&[0.0, 5e-4, 1e-3], 5e-4), ["0", "0.0005", "0.0010"]);
        assert_eq!(tick_labels(&[1e6, 2e6], 1e6), ["1E6", "2E6"]);
    }
}
