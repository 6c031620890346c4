//! A run's results: the summary table on stdout, `--json` for machines and
//! `--plot FILE.svg` for a chart of latency percentiles and throughput over
//! time.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::bail;
use plotters::prelude::*;
use serde::Serialize;

use crate::metrics::{Kind, Percentiles, Snapshot, Tick, Usage};

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    /// The command line, for reproducing the run.
    pub command: String,
    pub cpus: usize,
    pub cpu_model: String,
    /// How busy the machine was (all CPUs, percent) in the second before
    /// the run, with the relay idle: other work sharing the machine.
    pub machine_busy_before_percent: Option<f64>,
    pub server_url: String,
    pub server_pid: Option<u32>,
    /// Scenario parameters.
    pub params: serde_json::Value,
    pub rows: Vec<Row>,
    /// The headline numbers (ratios, per-connection memory, …).
    pub summary: BTreeMap<String, serde_json::Value>,
    pub notes: Vec<String>,
    /// Which latency the timeline chart shows.
    pub primary: Kind,
    pub timeline: Vec<Tick>,
}

/// One measured phase.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    /// "relay" or "baseline".
    pub target: String,
    /// The latency the table shows and the rate counts.
    pub primary: Kind,
    pub seconds: f64,
    /// Completed operations of the primary kind per second.
    pub rate_per_sec: f64,
    pub latency_ms: BTreeMap<Kind, Percentiles>,
    pub errors: BTreeMap<String, u64>,
    pub counts: BTreeMap<String, u64>,
    pub usage: Usage,
    /// Server CPU time per completed operation, in microseconds. Less
    /// sensitive than the rate to other work sharing the machine, so the
    /// number to compare between builds on a noisy box.
    pub server_cpu_us_per_op: Option<f64>,
    /// The generator's CPU time per completed operation, in microseconds:
    /// what the client side costs (the relay's client library, or raw
    /// sockets against the forwarders).
    pub generator_cpu_us_per_op: Option<f64>,
    /// CPU time per completed operation of each further named process (a
    /// cluster's nodes and its Redis), in microseconds.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub process_cpu_us_per_op: BTreeMap<String, f64>,
}

impl Row {
    pub fn new(name: &str, target: &str, primary: Kind, snap: &Snapshot, usage: Usage) -> Row {
        Row {
            name: name.to_owned(),
            target: target.to_owned(),
            primary,
            seconds: snap.seconds,
            rate_per_sec: snap.rate(primary),
            latency_ms: snap.latency_ms.clone(),
            errors: snap.errors.clone(),
            counts: snap.counts.clone(),
            usage,
            server_cpu_us_per_op: None,
            generator_cpu_us_per_op: None,
            process_cpu_us_per_op: BTreeMap::new(),
        }
        .with_cpu_per_op()
    }

    fn with_cpu_per_op(mut self) -> Row {
        self.server_cpu_us_per_op = match self.usage.server_cpu_percent {
            Some(cpu) if self.rate_per_sec > 0.0 => Some(cpu / 100.0 * 1e6 / self.rate_per_sec),
            _ => None,
        };
        let rate = self.rate_per_sec;
        self.generator_cpu_us_per_op =
            (rate > 0.0).then(|| self.usage.generator_cpu_percent / 100.0 * 1e6 / rate);
        self.process_cpu_us_per_op = match rate > 0.0 {
            true => self
                .usage
                .processes_cpu_percent
                .iter()
                .map(|(name, cpu)| (name.clone(), cpu / 100.0 * 1e6 / rate))
                .collect(),
            false => BTreeMap::new(),
        };
        self
    }

    /// A row whose rate is `count / seconds` for an operation counted
    /// outside the histograms (e.g. messages confirmed stored).
    pub fn with_rate(mut self, count: u64, seconds: f64) -> Row {
        self.seconds = seconds;
        self.rate_per_sec = if seconds > 0.0 {
            count as f64 / seconds
        } else {
            0.0
        };
        self.with_cpu_per_op()
    }

    /// Keeps only these latencies (rows that share a phase's snapshot show
    /// their own).
    pub fn only(mut self, kinds: &[Kind]) -> Row {
        self.latency_ms.retain(|k, _| kinds.contains(k));
        self
    }

    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

impl Report {
    pub fn print_table(&self) {
        println!();
        println!(
            "relay-bench {}  ({} CPUs, {})",
            self.scenario, self.cpus, self.cpu_model
        );
        println!("server {}", self.server_url);
        if let Some(busy) = self.machine_busy_before_percent {
            println!("machine busy before the run: {busy:.0}% of all CPUs (other work adds noise)");
        }
        println!(
            "{:<28} {:>8} {:>11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8}",
            "phase",
            "target",
            "rate/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "errors",
            "srv CPU%",
            "srv µs/op",
            "srv MiB",
            "gen CPU%",
            "pg CPU%",
            "machine%"
        );
        for row in &self.rows {
            let p = row
                .latency_ms
                .get(&row.primary)
                .cloned()
                .unwrap_or_default();
            println!(
                "{:<28} {:>8} {:>11.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.2} {:>7} {:>8} {:>9} {:>8} {:>8.0} {:>8.0} {:>8}",
                row.name,
                row.target,
                row.rate_per_sec,
                p.p50,
                p.p90,
                p.p99,
                p.p999,
                p.max,
                row.error_total(),
                row.usage
                    .server_cpu_percent
                    .map_or("-".into(), |c| format!("{c:.0}")),
                row.server_cpu_us_per_op
                    .map_or("-".into(), |us| format!("{us:.2}")),
                row.usage
                    .server_rss_end_kib
                    .map_or("-".into(), |r| format!("{:.1}", r as f64 / 1024.0)),
                row.usage.generator_cpu_percent,
                row.usage.postgres_cpu_percent,
                row.usage
                    .machine_busy_percent
                    .map_or("-".into(), |m| format!("{m:.0}")),
            );
            for (kind, p) in &row.latency_ms {
                if *kind != row.primary && p.count > 0 {
                    println!(
                        "{:<28} {:>8} {:>11} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.2}   ({} latency, {} samples)",
                        "",
                        "",
                        "",
                        p.p50,
                        p.p90,
                        p.p99,
                        p.p999,
                        p.max,
                        kind_name(*kind),
                        p.count
                    );
                }
            }
            for (name, cpu) in &row.usage.processes_cpu_percent {
                println!(
                    "{:<28} {:>8} {:>11}   {name}: {cpu:.0}% CPU, {} µs/op",
                    "",
                    "",
                    "",
                    row.process_cpu_us_per_op
                        .get(name)
                        .map_or("-".into(), |us| format!("{us:.2}")),
                );
            }
            for (what, n) in &row.errors {
                println!("{:<28} error: {what} × {n}", "");
            }
        }
        if !self.summary.is_empty() {
            println!();
            for (k, v) in &self.summary {
                println!("  {k}: {v}");
            }
        }
        for note in &self.notes {
            println!("  note: {note}");
        }
    }

    pub fn write_plot(&self, path: &Path) -> anyhow::Result<()> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("svg") => {}
            _ => {
                bail!("--plot writes SVG (no system fonts are needed for it); name the file *.svg")
            }
        }
        plot(self, path).map_err(|e| anyhow::anyhow!("plotting failed: {e}"))
    }
}

pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Delivery => "send→delivery",
        Kind::Answer => "send→answer",
        Kind::Op => "operation",
    }
}

fn plot(report: &Report, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let ticks = &report.timeline;
    let root = SVGBackend::new(path, (1100, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(430);
    let t_max = ticks.last().map_or(1.0, |t| t.t).max(1.0);
    let kind = report.primary;
    type Series = (&'static str, fn(&Percentiles) -> f64, RGBColor);
    let series: [Series; 5] = [
        ("p50", |p| p.p50, RGBColor(31, 119, 180)),
        ("p90", |p| p.p90, RGBColor(44, 160, 44)),
        ("p99", |p| p.p99, RGBColor(255, 127, 14)),
        ("p99.9", |p| p.p999, RGBColor(214, 39, 40)),
        ("max", |p| p.max, RGBColor(120, 120, 120)),
    ];
    let lat = |t: &Tick| t.latency_ms.get(&kind).cloned();
    let y_max = ticks
        .iter()
        .filter_map(lat)
        .map(|p| p.max)
        .fold(1.0f64, f64::max)
        * 1.5;
    let y_min = ticks
        .iter()
        .filter_map(lat)
        .filter(|p| p.count > 0)
        .map(|p| p.p50)
        .fold(f64::MAX, f64::min)
        .clamp(0.001, 1.0)
        / 2.0;
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!(
                "relay-bench {}: {} latency percentiles per second",
                report.scenario,
                kind_name(kind)
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..t_max, (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("latency, ms (log)")
        .draw()?;
    for (name, get, color) in series {
        chart
            .draw_series(LineSeries::new(
                ticks.iter().filter_map(|t| {
                    lat(t)
                        .filter(|p| p.count > 0)
                        .map(|p| (t.t, get(&p).max(y_min)))
                }),
                color.stroke_width(2),
            ))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;

    let rate = |t: &Tick, k: Kind| t.latency_ms.get(&k).map_or(0.0, |p| p.count as f64);
    let r_max = ticks
        .iter()
        .flat_map(|t| {
            [
                rate(t, Kind::Delivery),
                rate(t, Kind::Answer),
                rate(t, Kind::Op),
            ]
        })
        .fold(1.0f64, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&bottom)
        .caption("throughput per second", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..t_max, 0f64..r_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("per second")
        .draw()?;
    let rates: [(&str, Kind, RGBColor); 3] = [
        ("deliveries/s", Kind::Delivery, RGBColor(31, 119, 180)),
        ("answers/s", Kind::Answer, RGBColor(255, 127, 14)),
        ("operations/s", Kind::Op, RGBColor(148, 103, 189)),
    ];
    for (name, k, color) in rates {
        if ticks.iter().all(|t| rate(t, k) == 0.0) {
            continue;
        }
        chart
            .draw_series(LineSeries::new(
                ticks.iter().map(|t| (t.t, rate(t, k))),
                color.stroke_width(2),
            ))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    // Phase boundaries, labelled, so the chart reads with the table.
    let mut last = "";
    for t in ticks {
        if t.phase != last {
            last = &t.phase;
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(t.t, 0.0), (t.t, r_max)],
                BLACK.mix(0.3),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                t.phase.clone(),
                (t.t, r_max * 0.97),
                ("sans-serif", 13),
            )))?;
        }
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}
