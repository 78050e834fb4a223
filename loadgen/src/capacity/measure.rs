//! `loadgen capacity measure`: short open-loop steps against a running server, its CPU and
//! memory read from /proc around each step's measured phase, and the unit costs fitted from them.
//!
//! Steps, in order: *quiet* (nothing connected: the server's baseline), *idle* (many joined
//! connections, no sends: memory and CPU per connection), then sends at a few rates into small
//! rooms and into large rooms. Small rooms make sends dominate, large rooms deliveries, so the
//! least-squares fit can tell a send's cost from a delivery's.

use std::time::Duration;

use super::fit::{fit_non_negative, Observation};
use super::model::{
    CpuCosts, Limits, LoadgenCosts, Machine, MemoryCosts, Model, ServerInfo, StepResult, Throughput, MODEL_VERSION,
};
use super::proc::{self, Sampler};
use crate::schedule::Phase;
use crate::Config;

/// How to measure.
#[derive(Debug, Clone)]
pub struct MeasureOptions {
    /// Gateway URL.
    pub url: String,
    /// Server processes to read from /proc.
    pub pids: Vec<u32>,
    /// `all-in-one` or `cluster`.
    pub kind: String,
    /// Connections of the idle step.
    pub idle_connections: u32,
    /// Clients of each load step.
    pub clients: u32,
    /// Members per small room.
    pub small_room: u32,
    /// Members per large room.
    pub large_room: u32,
    /// Send rates of the small-room steps.
    pub small_rates: Vec<f64>,
    /// Send rates of the large-room steps.
    pub large_rates: Vec<f64>,
    /// Measured phase of each step.
    pub step: Duration,
    /// Connect rate while ramping.
    pub ramp: f64,
    /// Steps with a send→delivery p99 at or over this are left out of the fit.
    pub saturated_p99_ms: f64,
    /// The NATS figure (measured elsewhere or by [`super::nats`]).
    pub nats: Throughput,
    /// The store figure.
    pub store: Throughput,
    /// CPU factor of cluster processes over the all-in-one (ignored for a cluster).
    pub cluster_factor: (f64, String),
    /// Limits to record.
    pub limits: Limits,
    /// Print each step as it ends.
    pub verbose: bool,
}

/// Why a measurement failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeasureError {
    /// A server process cannot be read.
    #[error("cannot read /proc of server pid(s) {0:?}: is the server running, and on this machine?")]
    Proc(Vec<u32>),
    /// A step could not be run.
    #[error("step {step}: {reason}")]
    Step {
        /// Which step.
        step: String,
        /// The run error.
        reason: String,
    },
    /// The samples do not cover a step's measured phase.
    #[error("step {0}: no CPU samples cover its measured phase")]
    Window(String),
}

/// One step's load.
#[derive(Debug, Clone)]
pub struct StepSpec {
    /// Name.
    pub name: String,
    /// Clients.
    pub clients: u32,
    /// Rooms.
    pub rooms: u32,
    /// Sends per second.
    pub rate: f64,
}

/// Runs one step and reads the server's cost over its measured phase.
pub async fn run_step(
    url: &str,
    spec: &StepSpec,
    step: Duration,
    ramp: f64,
    sampler: &Sampler,
) -> Result<StepResult, MeasureError> {
    let config = Config {
        urls: vec![url.to_string()],
        clients: spec.clients,
        rooms: spec.rooms,
        rooms_per_client: 1,
        phases: vec![Phase { duration: step, rate: spec.rate }],
        ramp,
        history_rate: 0.0,
        seed: 1,
        drain: Duration::from_secs(5),
        prefix: format!("cap{:06x}", rand::random::<u32>() & 0xff_ffff),
        progress: false,
        ..Config::default()
    };
    let report =
        crate::run(config).await.map_err(|e| MeasureError::Step { step: spec.name.clone(), reason: e.to_string() })?;
    // Let the sampler take one sample past the end of the window.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let start = report.started_unix_ms as f64 + report.timing.measure_start_s * 1000.0;
    let end = report.started_unix_ms as f64 + report.timing.measure_end_s * 1000.0;
    let (server_cores, loadgen_cores, rss) =
        proc::window(&sampler.samples(), start, end).ok_or_else(|| MeasureError::Window(spec.name.clone()))?;
    let t = &report.throughput;
    Ok(StepResult {
        name: spec.name.clone(),
        clients: report.clients.ready,
        rooms: spec.rooms as u64,
        room_size: report.rooms.mean_members,
        rate: spec.rate,
        seconds: report.timing.measure_s,
        sends_per_sec: t.sent_per_s,
        deliveries_per_sec: t.delivered_per_s,
        server_cores,
        loadgen_cores,
        rss_kib: rss,
        e2e_p99_ms: report.latency_ms.get("send_to_delivery").map(|h| h.p99).unwrap_or(0.0),
        passed: report.passed,
        fitted: true,
    })
}

/// Measures and returns the model.
pub async fn measure(o: &MeasureOptions) -> Result<Model, MeasureError> {
    let (cores, cpu_model, mem_total_kib, kernel) = proc::machine();
    let loadavg_before = proc::loadavg();
    proc::sample(&o.pids).ok_or_else(|| MeasureError::Proc(o.pids.clone()))?;
    let sampler = Sampler::start(o.pids.clone(), Duration::from_millis(50));
    let mut steps = Vec::new();

    // Quiet: nothing of ours connected.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let quiet_from = protocol::now_ms() as f64;
    tokio::time::sleep(o.step.min(Duration::from_secs(3))).await;
    let quiet_to = protocol::now_ms() as f64;
    // Let the sampler take one sample past the end of the window.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let (quiet_cores, _, base_rss) =
        proc::window(&sampler.samples(), quiet_from, quiet_to).ok_or_else(|| MeasureError::Window("quiet".into()))?;
    steps.push(StepResult {
        name: "quiet".into(),
        clients: 0,
        rooms: 0,
        room_size: 0.0,
        rate: 0.0,
        seconds: (quiet_to - quiet_from) / 1000.0,
        sends_per_sec: 0.0,
        deliveries_per_sec: 0.0,
        server_cores: quiet_cores,
        loadgen_cores: 0.0,
        rss_kib: base_rss,
        e2e_p99_ms: 0.0,
        passed: true,
        fitted: true,
    });

    let mut specs = vec![StepSpec {
        name: "idle".into(),
        clients: o.idle_connections,
        rooms: (o.idle_connections / 100).max(1),
        rate: 0.0,
    }];
    for (size, rates, name) in
        [(o.small_room, &o.small_rates, "small-rooms"), (o.large_room, &o.large_rates, "large-rooms")]
    {
        for &rate in rates {
            specs.push(StepSpec {
                name: name.into(),
                clients: o.clients,
                rooms: (o.clients / size.max(1)).max(1),
                rate,
            });
        }
    }
    for spec in &specs {
        let r = run_step(&o.url, spec, o.step, o.ramp, &sampler).await?;
        if o.verbose {
            eprintln!(
                "capacity: {:<12} {:>6} clients {:>5} rooms {:>7.0} sends/s {:>9.0} deliveries/s  server {:.3} cores  loadgen {:.3} cores  rss {:.0} KiB  p99 {:.1} ms  audit {}",
                r.name,
                r.clients,
                r.rooms,
                r.sends_per_sec,
                r.deliveries_per_sec,
                r.server_cores,
                r.loadgen_cores,
                r.rss_kib,
                r.e2e_p99_ms,
                if r.passed { "passed" } else { "FAILED" }
            );
        }
        steps.push(r);
    }
    drop(sampler);
    let in_process = o.pids.contains(&std::process::id());
    let mut model = model_from_steps(&steps, quiet_cores, base_rss, o, in_process);
    model.machine = Machine {
        cores,
        cpu_model,
        mem_total_kib,
        loadavg_before,
        loadavg_after: proc::loadavg(),
        kernel,
        cores_available: None,
    };
    Ok(model)
}

/// Fits the costs from measured steps (the first `idle` step gives memory and idle CPU per
/// connection; the steps with sends give the per-send and per-delivery costs).
pub fn model_from_steps(
    steps: &[StepResult],
    quiet_cores: f64,
    base_rss: f64,
    o: &MeasureOptions,
    in_process: bool,
) -> Model {
    let idle = steps.iter().find(|s| s.name == "idle" && s.clients > 0);
    let (idle_per_conn, kib_per_conn, idle_conns) = match idle {
        Some(s) => (
            ((s.server_cores - quiet_cores) / s.clients as f64).max(0.0),
            ((s.rss_kib - base_rss) / s.clients as f64).max(0.0),
            s.clients,
        ),
        None => (0.0, 0.0, 0),
    };
    let mut steps = steps.to_vec();
    let healthy = steps.iter().filter(|s| s.sends_per_sec > 0.0 && s.e2e_p99_ms < o.saturated_p99_ms).count();
    for s in steps.iter_mut().filter(|s| s.sends_per_sec > 0.0) {
        // A starved step's CPU shows what it was given, not what the work costs.
        s.fitted = healthy < 3 || s.e2e_p99_ms < o.saturated_p99_ms;
    }
    let loaded: Vec<&StepResult> = steps.iter().filter(|s| s.sends_per_sec > 0.0 && s.fitted).collect();
    let server_obs: Vec<Observation> = loaded
        .iter()
        .map(|s| Observation {
            rates: vec![s.sends_per_sec, s.deliveries_per_sec, 1.0],
            cores: s.server_cores - quiet_cores - idle_per_conn * s.clients as f64,
        })
        .collect();
    let loadgen_obs: Vec<Observation> = loaded
        .iter()
        .map(|s| Observation { rates: vec![s.sends_per_sec, s.deliveries_per_sec, 1.0], cores: s.loadgen_cores })
        .collect();
    let server = fit_non_negative(&server_obs);
    let own = fit_non_negative(&loadgen_obs);
    let cost = |f: &Option<super::fit::Fit>, i: usize| f.as_ref().map(|f| f.costs[i]).unwrap_or(0.0);
    let cluster = o.kind == "cluster";
    Model {
        version: MODEL_VERSION,
        measured_unix_ms: protocol::now_ms(),
        machine: Machine {
            cores: 0,
            cpu_model: String::new(),
            mem_total_kib: 0,
            loadavg_before: 0.0,
            loadavg_after: 0.0,
            kernel: String::new(),
            cores_available: None,
        },
        server: ServerInfo { kind: o.kind.clone(), url: o.url.clone(), pids: o.pids.clone(), in_process },
        cpu: CpuCosts {
            quiet_cores,
            idle_cores_per_connection: idle_per_conn,
            active_cores: cost(&server, 2),
            seconds_per_send: cost(&server, 0),
            seconds_per_delivery: cost(&server, 1),
            fit_rms_cores: server.as_ref().map(|f| f.rms).unwrap_or(0.0),
            cluster_factor: if cluster { 1.0 } else { o.cluster_factor.0 },
            cluster_factor_source: if cluster { "measured on a cluster".into() } else { o.cluster_factor.1.clone() },
        },
        memory: MemoryCosts { base_kib: base_rss, kib_per_connection: kib_per_conn, measured_connections: idle_conns },
        loadgen: LoadgenCosts {
            seconds_per_send: cost(&own, 0),
            seconds_per_delivery: cost(&own, 1),
            active_cores: cost(&own, 2),
        },
        nats: o.nats.clone(),
        store: o.store.clone(),
        limits: o.limits.clone(),
        steps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, clients: u64, sends: f64, size: f64, cores: f64, rss: f64) -> StepResult {
        StepResult {
            name: name.into(),
            clients,
            rooms: 1,
            room_size: size,
            rate: sends,
            seconds: 5.0,
            sends_per_sec: sends,
            deliveries_per_sec: sends * size,
            server_cores: cores,
            loadgen_cores: cores / 2.0,
            rss_kib: rss,
            e2e_p99_ms: 1.0,
            passed: true,
            fitted: true,
        }
    }

    #[test]
    fn costs_are_fitted_net_of_the_quiet_and_idle_baselines() {
        let o = super::super::tests::options();
        // Quiet 0.01 cores, 10,000 KiB; 1000 idle connections: 0.03 cores, 18,000 KiB.
        // Load steps of 100 clients: 0.01 + 100 x 0.00002 + sends x 100 µs + deliveries x 2 µs.
        let load = |sends: f64, size: f64| 0.01 + 0.002 + sends * 100e-6 + sends * size * 2e-6;
        let steps = vec![
            step("idle", 1000, 0.0, 10.0, 0.03, 18_000.0),
            step("small-rooms", 100, 1000.0, 2.0, load(1000.0, 2.0), 0.0),
            step("small-rooms", 100, 2000.0, 2.0, load(2000.0, 2.0), 0.0),
            step("large-rooms", 100, 100.0, 100.0, load(100.0, 100.0), 0.0),
            step("large-rooms", 100, 200.0, 100.0, load(200.0, 100.0), 0.0),
        ];
        let m = model_from_steps(&steps, 0.01, 10_000.0, &o, false);
        assert!((m.cpu.idle_cores_per_connection - 20e-6).abs() < 1e-12, "{:?}", m.cpu);
        assert!((m.memory.kib_per_connection - 8.0).abs() < 1e-9);
        assert!((m.cpu.seconds_per_send - 100e-6).abs() < 1e-9, "{:?}", m.cpu);
        assert!((m.cpu.seconds_per_delivery - 2e-6).abs() < 1e-10, "{:?}", m.cpu);
        assert!((m.loadgen.seconds_per_delivery - 1e-6).abs() < 1e-6, "{:?}", m.loadgen);
        assert_eq!(m.steps.len(), 5);
        assert!(m.steps.iter().all(|s| s.fitted));

        // A starved step (p99 over the limit) is left out: it looks cheap, not costly.
        let mut starved = steps.clone();
        starved.push(step("large-rooms", 100, 400.0, 100.0, 0.2, 0.0));
        starved[5].e2e_p99_ms = 900.0;
        let m2 = model_from_steps(&starved, 0.01, 10_000.0, &o, false);
        assert!(!m2.steps[5].fitted);
        assert!((m2.cpu.seconds_per_delivery - 2e-6).abs() < 1e-10, "{:?}", m2.cpu);
        assert_eq!(m.cpu.cluster_factor, 2.0);
    }
}
