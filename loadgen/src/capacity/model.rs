//! The capacity model: unit costs measured on one machine (`loadgen capacity measure`), written
//! as a commented TOML file and read back by `loadgen capacity plan`.
//!
//! The file is written by hand (every figure with a comment saying what it is and where it came
//! from) and read with serde, so a person can check or edit a figure and the planner still reads it.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Version of the model file's layout.
pub const MODEL_VERSION: u32 = 1;

/// Everything the planner needs, and what it was measured on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    /// Layout version ([`MODEL_VERSION`]).
    pub version: u32,
    /// When the measurement ended, ms since the Unix epoch.
    pub measured_unix_ms: i64,
    /// The machine the costs were measured on.
    pub machine: Machine,
    /// What was measured: `all-in-one` or `cluster`, and how.
    pub server: ServerInfo,
    /// CPU costs of the measured server processes.
    pub cpu: CpuCosts,
    /// Memory of the measured server processes.
    pub memory: MemoryCosts,
    /// loadgen's own CPU costs (needed to predict a knee when loadgen shares the machine).
    pub loadgen: LoadgenCosts,
    /// NATS throughput of one node.
    pub nats: Throughput,
    /// Store appends of one node.
    pub store: Throughput,
    /// Per-process limits the planner respects.
    pub limits: Limits,
    /// The measured steps the costs were fitted from.
    #[serde(default, rename = "step")]
    pub steps: Vec<StepResult>,
}

/// The machine a model was measured on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// Logical CPUs available to processes.
    pub cores: u32,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// Physical memory, KiB.
    pub mem_total_kib: u64,
    /// 1-minute load average when the measurement started (other work on the machine).
    pub loadavg_before: f64,
    /// 1-minute load average when it ended.
    pub loadavg_after: f64,
    /// Kernel release.
    pub kernel: String,
    /// Cores actually available when other work shares the machine (set by `knee --cores`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores_available: Option<f64>,
}

/// What was measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// `all-in-one` (gateway, fanout and store in one process) or `cluster` (gateway and worker
    /// processes; NATS and the store not counted).
    pub kind: String,
    /// The gateway URL the load went to.
    pub url: String,
    /// Process ids whose CPU and memory were read from /proc.
    pub pids: Vec<u32>,
    /// The server ran inside loadgen's own process (tests): its CPU includes loadgen's.
    pub in_process: bool,
}

/// CPU costs in CPU-seconds (of one core) per unit of work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuCosts {
    /// Server cores used with nothing connected.
    pub quiet_cores: f64,
    /// Extra cores per idle joined connection.
    pub idle_cores_per_connection: f64,
    /// Cores a server spends as soon as it carries any sends, whatever the rate (the fit's
    /// intercept: timers, wake-ups, and the batching that makes the cost per message fall as
    /// the rate rises).
    #[serde(default)]
    pub active_cores: f64,
    /// CPU-seconds per accepted send (receive, sequence, store, ack).
    pub seconds_per_send: f64,
    /// CPU-seconds per delivery (one message written to one member).
    pub seconds_per_delivery: f64,
    /// Root mean square of the fit's residuals, cores.
    pub fit_rms_cores: f64,
    /// Cluster processes spend this many times the all-in-one CPU per unit of work (NATS client
    /// encode/decode, JetStream acks, CQL driver); 1 for a model measured on a cluster.
    pub cluster_factor: f64,
    /// Where `cluster_factor` comes from.
    pub cluster_factor_source: String,
}

/// Memory costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryCosts {
    /// Resident memory of the server before the idle step, KiB.
    pub base_kib: f64,
    /// Extra resident memory per idle joined connection, KiB.
    pub kib_per_connection: f64,
    /// Connections the memory figure was measured with.
    pub measured_connections: u64,
}

/// loadgen's own CPU, per unit of work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadgenCosts {
    /// CPU-seconds per send.
    pub seconds_per_send: f64,
    /// CPU-seconds per delivery checked.
    pub seconds_per_delivery: f64,
    /// Cores as soon as there are sends (the fit's intercept).
    #[serde(default)]
    pub active_cores: f64,
}

/// A throughput figure of one node, measured here or taken from elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    /// Per second; 0 when unknown.
    pub per_sec: f64,
    /// How it was obtained (the command, or the document it was copied from).
    pub source: String,
}

/// Limits of one process that the planner respects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// `--max-connections` of a gateway.
    pub max_connections: u64,
    /// Open files per process (`ulimit -n`).
    pub open_files: u64,
    /// Sockets the gateway keeps below the open-file limit for NATS, CQL and files.
    pub reserved_files: u64,
    /// Send partitions (`chat.send.<p>.<room>`): more fanout workers than this stay idle.
    pub partitions: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_connections: 10_000, open_files: 20_000, reserved_files: 256, partitions: 16 }
    }
}

/// One measured step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    /// Name (`quiet`, `idle`, `small-rooms`, `large-rooms`).
    pub name: String,
    /// Connected clients.
    pub clients: u64,
    /// Rooms.
    pub rooms: u64,
    /// Mean members per room.
    pub room_size: f64,
    /// Scheduled sends per second.
    pub rate: f64,
    /// Measured phase length, s.
    pub seconds: f64,
    /// Sends written per second.
    pub sends_per_sec: f64,
    /// Deliveries per second.
    pub deliveries_per_sec: f64,
    /// Server cores used in the measured phase.
    pub server_cores: f64,
    /// loadgen cores used in the measured phase.
    pub loadgen_cores: f64,
    /// Server resident memory at the end of the measured phase, KiB.
    pub rss_kib: f64,
    /// Send → delivery p99, ms.
    pub e2e_p99_ms: f64,
    /// The step's audit passed.
    pub passed: bool,
    /// The step was used in the cost fit (not starved of CPU).
    #[serde(default = "yes")]
    pub fitted: bool,
}

fn yes() -> bool {
    true
}

impl Model {
    /// Reads a model file.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses a model from TOML text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let model: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        if model.version != MODEL_VERSION {
            return Err(format!("model version {} is not {MODEL_VERSION}; measure again", model.version));
        }
        Ok(model)
    }

    /// Writes the model file.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_toml())
    }

    /// The model as commented TOML.
    pub fn to_toml(&self) -> String {
        let mut w = TomlWriter::default();
        w.comment("chat capacity model, written by `loadgen capacity measure`; read by `loadgen capacity plan`.");
        w.comment("Costs are CPU-seconds of one core per unit of work on the machine below. docs/capacity.md");
        w.comment("explains each figure and its assumptions.");
        w.int("version", self.version as i64);
        w.int("measured_unix_ms", self.measured_unix_ms);

        let m = &self.machine;
        w.table("machine");
        w.int("cores", m.cores as i64);
        w.string("cpu_model", &m.cpu_model);
        w.int("mem_total_kib", m.mem_total_kib as i64);
        w.float_c("loadavg_before", m.loadavg_before, "other work on the machine shows here");
        w.float("loadavg_after", m.loadavg_after);
        w.string("kernel", &m.kernel);

        let s = &self.server;
        w.table("server");
        w.string("kind", &s.kind);
        w.string("url", &s.url);
        w.line(&format!("pids = [{}]", s.pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")));
        w.bool_c("in_process", s.in_process, "true: the server's CPU includes loadgen's own");

        let c = &self.cpu;
        w.table("cpu");
        w.float_c("quiet_cores", c.quiet_cores, "server cores with nothing connected");
        w.float_c("idle_cores_per_connection", c.idle_cores_per_connection, "per idle joined connection");
        w.float_c("active_cores", c.active_cores, "as soon as there are sends: the fit's intercept");
        w.float_c(
            "seconds_per_send",
            c.seconds_per_send,
            &format!("{:.1} µs: receive, sequence, store, ack", c.seconds_per_send * 1e6),
        );
        w.float_c(
            "seconds_per_delivery",
            c.seconds_per_delivery,
            &format!("{:.2} µs: one message written to one member", c.seconds_per_delivery * 1e6),
        );
        w.float_c("fit_rms_cores", c.fit_rms_cores, "how far the steps are from the fitted line");
        w.float("cluster_factor", c.cluster_factor);
        w.string("cluster_factor_source", &c.cluster_factor_source);

        let mem = &self.memory;
        w.table("memory");
        w.float_c("base_kib", mem.base_kib, "resident memory before the idle step");
        w.float_c("kib_per_connection", mem.kib_per_connection, "per idle joined connection");
        w.int("measured_connections", mem.measured_connections as i64);

        w.table("loadgen");
        w.float("seconds_per_send", self.loadgen.seconds_per_send);
        w.float("seconds_per_delivery", self.loadgen.seconds_per_delivery);
        w.float("active_cores", self.loadgen.active_cores);

        for (name, t, what) in [
            ("nats", &self.nats, "messages per second through one NATS node"),
            ("store", &self.store, "single-message appends per second of one store node"),
        ] {
            w.table(name);
            w.float_c("per_sec", t.per_sec, what);
            w.string("source", &t.source);
        }

        let l = &self.limits;
        w.table("limits");
        w.int_c("max_connections", l.max_connections as i64, "a gateway's --max-connections default");
        w.int_c("open_files", l.open_files as i64, "ulimit -n of a gateway");
        w.int_c("reserved_files", l.reserved_files as i64, "kept below the open-file limit");
        w.int_c("partitions", l.partitions as i64, "send partitions: at most this many busy workers");

        for st in &self.steps {
            w.array_table("step");
            w.string("name", &st.name);
            w.int("clients", st.clients as i64);
            w.int("rooms", st.rooms as i64);
            w.float("room_size", st.room_size);
            w.float("rate", st.rate);
            w.float("seconds", st.seconds);
            w.float("sends_per_sec", st.sends_per_sec);
            w.float("deliveries_per_sec", st.deliveries_per_sec);
            w.float("server_cores", st.server_cores);
            w.float("loadgen_cores", st.loadgen_cores);
            w.float("rss_kib", st.rss_kib);
            w.float("e2e_p99_ms", st.e2e_p99_ms);
            w.bool_c("passed", st.passed, "the step's delivery audit");
            w.bool_c("fitted", st.fitted, "used in the cost fit (false: p99 showed it starved of CPU)");
        }
        w.out
    }
}

/// A tiny TOML writer: values always written in a form that reads back as the same type.
#[derive(Default)]
struct TomlWriter {
    out: String,
}

impl TomlWriter {
    fn line(&mut self, text: &str) {
        self.out.push_str(text);
        self.out.push('\n');
    }
    fn comment(&mut self, text: &str) {
        let _ = writeln!(self.out, "# {text}");
    }
    fn table(&mut self, name: &str) {
        let _ = writeln!(self.out, "\n[{name}]");
    }
    fn array_table(&mut self, name: &str) {
        let _ = writeln!(self.out, "\n[[{name}]]");
    }
    fn int(&mut self, key: &str, v: i64) {
        let _ = writeln!(self.out, "{key} = {v}");
    }
    fn int_c(&mut self, key: &str, v: i64, comment: &str) {
        let _ = writeln!(self.out, "{key} = {v}  # {comment}");
    }
    fn float(&mut self, key: &str, v: f64) {
        let _ = writeln!(self.out, "{key} = {}", toml_float(v));
    }
    fn float_c(&mut self, key: &str, v: f64, comment: &str) {
        let _ = writeln!(self.out, "{key} = {}  # {comment}", toml_float(v));
    }
    fn bool_c(&mut self, key: &str, v: bool, comment: &str) {
        let _ = writeln!(self.out, "{key} = {v}  # {comment}");
    }
    fn string(&mut self, key: &str, v: &str) {
        // A JSON string is a valid TOML basic string.
        let quoted = serde_json::to_string(v).unwrap_or_else(|_| "\"\"".into());
        let _ = writeln!(self.out, "{key} = {quoted}");
    }
}

/// `{:?}` of a finite f64 always has a `.` or an exponent, so TOML reads it as a float.
fn toml_float(v: f64) -> String {
    if v.is_finite() {
        format!("{v:?}")
    } else {
        "0.0".into()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A model with round figures, for the planner's tests.
    pub(crate) fn sample() -> Model {
        Model {
            version: MODEL_VERSION,
            measured_unix_ms: 1,
            machine: Machine {
                cores: 2,
                cpu_model: "Test \"CPU\"".into(),
                mem_total_kib: 24 << 20,
                loadavg_before: 0.5,
                loadavg_after: 1.0,
                kernel: "6.1".into(),
                cores_available: None,
            },
            server: ServerInfo {
                kind: "all-in-one".into(),
                url: "ws://x/ws".into(),
                pids: vec![1, 2],
                in_process: false,
            },
            cpu: CpuCosts {
                quiet_cores: 0.0,
                idle_cores_per_connection: 0.0,
                active_cores: 0.0,
                seconds_per_send: 100e-6,
                seconds_per_delivery: 2e-6,
                fit_rms_cores: 0.01,
                cluster_factor: 2.0,
                cluster_factor_source: "test".into(),
            },
            memory: MemoryCosts { base_kib: 10_000.0, kib_per_connection: 8.0, measured_connections: 1000 },
            loadgen: LoadgenCosts { seconds_per_send: 20e-6, seconds_per_delivery: 3e-6, active_cores: 0.0 },
            nats: Throughput { per_sec: 1_000_000.0, source: "test".into() },
            store: Throughput { per_sec: 1000.0, source: "test".into() },
            limits: Limits::default(),
            steps: vec![StepResult {
                name: "idle".into(),
                clients: 10,
                rooms: 1,
                room_size: 10.0,
                rate: 1.0,
                seconds: 2.0,
                sends_per_sec: 1.0,
                deliveries_per_sec: 10.0,
                server_cores: 0.1,
                loadgen_cores: 0.2,
                rss_kib: 1.0,
                e2e_p99_ms: 3.0,
                passed: true,
                fitted: true,
            }],
        }
    }

    #[test]
    fn a_model_reads_back_as_written() {
        let model = sample();
        let text = model.to_toml();
        assert!(text.contains("# 100.0 µs"), "{text}");
        assert_eq!(Model::parse(&text).unwrap(), model);
    }

    #[test]
    fn whole_floats_stay_floats_and_bad_versions_are_refused() {
        assert_eq!(toml_float(1.0), "1.0");
        assert_eq!(toml_float(f64::NAN), "0.0");
        let text = sample().to_toml().replace("version = 1\n", "version = 9\n");
        assert!(Model::parse(&text).unwrap_err().contains("version 9"));
    }
}
