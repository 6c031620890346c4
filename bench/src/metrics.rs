//! What a run records: latency histograms (HDR, microseconds), counters and
//! errors, plus a once-a-second timeline of throughput, latency percentiles
//! and the server's CPU and memory for the chart.
//!
//! Recording takes a short mutex per histogram. With two generator threads
//! that lock is almost never contended, and it keeps the per-second
//! interval histograms exact (no merging of per-thread copies).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::procfs::{self, CpuMeter, Source};

/// Which latency a histogram holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Send (intended time) to the recipient's delivery.
    Delivery,
    /// Send (intended time) to the sender's answer (`delivered`, `queued`).
    Answer,
    /// One request or operation of a non-messaging scenario (login, fetch,
    /// reconnect).
    Op,
}

const KINDS: [Kind; 3] = [Kind::Delivery, Kind::Answer, Kind::Op];

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 10 min at 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

struct Hists {
    /// Since the last timeline tick.
    interval: Histogram<u64>,
    /// Since the last [`Metrics::take`].
    total: Histogram<u64>,
}

/// Shared by every task of a run. Cheap to clone (an `Arc`).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    /// Payload timestamps are nanoseconds since this instant.
    epoch: Instant,
    hists: [Mutex<Hists>; 3],
    /// Messages handed to the transport.
    sent: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Labelled counts that are not errors (e.g. outcomes).
    counts: Mutex<BTreeMap<String, u64>>,
    taken_at: Mutex<Instant>,
}

/// Latency percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// What was recorded between two [`Metrics::take`] calls.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub seconds: f64,
    pub sent: u64,
    pub latency_ms: BTreeMap<Kind, Percentiles>,
    pub errors: BTreeMap<String, u64>,
    pub counts: BTreeMap<String, u64>,
}

impl Snapshot {
    pub fn count(&self, kind: Kind) -> u64 {
        self.latency_ms.get(&kind).map_or(0, |p| p.count)
    }

    pub fn rate(&self, kind: Kind) -> f64 {
        if self.seconds > 0.0 {
            self.count(kind) as f64 / self.seconds
        } else {
            0.0
        }
    }

    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let hist = || {
            Mutex::new(Hists {
                interval: new_histogram(),
                total: new_histogram(),
            })
        };
        Metrics {
            inner: Arc::new(Inner {
                epoch: Instant::now(),
                hists: [hist(), hist(), hist()],
                sent: AtomicU64::new(0),
                errors: Mutex::default(),
                counts: Mutex::default(),
                taken_at: Mutex::new(Instant::now()),
            }),
        }
    }

    /// Nanoseconds since the run's epoch, for payload timestamps.
    pub fn now_ns(&self) -> u64 {
        self.inner.epoch.elapsed().as_nanos() as u64
    }

    /// Records a latency measured from `since_ns` (payload timestamp) to now.
    pub fn record_since(&self, kind: Kind, since_ns: u64) {
        let now = self.now_ns();
        self.record_us(kind, now.saturating_sub(since_ns) / 1000);
    }

    pub fn record(&self, kind: Kind, latency: Duration) {
        self.record_us(kind, latency.as_micros() as u64);
    }

    /// Records latencies measured elsewhere (by agents) and reported in one
    /// go: into the totals only, since the per-second timeline would show
    /// them all in the second they arrived.
    pub fn record_reported(&self, kind: Kind, latencies: impl IntoIterator<Item = Duration>) {
        let mut h = self.inner.hists[kind as usize]
            .lock()
            .expect("histogram lock");
        for latency in latencies {
            let _ = h
                .total
                .record((latency.as_micros() as u64).clamp(1, 600_000_000));
        }
    }

    fn record_us(&self, kind: Kind, us: u64) {
        let us = us.clamp(1, 600_000_000);
        let mut h = self.inner.hists[kind as usize]
            .lock()
            .expect("histogram lock");
        let _ = h.interval.record(us);
        let _ = h.total.record(us);
    }

    pub fn sent(&self, n: u64) {
        self.inner.sent.fetch_add(n, Ordering::Relaxed);
    }

    pub fn error(&self, what: impl Into<String>) {
        *self
            .inner
            .errors
            .lock()
            .expect("errors lock")
            .entry(what.into())
            .or_default() += 1;
    }

    pub fn count(&self, what: &str, n: u64) {
        let mut counts = self.inner.counts.lock().expect("counts lock");
        match counts.get_mut(what) {
            Some(c) => *c += n,
            None => {
                counts.insert(what.to_owned(), n);
            }
        }
    }

    /// Returns what was recorded since the last call and starts afresh
    /// (warm-up is discarded this way, and phases are split).
    pub fn take(&self) -> Snapshot {
        let now = Instant::now();
        let since = std::mem::replace(&mut *self.inner.taken_at.lock().expect("lock"), now);
        let mut latency_ms = BTreeMap::new();
        for kind in KINDS {
            let mut h = self.inner.hists[kind as usize].lock().expect("lock");
            if !h.total.is_empty() {
                latency_ms.insert(kind, Percentiles::of(&h.total));
            }
            h.total.reset();
        }
        Snapshot {
            seconds: now.duration_since(since).as_secs_f64(),
            sent: self.inner.sent.swap(0, Ordering::Relaxed),
            latency_ms,
            errors: std::mem::take(&mut *self.inner.errors.lock().expect("lock")),
            counts: std::mem::take(&mut *self.inner.counts.lock().expect("lock")),
        }
    }

    /// Percentiles of each interval histogram since the last tick; resets them.
    fn tick(&self) -> BTreeMap<Kind, Percentiles> {
        let mut out = BTreeMap::new();
        for kind in KINDS {
            let mut h = self.inner.hists[kind as usize].lock().expect("lock");
            if !h.interval.is_empty() {
                out.insert(kind, Percentiles::of(&h.interval));
            }
            h.interval.reset();
        }
        out
    }
}

/// One second of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Tick {
    /// Seconds since sampling started.
    pub t: f64,
    /// Label of the phase the run was in (e.g. "warmup", "storm").
    pub phase: String,
    pub latency_ms: BTreeMap<Kind, Percentiles>,
    pub server_cpu_percent: Option<f64>,
    pub server_rss_kib: Option<u64>,
    pub generator_cpu_percent: f64,
    pub postgres_cpu_percent: f64,
}

/// Samples the metrics and `/proc` once a second in the background.
pub struct Sampler {
    ticks: Arc<Mutex<Vec<Tick>>>,
    phase: Arc<Mutex<String>>,
    /// The process measured as "the server" (the relay or the forwarder).
    pid: Arc<Mutex<Option<u32>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Sampler {
    /// Starts sampling. `server_pid` is measured when known. `progress`
    /// shows a one-line summary of the last second.
    pub fn start(
        metrics: Metrics,
        server_pid: Option<u32>,
        primary: Kind,
        progress: indicatif::ProgressBar,
    ) -> Self {
        let ticks = Arc::new(Mutex::new(Vec::new()));
        let phase = Arc::new(Mutex::new(String::from("setup")));
        let pid = Arc::new(Mutex::new(server_pid));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (t_ticks, t_phase, t_pid) = (ticks.clone(), phase.clone(), pid.clone());
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut measured = server_pid;
            let mut server_cpu = server_pid.map(|pid| CpuMeter::new(Source::Pid(pid)));
            let mut generator_cpu = CpuMeter::new(Source::Pid(std::process::id()));
            let mut postgres_cpu = CpuMeter::new(Source::Postgres);
            let mut interval = tokio::time::interval(Duration::from_secs(1));
            interval.tick().await;
            loop {
                tokio::select! {
                    _ = interval.tick() => {}
                    _ = stopped.changed() => break,
                }
                let latency_ms = metrics.tick();
                let server_pid = *t_pid.lock().expect("lock");
                if server_pid != measured {
                    measured = server_pid;
                    server_cpu = server_pid.map(|pid| CpuMeter::new(Source::Pid(pid)));
                }
                let tick = Tick {
                    t: start.elapsed().as_secs_f64(),
                    phase: t_phase.lock().expect("lock").clone(),
                    server_cpu_percent: server_cpu.as_mut().map(CpuMeter::sample),
                    server_rss_kib: server_pid.and_then(procfs::rss_kib),
                    generator_cpu_percent: generator_cpu.sample(),
                    postgres_cpu_percent: postgres_cpu.sample(),
                    latency_ms,
                };
                let p = tick.latency_ms.get(&primary).cloned().unwrap_or_default();
                progress.set_message(format!(
                    "[{}] {:>8.0}/s  p50 {:.2} ms  p99 {:.2} ms  max {:.1} ms  server {:.0}% CPU {} MiB",
                    tick.phase,
                    p.count as f64,
                    p.p50,
                    p.p99,
                    p.max,
                    tick.server_cpu_percent.unwrap_or(0.0),
                    tick.server_rss_kib.unwrap_or(0) / 1024,
                ));
                t_ticks.lock().expect("lock").push(tick);
            }
        });
        Sampler {
            ticks,
            phase,
            pid,
            stop,
            task: Some(task),
        }
    }

    pub fn set_phase(&self, phase: &str) {
        *self.phase.lock().expect("lock") = phase.to_owned();
    }

    /// Switches the process measured as the server.
    pub fn set_server(&self, pid: Option<u32>) {
        *self.pid.lock().expect("lock") = pid;
    }

    pub async fn finish(mut self) -> Vec<Tick> {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        std::mem::take(&mut *self.ticks.lock().expect("lock"))
    }
}

/// Measures a process's CPU and memory over a window, from `/proc`.
pub struct ProcWindow {
    pid: Option<u32>,
    cpu_start: Option<f64>,
    pg_start: f64,
    gen_start: f64,
    rss_start: Option<u64>,
    machine_start: Option<(u64, u64)>,
    started: Instant,
    /// Further processes measured by name (a cluster's nodes and its
    /// Redis), with their CPU seconds at the start.
    named: Vec<(String, u32, Option<f64>)>,
}

/// CPU and memory of the server, generator and PostgreSQL over a window.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Usage {
    pub server_cpu_percent: Option<f64>,
    pub server_rss_start_kib: Option<u64>,
    pub server_rss_end_kib: Option<u64>,
    pub generator_cpu_percent: f64,
    pub postgres_cpu_percent: f64,
    /// The whole machine, percent of all CPUs: everything above plus agents
    /// and anything else running.
    pub machine_busy_percent: Option<f64>,
    /// CPU of further named processes (a cluster's nodes and its Redis),
    /// percent of one core.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub processes_cpu_percent: BTreeMap<String, f64>,
}

impl ProcWindow {
    pub fn start(pid: Option<u32>) -> Self {
        ProcWindow {
            pid,
            cpu_start: pid.and_then(procfs::cpu_seconds),
            pg_start: procfs::postgres_cpu_seconds(),
            gen_start: procfs::cpu_seconds(std::process::id()).unwrap_or(0.0),
            rss_start: pid.and_then(procfs::rss_kib),
            machine_start: procfs::cpu_jiffies(),
            started: Instant::now(),
            named: Vec::new(),
        }
    }

    /// Also measures these processes, each under its name.
    pub fn with_processes(mut self, processes: &[(String, u32)]) -> Self {
        self.named = processes
            .iter()
            .map(|(name, pid)| (name.clone(), *pid, procfs::cpu_seconds(*pid)))
            .collect();
        self
    }

    pub fn finish(&self) -> Usage {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let pct = |end: f64, start: f64| 100.0 * (end - start).max(0.0) / wall;
        Usage {
            server_cpu_percent: match (self.pid.and_then(procfs::cpu_seconds), self.cpu_start) {
                (Some(end), Some(start)) => Some(pct(end, start)),
                _ => None,
            },
            server_rss_start_kib: self.rss_start,
            server_rss_end_kib: self.pid.and_then(procfs::rss_kib),
            generator_cpu_percent: pct(
                procfs::cpu_seconds(std::process::id()).unwrap_or(0.0),
                self.gen_start,
            ),
            postgres_cpu_percent: pct(procfs::postgres_cpu_seconds(), self.pg_start),
            machine_busy_percent: match (self.machine_start, procfs::cpu_jiffies()) {
                (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                    Some(100.0 * (b1 - b0) as f64 / (t1 - t0) as f64)
                }
                _ => None,
            },
            processes_cpu_percent: self
                .named
                .iter()
                .filter_map(|(name, pid, start)| {
                    Some((name.clone(), pct(procfs::cpu_seconds(*pid)?, (*start)?)))
                })
                .collect(),
        }
    }
}
