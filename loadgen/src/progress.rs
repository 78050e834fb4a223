//! The live progress line on stderr: rates of the last second, p99 so far, errors.
//!
//! On a terminal it rewrites one line in place; elsewhere (`--progress always` into a file) it
//! prints one line per second.

use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;

use crate::metrics::{Collector, Lat};
use crate::runner::Shared;

/// Prints the progress line when enabled.
#[derive(Debug, Clone)]
pub struct Progress {
    enabled: bool,
    tty: bool,
    scheduled: u64,
}

impl Progress {
    /// A progress printer; `scheduled` is the number of sends in the schedule.
    pub fn new(enabled: bool, scheduled: u64) -> Self {
        Self { enabled, tty: std::io::stderr().is_terminal(), scheduled }
    }

    /// Prints the line for the newest collection.
    pub fn print(&self, shared: &Shared, c: &Collector) {
        if !self.enabled {
            return;
        }
        let line = line(shared, c, self.scheduled);
        let mut err = std::io::stderr().lock();
        let _ = if self.tty { write!(err, "\r{line}\x1b[K") } else { writeln!(err, "{line}") };
        let _ = err.flush();
    }

    /// Ends the in-place line.
    pub fn finish(&self) {
        if self.enabled && self.tty {
            eprintln!();
        }
    }
}

/// The text of one progress line.
pub fn line(shared: &Shared, c: &Collector, scheduled: u64) -> String {
    let per_s = |n: u64, dt: f64| if dt > 0.0 { n as f64 / dt } else { 0.0 };
    let (sent, acked, delivered, p99) = match c.timeline.last() {
        Some(s) => (per_s(s.sent, s.dt), per_s(s.acked, s.dt), per_s(s.delivered, s.dt), s.e2e_p99_ms),
        None => (0.0, 0.0, 0.0, 0.0),
    };
    let total = c.total(Lat::E2e);
    let p99_run = if total.is_empty() { 0.0 } else { total.value_at_quantile(0.99) as f64 / 1000.0 };
    let m = &shared.metrics;
    format!(
        "[{:>6.1}s] conns {}/{} | sent {:.0}/s acked {:.0}/s delivered {:.0}/s | e2e p99 {:.1} ms (so far {:.1} ms) | errors {} | reconnects {} | sends {}/{}",
        shared.clock.now_us() as f64 / 1e6,
        m.connected.load(Ordering::Relaxed),
        shared.config.clients,
        sent,
        acked,
        delivered,
        p99,
        p99_run,
        c.errors,
        m.reconnects.load(Ordering::Relaxed),
        c.sent,
        scheduled,
    )
}
