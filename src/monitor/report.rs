//! The end-of-run report: `report.json` (deployment, every node with its phase sequence and
//! rate history, the aggregate samples) and three SVG charts drawn with plotters' SVG backend —
//! `node-rates.svg` (download rate per node over time), `aggregate.svg` (the nodes' total
//! download and upload and the seed's upload over time) and `timeline.svg` (each node's phases
//! as coloured bars) — in `<report_dir>/<UTC timestamp>/`. The latest is named in
//! `<report_dir>/latest`.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;

use super::Shared;
use super::node::Node;
use super::registry::{Deployment, Sample};
use crate::types::node_api::Phase;

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file or directory could not be written.
    #[error("writing {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// plotters failed to draw a chart.
    #[error("drawing {path}: {message}")]
    Draw {
        /// The chart.
        path: PathBuf,
        /// plotters' error, in words.
        message: String,
    },
    /// The writer task died.
    #[error("report task: {0}")]
    Task(String),
}

/// One node in the report: its state plus its rate history.
#[derive(Debug, Clone, Serialize)]
pub struct NodeRecord {
    /// The node as the API shows it.
    #[serde(flatten)]
    pub node: Node,
    /// `[ms, bytes/s]` samples.
    pub rates: Vec<(u64, u64)>,
}

/// Everything the report holds, captured under one lock.
#[derive(Debug, Clone, Serialize)]
pub struct ReportData {
    /// The aggregate at capture time.
    pub deployment: Deployment,
    /// Every node.
    pub nodes: Vec<NodeRecord>,
    /// Aggregate samples.
    pub samples: Vec<Sample>,
}

impl ReportData {
    /// A copy of the registry's state now.
    pub fn capture(s: &Shared) -> ReportData {
        let deployment = s.deployment();
        let r = s.lock();
        let nodes = r.nodes().map(|n| NodeRecord { node: n.clone(), rates: n.rate_history.iter().copied().collect() }).collect();
        let samples = r.samples().iter().copied().collect();
        ReportData { deployment, nodes, samples }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Write { path: path.to_owned(), source }
}

/// `YYYYmmddTHHMMSSZ` for a Unix time in ms (UTC, no time zone data needed).
pub fn timestamp(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (H. Hinnant's algorithm), proleptic Gregorian.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Writes the report into a new `<dir>/<timestamp>/` and points `<dir>/latest` at it.
///
/// # Errors
/// A directory or file could not be written, or a chart could not be drawn.
pub fn write(dir: &Path, data: &ReportData) -> Result<PathBuf, ReportError> {
    let mut out = dir.join(timestamp(data.deployment.now_ms));
    let mut i = 1;
    while out.exists() {
        i += 1;
        out = dir.join(format!("{}-{i}", timestamp(data.deployment.now_ms)));
    }
    std::fs::create_dir_all(&out).map_err(io(&out))?;
    let json = out.join("report.json");
    let bytes = serde_json::to_vec_pretty(data).map_err(|e| ReportError::Write { path: json.clone(), source: e.into() })?;
    std::fs::write(&json, bytes).map_err(io(&json))?;
    let t0 = data.deployment.started_ms;
    node_rates(&out.join("node-rates.svg"), data, t0)?;
    aggregate(&out.join("aggregate.svg"), data, t0)?;
    timeline(&out.join("timeline.svg"), data, t0)?;
    // Each node's installer console, kept with the report.
    let with_console: Vec<_> = data.nodes.iter().filter(|n| !n.node.console.is_empty()).collect();
    if !with_console.is_empty() {
        let dir = out.join("consoles");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        for n in with_console {
            let f = dir.join(format!("{}.log", n.node.mac.hyphenated()));
            std::fs::write(&f, n.node.console_text()).map_err(io(&f))?;
        }
    }
    let latest = dir.join("latest");
    let tmp = dir.join(".latest.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(out.file_name().unwrap_or_default(), &tmp).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &latest).map_err(io(&latest))?;
    Ok(out)
}

/// The most recent report under `dir` (`latest`, else the newest timestamped directory).
pub fn latest(dir: &Path) -> Option<PathBuf> {
    if let Ok(p) = std::fs::canonicalize(dir.join("latest")) {
        return Some(p);
    }
    let mut names: Vec<_> = std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.join("report.json").is_file()).collect();
    names.sort();
    names.pop()
}

fn draw_err(path: &Path) -> impl Fn(String) -> ReportError + '_ {
    move |message| ReportError::Draw { path: path.to_owned(), message }
}

const MB: f64 = 1_000_000.0;

fn secs(ms: u64, t0: u64) -> f64 {
    ms.saturating_sub(t0) as f64 / 1000.0
}

fn node_rates(path: &Path, data: &ReportData, t0: u64) -> Result<(), ReportError> {
    let e = draw_err(path);
    let xmax = data.samples.last().map_or(1.0, |s| secs(s.at_ms, t0)).max(1.0);
    let ymax = data.nodes.iter().flat_map(|n| n.rates.iter().map(|r| r.1)).max().unwrap_or(0) as f64 / MB;
    let root = SVGBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Download rate per node", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..xmax, 0.0..(ymax * 1.1).max(0.1))
        .map_err(|x| e(x.to_string()))?;
    chart.configure_mesh().x_desc("seconds since start").y_desc("MB/s").draw().map_err(|x| e(x.to_string()))?;
    for (i, n) in data.nodes.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts = n.rates.iter().map(|&(t, r)| (secs(t, t0), r as f64 / MB));
        chart.draw_series(LineSeries::new(pts, color.stroke_width(1))).map_err(|x| e(x.to_string()))?;
    }
    root.present().map_err(|x| e(x.to_string()))
}

fn aggregate(path: &Path, data: &ReportData, t0: u64) -> Result<(), ReportError> {
    let e = draw_err(path);
    let xmax = data.samples.last().map_or(1.0, |s| secs(s.at_ms, t0)).max(1.0);
    let ymax = data.samples.iter().map(|s| s.down_bps.max(s.up_bps).max(s.seed_bps)).max().unwrap_or(0) as f64 / MB;
    let root = SVGBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let caption = match data.deployment.seed_share {
        Some(s) => format!("Aggregate bandwidth (seed upload share {:.0}%)", s * 100.0),
        None => "Aggregate bandwidth".to_owned(),
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..xmax, 0.0..(ymax * 1.1).max(0.1))
        .map_err(|x| e(x.to_string()))?;
    chart.configure_mesh().x_desc("seconds since start").y_desc("MB/s").draw().map_err(|x| e(x.to_string()))?;
    let series: [(&str, RGBColor, fn(&Sample) -> u64); 3] = [
        ("nodes download", BLUE, |s| s.down_bps),
        ("nodes upload", GREEN, |s| s.up_bps),
        ("seed upload", RED, |s| s.seed_bps),
    ];
    for (label, color, f) in series {
        let pts = data.samples.iter().map(|s| (secs(s.at_ms, t0), f(s) as f64 / MB));
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|x| e(x.to_string()))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))
}

/// The colour of a phase (the dashboard uses the same ones).
pub fn phase_color(p: Phase) -> RGBColor {
    match p {
        Phase::Dhcp => RGBColor(0x9e, 0x9e, 0x9e),
        Phase::BootFiles => RGBColor(0x79, 0x86, 0xcb),
        Phase::Installer => RGBColor(0x4d, 0xb6, 0xac),
        Phase::Partitioning => RGBColor(0xff, 0xb7, 0x4d),
        Phase::Downloading => RGBColor(0x42, 0xa5, 0xf5),
        Phase::Configuring => RGBColor(0xba, 0x68, 0xc8),
        Phase::BootLoader => RGBColor(0xa1, 0x88, 0x7f),
        Phase::Seeding => RGBColor(0x66, 0xbb, 0x6a),
        Phase::Done => RGBColor(0x2e, 0x7d, 0x32),
        Phase::Failed => RGBColor(0xe5, 0x39, 0x35),
    }
}

fn timeline(path: &Path, data: &ReportData, t0: u64) -> Result<(), ReportError> {
    let e = draw_err(path);
    let end = data.deployment.now_ms;
    let xmax = secs(end, t0).max(1.0);
    let n = data.nodes.len().max(1);
    let h = (140 + 16 * n).min(8000) as u32;
    let root = SVGBackend::new(path, (1000, h)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    // The chart above, the phase legend in a strip below it (not over the bars).
    let (upper, lower) = root.split_vertically(h - 30);
    let mut chart = ChartBuilder::on(&upper)
        .caption("Phase timeline per node", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(140)
        .build_cartesian_2d(0.0..xmax, (0..n).into_segmented())
        .map_err(|x| e(x.to_string()))?;
    let labels: Vec<String> = data.nodes.iter().map(|r| r.node.hostname.clone().unwrap_or_else(|| r.node.mac.to_string())).collect();
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_labels(n.min(60))
        .y_label_formatter(&|y| match y {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .disable_y_mesh()
        .draw()
        .map_err(|x| e(x.to_string()))?;
    let mut bars = Vec::new();
    for (i, r) in data.nodes.iter().enumerate() {
        let st = &r.node.phases;
        for (k, p) in st.iter().enumerate() {
            let until = st.get(k + 1).map_or(end, |q| q.at_ms);
            let (x0, x1) = (secs(p.at_ms, t0), secs(until, t0).max(secs(p.at_ms, t0) + 0.05));
            bars.push(Rectangle::new([(x0, SegmentValue::Exact(i)), (x1, SegmentValue::Exact(i + 1))], phase_color(p.phase).filled()));
        }
    }
    chart.draw_series(bars).map_err(|x| e(x.to_string()))?;
    for (k, p) in Phase::ALL.iter().enumerate() {
        let x = 20 + 97 * k as i32;
        lower.draw(&Rectangle::new([(x, 8), (x + 12, 20)], phase_color(*p).filled())).map_err(|x| e(x.to_string()))?;
        lower.draw(&Text::new(p.as_str(), (x + 16, 8), ("sans-serif", 12))).map_err(|x| e(x.to_string()))?;
    }
    root.present().map_err(|x| e(x.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_civil_dates() {
        assert_eq!(timestamp(0), "19700101T000000Z");
        assert_eq!(timestamp(1_795_320_000_000), "20261122T040000Z");
        assert_eq!(timestamp(951_782_400_000), "20000229T000000Z");
    }
}
