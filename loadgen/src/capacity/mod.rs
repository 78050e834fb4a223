//! `loadgen capacity`: measure unit costs on this machine into a model file, plan a deployment
//! from it, and check the model against a measured knee.
//!
//! - `measure`: short open-loop steps against a running server, its CPU and memory read from
//!   /proc ([`measure`], [`proc`]), costs fitted by non-negative least squares ([`fit`]), written
//!   as a commented TOML model ([`model`]).
//! - `plan`: gateways, workers, NATS and store nodes for N users, M sends/s, a room-size
//!   distribution and a headroom, with the arithmetic shown ([`plan`]).
//! - `knee`: the model's predicted saturation point of one server on the measured machine.
//! - `sweep`: a rate sweep that finds the measured knee (the highest rate whose send→delivery
//!   p99 stays under a limit).
//!
//! docs/capacity.md has the model, its assumptions and its validation.

pub mod fit;
pub mod measure;
pub mod model;
pub mod nats;
pub mod plan;
pub mod proc;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use self::measure::{MeasureOptions, StepSpec};
use self::model::{Limits, Model, Throughput};
use self::plan::{RoomSizes, Workload};
use crate::config::parse_duration;

/// Where the default cluster factor comes from.
pub const CLUSTER_FACTOR_SOURCE: &str =
    "docs/benchmarks.md, 2026-11-26: one room of 100, 541,000 deliveries per server CPU-s all-in-one vs 275,000 on the cluster (2 gateways + 2 workers)";
/// Where the default store figure comes from.
pub const STORE_SOURCE: &str =
    "docs/storage.md: one Cassandra 5.0.9 node on this machine, 1 message per append, 1 room (cargo run --release -p storage --example cql_bench)";

/// `loadgen capacity`.
#[derive(Debug, Parser)]
#[command(
    name = "loadgen capacity",
    about = "Measure unit costs into a model file, plan a deployment from it, and validate it.",
    after_help = "Examples:\n  \
        loadgen capacity measure --url ws://127.0.0.1:8080/ws --pid $(pgrep -n chat) --out model.toml\n  \
        loadgen capacity plan --model model.toml --users 1000000 --sends-per-sec 20000 --room-size zipf:50000:1.1 --headroom 0.3\n  \
        loadgen capacity knee --model model.toml --clients 1000 --room-size 100\n  \
        loadgen capacity sweep --url ws://127.0.0.1:8080/ws --pid PID --clients 1000 --rooms 10 --rates 800,1200,1600,2000"
)]
pub struct CapacityCli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The capacity subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Measure unit costs of a running server on this machine into a model file.
    Measure(MeasureArgs),
    /// Plan gateways, workers, NATS and store nodes for a workload.
    Plan(PlanArgs),
    /// Predict the saturation point of one server on the measured machine.
    Knee(KneeArgs),
    /// Sweep send rates and find the measured knee (p99 over a limit).
    Sweep(SweepArgs),
}

/// A comma-separated list of send rates.
#[derive(Debug, Clone, PartialEq)]
pub struct Rates(pub Vec<f64>);

fn rates(text: &str) -> Result<Rates, String> {
    text.split(',')
        .map(|r| r.trim().parse::<f64>().ok().filter(|r| r.is_finite() && *r >= 0.0))
        .collect::<Option<Vec<_>>>()
        .filter(|v| !v.is_empty())
        .map(Rates)
        .ok_or_else(|| format!("`{text}`: a comma-separated list of sends/s, e.g. 100,200,400"))
}

/// `loadgen capacity measure`.
#[derive(Debug, clap::Args)]
pub struct MeasureArgs {
    /// Gateway WebSocket URL of the server to measure.
    #[arg(long, default_value = crate::config::DEFAULT_URL)]
    pub url: String,
    /// Server process id(s) whose CPU and RSS are read from /proc (repeat, or commas, for a
    /// cluster's gateways and workers).
    #[arg(long = "pid", required = true, value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// What the pids are: `all-in-one` or `cluster`.
    #[arg(long, default_value = "all-in-one", value_parser = ["all-in-one", "cluster"])]
    pub kind: String,
    /// The model file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Connections of the idle step (memory per connection).
    #[arg(long, default_value_t = 2000)]
    pub idle_connections: u32,
    /// Clients of each load step.
    #[arg(long, default_value_t = 200)]
    pub clients: u32,
    /// Members per room of the send-heavy steps.
    #[arg(long, default_value_t = 2)]
    pub small_room: u32,
    /// Members per room of the delivery-heavy steps.
    #[arg(long, default_value_t = 100)]
    pub large_room: u32,
    /// Sends/s of the small-room steps.
    #[arg(long, default_value = "500,1000,2000", value_parser = rates)]
    pub small_rates: Rates,
    /// Sends/s of the large-room steps.
    #[arg(long, default_value = "200,600,1200", value_parser = rates)]
    pub large_rates: Rates,
    /// Measured phase of each step.
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    pub step: Duration,
    /// Connections per second while each step ramps up.
    #[arg(long, default_value_t = 2000.0)]
    pub ramp: f64,
    /// Steps whose send→delivery p99 reaches this many ms were starved of CPU (by the load or by
    /// other work) and are left out of the fit, unless fewer than three would remain.
    #[arg(long, default_value_t = 100.0)]
    pub saturated_p99_ms: f64,
    /// Measure messages/s through this NATS server (core publish → subscribe).
    #[arg(long)]
    pub nats: Option<String>,
    /// Seconds of the NATS measurement.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub nats_duration: Duration,
    /// NATS messages/s of one node measured elsewhere (instead of --nats).
    #[arg(long)]
    pub nats_msgs_per_sec: Option<f64>,
    /// Single-message appends/s of one store node (default: docs/storage.md's Cassandra figure).
    #[arg(long, default_value_t = 685.0)]
    pub store_appends_per_sec: f64,
    /// Where --store-appends-per-sec comes from.
    #[arg(long, default_value = STORE_SOURCE)]
    pub store_source: String,
    /// CPU of cluster processes over the all-in-one's, per unit of work.
    #[arg(long, default_value_t = 1.97)]
    pub cluster_factor: f64,
    /// A gateway's --max-connections.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: u64,
    /// A gateway's open-file limit.
    #[arg(long, default_value_t = 20_000)]
    pub open_files: u64,
}

/// `loadgen capacity plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// The model file from `measure`.
    #[arg(long)]
    pub model: PathBuf,
    /// Concurrent users.
    #[arg(long)]
    pub users: u64,
    /// Sends per second, all users together.
    #[arg(long)]
    pub sends_per_sec: f64,
    /// Room sizes: K (every room K members) or zipf:ROOMS[:S].
    #[arg(long)]
    pub room_size: RoomSizes,
    /// Share of every resource kept free.
    #[arg(long, default_value_t = 0.3)]
    pub headroom: f64,
    /// Connections per user.
    #[arg(long, default_value_t = 1.0)]
    pub connections_per_user: f64,
    /// Rooms each user has joined.
    #[arg(long, default_value_t = 1.0)]
    pub rooms_per_user: f64,
    /// Store replication factor.
    #[arg(long, default_value_t = 3)]
    pub replication: u64,
    /// Replicas of the JetStream send stream.
    #[arg(long, default_value_t = 3)]
    pub nats_replicas: u64,
    /// Cores of each gateway/worker machine (default: the measured machine's).
    #[arg(long)]
    pub cores: Option<f64>,
    /// Memory of each gateway machine in GiB (default: the measured machine's).
    #[arg(long)]
    pub mem_gib: Option<f64>,
}

/// `loadgen capacity knee`.
#[derive(Debug, clap::Args)]
pub struct KneeArgs {
    /// The model file from `measure`.
    #[arg(long)]
    pub model: PathBuf,
    /// Connected clients of the workload.
    #[arg(long)]
    pub clients: u64,
    /// Members per room.
    #[arg(long)]
    pub room_size: f64,
    /// Cores the server and loadgen can have (default: all of the measured machine's; less when
    /// other work shares it).
    #[arg(long)]
    pub cores: Option<f64>,
}

/// `loadgen capacity sweep`.
#[derive(Debug, clap::Args)]
pub struct SweepArgs {
    /// Gateway WebSocket URL.
    #[arg(long, default_value = crate::config::DEFAULT_URL)]
    pub url: String,
    /// Server process id(s), to report its CPU per step (optional).
    #[arg(long = "pid", value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// Clients.
    #[arg(long, default_value_t = 1000)]
    pub clients: u32,
    /// Rooms (room size = clients / rooms).
    #[arg(long, default_value_t = 10)]
    pub rooms: u32,
    /// Sends/s of each step, in order.
    #[arg(long, value_parser = rates)]
    pub rates: Rates,
    /// Measured phase of each step.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub step: Duration,
    /// Connections per second while ramping.
    #[arg(long, default_value_t = 2000.0)]
    pub ramp: f64,
    /// The knee: the highest rate whose send→delivery p99 stays under this many ms.
    #[arg(long, default_value_t = 50.0)]
    pub p99_ms: f64,
    /// Runs per rate; a rate is judged on the median p99 of its runs (the machine is noisy).
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
}

/// The predicted saturation point of one server on the measured machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Knee {
    /// Sends/s at which the server uses one core.
    pub one_core_sends: f64,
    /// Sends/s at which the server and loadgen beside it use every core of the machine.
    pub machine_sends: f64,
    /// Deliveries per send.
    pub room_size: f64,
}

/// The saturation points the model predicts for `clients` clients in rooms of `room_size`.
pub fn predict_knee(m: &Model, clients: u64, room_size: f64) -> Knee {
    let c = &m.cpu;
    let base = c.quiet_cores + c.active_cores + c.idle_cores_per_connection * clients as f64;
    let server = c.seconds_per_send + c.seconds_per_delivery * room_size;
    let own = m.loadgen.seconds_per_send + m.loadgen.seconds_per_delivery * room_size;
    let per = |budget: f64, cost: f64| if cost > 0.0 { (budget - base).max(0.0) / cost } else { f64::INFINITY };
    Knee {
        one_core_sends: per(1.0, server),
        machine_sends: per(
            m.machine.cores_available.unwrap_or(m.machine.cores as f64) - m.loadgen.active_cores,
            server + own,
        ),
        room_size,
    }
}

/// Runs `loadgen capacity ARGS...` (`args` starts with the program name); returns the exit code.
pub fn main(args: Vec<String>) -> u8 {
    let cli = match CapacityCli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 64 } else { 0 };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen capacity: starting the runtime: {e}");
            return 2;
        }
    };
    let code = runtime.block_on(run(cli.command));
    runtime.shutdown_background();
    code
}

/// Runs one capacity command; returns the exit code (0 done, 2 failed, 64 bad input).
pub async fn run(command: Command) -> u8 {
    match command {
        Command::Measure(a) => measure_cmd(a).await,
        Command::Plan(a) => {
            let model = match Model::read(&a.model) {
                Ok(m) => m,
                Err(e) => return fail(&e, 64),
            };
            if !(0.0..1.0).contains(&a.headroom) || a.sends_per_sec < 0.0 || a.connections_per_user <= 0.0 {
                return fail("--headroom must be in [0, 1), --sends-per-sec ≥ 0, --connections-per-user > 0", 64);
            }
            let w = Workload {
                users: a.users,
                connections_per_user: a.connections_per_user,
                rooms_per_user: a.rooms_per_user,
                sends_per_sec: a.sends_per_sec,
                rooms: a.room_size,
                headroom: a.headroom,
                replication: a.replication,
                nats_replicas: a.nats_replicas,
                cores: a.cores,
                mem_kib: a.mem_gib.map(|g| g * 1024.0 * 1024.0),
            };
            println!(
                "model: {} ({}, {} cores, {}), measured with load average {:.1}",
                a.model.display(),
                model.server.kind,
                model.machine.cores,
                model.machine.cpu_model,
                model.machine.loadavg_before
            );
            print!("{}", plan::plan(&model, &w).render());
            0
        }
        Command::Knee(a) => {
            let model = match Model::read(&a.model) {
                Ok(m) => m,
                Err(e) => return fail(&e, 64),
            };
            let mut model = model;
            if let Some(cores) = a.cores {
                model.machine.cores = cores.max(0.0) as u32;
                model.machine.cores_available = Some(cores);
            }
            let k = predict_knee(&model, a.clients, a.room_size);
            println!(
                "server alone on one core: {:.0} sends/s = {:.0} deliveries/s ({:.1} µs per send + {:.2} µs per delivery x {})",
                k.one_core_sends,
                k.one_core_sends * k.room_size,
                model.cpu.seconds_per_send * 1e6,
                model.cpu.seconds_per_delivery * 1e6,
                k.room_size
            );
            println!(
                "server + loadgen on {} cores: {:.0} sends/s = {:.0} deliveries/s (the predicted knee on the measured machine)",
                model.machine.cores_available.unwrap_or(model.machine.cores as f64),
                k.machine_sends,
                k.machine_sends * k.room_size
            );
            0
        }
        Command::Sweep(a) => sweep_cmd(a).await,
    }
}

/// The median (upper middle for an even count); 0 for none.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn fail(msg: &str, code: u8) -> u8 {
    eprintln!("loadgen capacity: {msg}");
    code
}

async fn measure_cmd(a: MeasureArgs) -> u8 {
    let nats = match (&a.nats, a.nats_msgs_per_sec) {
        (Some(url), _) => match nats::measure(url, a.nats_duration).await {
            Ok(t) => t,
            Err(e) => return fail(&format!("measuring NATS at {url}: {e}"), 2),
        },
        (None, Some(n)) => Throughput { per_sec: n, source: "--nats-msgs-per-sec (measured elsewhere)".into() },
        (None, None) => Throughput { per_sec: 0.0, source: "not measured (use --nats URL)".into() },
    };
    let o = MeasureOptions {
        url: a.url,
        pids: a.pids,
        kind: a.kind,
        idle_connections: a.idle_connections,
        clients: a.clients,
        small_room: a.small_room,
        large_room: a.large_room,
        small_rates: a.small_rates.0,
        large_rates: a.large_rates.0,
        step: a.step,
        ramp: a.ramp,
        saturated_p99_ms: a.saturated_p99_ms,
        nats,
        store: Throughput { per_sec: a.store_appends_per_sec, source: a.store_source },
        cluster_factor: (a.cluster_factor, CLUSTER_FACTOR_SOURCE.into()),
        limits: Limits { max_connections: a.max_connections, open_files: a.open_files, ..Limits::default() },
        verbose: true,
    };
    let model = match measure::measure(&o).await {
        Ok(m) => m,
        Err(e) => return fail(&e.to_string(), 2),
    };
    for name in ["small-rooms", "large-rooms"] {
        let fitted = model.steps.iter().filter(|s| s.name == name && s.fitted).count();
        if fitted < 2 {
            eprintln!(
                "loadgen capacity: warning: only {fitted} {name} step(s) in the fit (the others were starved of CPU): \
                 the per-send and per-delivery costs are not well separated; measure again on a quieter machine"
            );
        }
    }
    if let Err(e) = model.write(&a.out) {
        return fail(&format!("writing {}: {e}", a.out.display()), 2);
    }
    let c = &model.cpu;
    println!(
        "per send {:.1} µs, per delivery {:.2} µs (fit rms {:.3} cores), idle {:.3} µs/s per connection, {:.2} KiB per connection; loadgen {:.1} µs per send, {:.2} µs per delivery",
        c.seconds_per_send * 1e6,
        c.seconds_per_delivery * 1e6,
        c.fit_rms_cores,
        c.idle_cores_per_connection * 1e6,
        model.memory.kib_per_connection,
        model.loadgen.seconds_per_send * 1e6,
        model.loadgen.seconds_per_delivery * 1e6
    );
    eprintln!("loadgen capacity: wrote {}", a.out.display());
    0
}

async fn sweep_cmd(a: SweepArgs) -> u8 {
    if proc::sample(&a.pids).is_none() {
        return fail(&format!("cannot read /proc of pid(s) {:?}", a.pids), 2);
    }
    let sampler = proc::Sampler::start(a.pids.clone(), Duration::from_millis(50));
    println!(
        "{:>8} {:>9} {:>12} {:>8} {:>8} {:>8} {:>6}",
        "rate", "sends/s", "deliveries/s", "p99 ms", "server", "loadgen", "audit"
    );
    let mut knee: Option<f64> = None;
    let mut broken = false;
    for &rate in &a.rates.0 {
        let mut p99s = Vec::new();
        let mut passed = true;
        for _ in 0..a.repeat.max(1) {
            let spec = StepSpec { name: format!("sweep-{rate}"), clients: a.clients, rooms: a.rooms, rate };
            let r = match measure::run_step(&a.url, &spec, a.step, a.ramp, &sampler).await {
                Ok(r) => r,
                Err(e) => return fail(&e.to_string(), 2),
            };
            println!(
                "{:>8.0} {:>9.0} {:>12.0} {:>8.1} {:>8.3} {:>8.3} {:>6}",
                rate,
                r.sends_per_sec,
                r.deliveries_per_sec,
                r.e2e_p99_ms,
                r.server_cores,
                r.loadgen_cores,
                if r.passed { "passed" } else { "FAILED" }
            );
            p99s.push(r.e2e_p99_ms);
            passed &= r.passed;
        }
        let p99 = median(&mut p99s);
        let ok = passed && p99 < a.p99_ms;
        if a.repeat > 1 {
            println!("{rate:>8.0}  median p99 {p99:.1} ms: {}", if ok { "under the limit" } else { "over the limit" });
        }
        if ok && !broken {
            knee = Some(rate);
        } else if !ok {
            broken = true;
        }
    }
    match knee {
        Some(k) => println!(
            "knee: {k:.0} sends/s ({:.0} deliveries/s): the highest rate before the first with p99 ≥ {} ms",
            k * a.clients as f64 / a.rooms.max(1) as f64,
            a.p99_ms
        ),
        None => println!("knee: below the first rate"),
    }
    0
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Options as the CLI's defaults would give them.
    pub(crate) fn options() -> MeasureOptions {
        MeasureOptions {
            url: "ws://127.0.0.1:1/ws".into(),
            pids: vec![1],
            kind: "all-in-one".into(),
            idle_connections: 10,
            clients: 10,
            small_room: 2,
            large_room: 10,
            small_rates: vec![10.0],
            large_rates: vec![5.0],
            step: Duration::from_secs(1),
            ramp: 0.0,
            saturated_p99_ms: 100.0,
            nats: Throughput { per_sec: 0.0, source: "none".into() },
            store: Throughput { per_sec: 685.0, source: STORE_SOURCE.into() },
            cluster_factor: (2.0, "test".into()),
            limits: Limits::default(),
            verbose: false,
        }
    }

    #[test]
    fn the_knee_is_where_the_cores_run_out() {
        let m = model::tests::sample();
        // Server 100 + 2 x 100 = 300 µs per send in rooms of 100; loadgen 20 + 3 x 100 = 320 µs.
        let k = predict_knee(&m, 1000, 100.0);
        assert!((k.one_core_sends - 1.0 / 300e-6).abs() < 1e-6, "{k:?}");
        assert!((k.machine_sends - 2.0 / 620e-6).abs() < 1e-6, "{k:?}");
    }

    #[test]
    fn the_command_line_parses() {
        let cli = CapacityCli::try_parse_from([
            "x",
            "plan",
            "--model",
            "m.toml",
            "--users",
            "1000",
            "--sends-per-sec",
            "50",
            "--room-size",
            "zipf:100:1.2",
        ])
        .unwrap();
        let Command::Plan(p) = cli.command else { panic!("plan") };
        assert_eq!(p.room_size, RoomSizes::Zipf { rooms: 100, s: 1.2 });
        assert_eq!(p.headroom, 0.3);
        let cli =
            CapacityCli::try_parse_from(["x", "measure", "--pid", "1,2", "--out", "m.toml", "--small-rates", "1,2"])
                .unwrap();
        let Command::Measure(m) = cli.command else { panic!("measure") };
        assert_eq!((m.pids, m.small_rates.0), (vec![1, 2], vec![1.0, 2.0]));
        assert!(CapacityCli::try_parse_from(["x", "measure", "--out", "m.toml"]).is_err(), "--pid is required");
        assert!(rates("1,x").is_err());
        assert_eq!(median(&mut [30.0, 90.0, 40.0]), 40.0);
        assert_eq!(median(&mut []), 0.0);
    }
}
