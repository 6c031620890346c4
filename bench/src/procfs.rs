//! Measurements from outside the measured processes, through `/proc`: CPU
//! time and resident memory of the server, of the generator itself and of
//! PostgreSQL's processes. The bench never asks the server for its own
//! numbers.

use std::fs;

/// Clock ticks per second, for the CPU times in `/proc/<pid>/stat`.
fn ticks_per_sec() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(ticks)) if ticks > 0 => ticks as f64,
        // Linux's USER_HZ everywhere in practice.
        _ => 100.0,
    }
}

/// CPU seconds (user + system) a process has used, or `None` when it is gone.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; the fields
    // after the last ')' are fixed: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_sec())
}

/// Resident memory (`VmRSS`) in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

/// Open file descriptors of a process.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// The soft limit on open files (`RLIMIT_NOFILE`) of a process, from
/// `/proc/<pid>/limits`: each connection it holds is one.
pub fn open_files_limit(pid: u32) -> Option<u64> {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn status_field(pid: u32, name: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// CPU seconds used by every process named `postgres` (the postmaster, its
/// backends, the WAL writer, the checkpointer …), summed. Backends that ended
/// between two samples drop out of the sum, so use it over windows in which
/// the pool's connections live throughout.
pub fn postgres_cpu_seconds() -> f64 {
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres")
        })
        .filter_map(cpu_seconds)
        .sum()
}

/// Number of online CPUs and the model name, for the report.
pub fn hardware() -> (usize, String) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    (cpus, model)
}

/// A CPU-time sampler for one process: utilisation between samples, as a
/// percentage of one core (200% = two cores busy).
pub struct CpuMeter {
    source: Source,
    last_cpu: f64,
    last_at: std::time::Instant,
}

#[derive(Clone, Copy)]
pub enum Source {
    Pid(u32),
    Postgres,
}

impl Source {
    fn read(self) -> f64 {
        match self {
            Source::Pid(pid) => cpu_seconds(pid).unwrap_or(0.0),
            Source::Postgres => postgres_cpu_seconds(),
        }
    }
}

impl CpuMeter {
    pub fn new(source: Source) -> Self {
        CpuMeter {
            source,
            last_cpu: source.read(),
            last_at: std::time::Instant::now(),
        }
    }

    /// Percent of one core used since the last call (or since `new`).
    pub fn sample(&mut self) -> f64 {
        let cpu = self.source.read();
        let now = std::time::Instant::now();
        let wall = now.duration_since(self.last_at).as_secs_f64();
        let used = (cpu - self.last_cpu).max(0.0);
        self.last_cpu = cpu;
        self.last_at = now;
        if wall > 0.0 { 100.0 * used / wall } else { 0.0 }
    }
}

/// (busy, total) jiffies of all CPUs, from the first line of /proc/stat.
pub fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// How busy the whole machine is over `window`, in percent of all CPUs.
/// Taken before a run, with nothing of ours loading it, it says how much
/// other work (builds, tests) shares the machine and so how noisy the run is.
pub async fn machine_busy(window: std::time::Duration) -> Option<f64> {
    let (b0, t0) = cpu_jiffies()?;
    tokio::time::sleep(window).await;
    let (b1, t1) = cpu_jiffies()?;
    (t1 > t0).then(|| 100.0 * (b1 - b0) as f64 / (t1 - t0) as f64)
}
