//! What the capacity measurement reads from /proc: a process's CPU time and resident memory,
//! and the machine (cores, CPU model, memory, load).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Clock ticks per second of /proc/PID/stat times (USER_HZ, 100 on every Linux ABI).
const USER_HZ: f64 = 100.0;

/// User + system CPU seconds of `pid`, or `None` if it cannot be read.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu(&stat)
}

/// utime + stime from a /proc/PID/stat line (fields 14 and 15; the command name may hold spaces
/// and parentheses, so fields are counted from the last `)`).
pub fn parse_stat_cpu(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// Resident memory of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(0.0)
}

/// Cores, CPU model, memory (KiB) and kernel release of this machine.
pub fn machine() -> (u32, String, u64, String) {
    let cores = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    (cores, model, mem, kernel)
}

/// One sample: wall clock (ms since the epoch), server CPU seconds and RSS KiB (summed over its
/// processes), and this process's CPU seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// ms since the Unix epoch.
    pub unix_ms: f64,
    /// Server CPU seconds.
    pub server_cpu: f64,
    /// Server resident KiB.
    pub server_rss: f64,
    /// loadgen's CPU seconds.
    pub own_cpu: f64,
}

/// Samples the server processes and this process every `period` on a thread of its own, so the
/// CPU of any window can be read afterwards.
pub struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Takes one sample now; `None` if a server process cannot be read (it exited).
pub fn sample(pids: &[u32]) -> Option<Sample> {
    let mut cpu = 0.0;
    let mut rss = 0.0;
    for &pid in pids {
        cpu += cpu_seconds(pid)?;
        rss += rss_kib(pid)?;
    }
    Some(Sample {
        unix_ms: protocol::now_ms() as f64,
        server_cpu: cpu,
        server_rss: rss,
        own_cpu: cpu_seconds(std::process::id())?,
    })
}

impl Sampler {
    /// Starts sampling `pids`.
    pub fn start(pids: Vec<u32>, period: Duration) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (samples, stop) = (samples.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(s) = sample(&pids) {
                        samples.lock().unwrap_or_else(|p| p.into_inner()).push(s);
                    }
                    std::thread::sleep(period);
                }
            })
        };
        Self { samples, stop, thread: Some(thread) }
    }

    /// The samples so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Server cores, loadgen cores and the server's last RSS over `[from_ms, to_ms]`, interpolating
/// the CPU counters linearly between samples. `None` if the samples do not cover the window.
pub fn window(samples: &[Sample], from_ms: f64, to_ms: f64) -> Option<(f64, f64, f64)> {
    if to_ms <= from_ms {
        return None;
    }
    let at = |t: f64| -> Option<Sample> {
        let i = samples.iter().position(|s| s.unix_ms >= t)?;
        if i == 0 {
            return (samples[0].unix_ms - t < 1.0).then_some(samples[0]);
        }
        let (a, b) = (samples[i - 1], samples[i]);
        let f = if b.unix_ms > a.unix_ms { (t - a.unix_ms) / (b.unix_ms - a.unix_ms) } else { 1.0 };
        let lerp = |x: f64, y: f64| x + (y - x) * f;
        Some(Sample {
            unix_ms: t,
            server_cpu: lerp(a.server_cpu, b.server_cpu),
            server_rss: b.server_rss,
            own_cpu: lerp(a.own_cpu, b.own_cpu),
        })
    };
    let (a, b) = (at(from_ms)?, at(to_ms)?);
    let secs = (to_ms - from_ms) / 1000.0;
    Some(((b.server_cpu - a.server_cpu) / secs, (b.own_cpu - a.own_cpu) / secs, b.server_rss))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_from_a_stat_line_with_a_strange_name() {
        let line = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 4 0 100 1000 200";
        assert_eq!(parse_stat_cpu(line), Some(3.0));
        assert_eq!(parse_stat_cpu("garbage"), None);
        assert!(cpu_seconds(std::process::id()).is_some());
        assert!(rss_kib(std::process::id()).unwrap() > 0.0);
    }

    #[test]
    fn a_window_interpolates_between_samples() {
        let s = |t: f64, cpu: f64| Sample { unix_ms: t, server_cpu: cpu, server_rss: t, own_cpu: cpu / 2.0 };
        let samples = [s(0.0, 0.0), s(1000.0, 1.0), s(2000.0, 3.0)];
        let (server, own, rss) = window(&samples, 500.0, 1500.0).unwrap();
        assert!((server - 1.5).abs() < 1e-9 && (own - 0.75).abs() < 1e-9, "{server} {own}");
        assert_eq!(rss, 2000.0);
        assert!(window(&samples, 500.0, 2500.0).is_none(), "past the last sample");
        assert!(window(&samples, 1500.0, 500.0).is_none());
    }
}
