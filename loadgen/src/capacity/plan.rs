//! Planning: from a [`Model`] and a workload (users, sends/s, room sizes, headroom) to the number
//! of gateways, fanout workers, NATS nodes and store nodes, with the arithmetic written out.
//!
//! Every per-process budget is the measured machine's resource times `1 - headroom`. The rules
//! (and why each one is conservative) are in docs/capacity.md.

use std::fmt::Write as _;

use super::model::Model;

/// How members are spread over rooms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RoomSizes {
    /// Every room has this many members.
    Fixed(f64),
    /// Memberships spread over `rooms` rooms, room k getting a share ∝ 1/k^s.
    Zipf {
        /// Rooms.
        rooms: u64,
        /// Exponent.
        s: f64,
    },
}

impl std::str::FromStr for RoomSizes {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}`: use K, fixed:K, or zipf:ROOMS[:S] (e.g. 100, zipf:5000:1.1)");
        let parts: Vec<&str> = text.split(':').collect();
        match parts.as_slice() {
            [k] | ["fixed", k] => match k.parse::<f64>() {
                Ok(k) if k.is_finite() && k >= 1.0 => Ok(Self::Fixed(k)),
                _ => Err(bad()),
            },
            ["zipf", rooms] | ["zipf", rooms, _] => {
                let rooms = rooms.parse::<u64>().ok().filter(|&r| (1..=10_000_000).contains(&r)).ok_or_else(bad)?;
                let s = match parts.get(2) {
                    Some(s) => s.parse::<f64>().ok().filter(|s| s.is_finite() && *s > 0.0).ok_or_else(bad)?,
                    None => 1.0,
                };
                Ok(Self::Zipf { rooms, s })
            }
            _ => Err(bad()),
        }
    }
}

/// A workload to plan for.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Concurrent users.
    pub users: u64,
    /// Connections each user holds (tabs, devices).
    pub connections_per_user: f64,
    /// Rooms each user has joined.
    pub rooms_per_user: f64,
    /// Sends per second, all users together.
    pub sends_per_sec: f64,
    /// Room sizes.
    pub rooms: RoomSizes,
    /// Share of every resource kept free (0.3 = plan to 70 %).
    pub headroom: f64,
    /// Store replication factor.
    pub replication: u64,
    /// NATS JetStream replicas of the send stream.
    pub nats_replicas: u64,
    /// Cores of a gateway or worker machine (default: the measured machine's).
    pub cores: Option<f64>,
    /// Memory of a gateway machine, KiB (default: the measured machine's).
    pub mem_kib: Option<f64>,
}

/// Room-size figures derived from a [`RoomSizes`].
#[derive(Debug, Clone, PartialEq)]
pub struct RoomFigures {
    /// Rooms.
    pub rooms: f64,
    /// Mean members per room.
    pub mean_size: f64,
    /// Deliveries per send: the size of the room a send goes to, averaged over sends. Members
    /// send alike, so a room's share of sends is its share of members: Σ size² / Σ size.
    pub deliveries_per_send: f64,
    /// Members of the largest room.
    pub largest: f64,
    /// Share of all sends that go to the largest room.
    pub largest_share: f64,
    /// Room sizes (for fixed sizes, a sample of at most 1000 alike rooms).
    sizes: Vec<f64>,
}

impl RoomFigures {
    /// Figures for `memberships` member slots spread as `dist` says.
    pub fn of(dist: RoomSizes, memberships: f64) -> Self {
        let sizes: Vec<f64> = match dist {
            RoomSizes::Fixed(k) => {
                // A sample of the rooms is enough: all are alike, and only ratios are used.
                let rooms = (memberships / k).ceil().clamp(1.0, 1000.0);
                vec![k.min(memberships.max(1.0)); rooms as usize]
            }
            RoomSizes::Zipf { rooms, s } => {
                let weights: Vec<f64> = (1..=rooms).map(|k| 1.0 / (k as f64).powf(s)).collect();
                let total: f64 = weights.iter().sum();
                weights.iter().map(|w| memberships * w / total).collect()
            }
        };
        let rooms = match dist {
            RoomSizes::Fixed(k) => (memberships / k).ceil().max(1.0),
            RoomSizes::Zipf { rooms, .. } => rooms as f64,
        };
        let sum: f64 = sizes.iter().sum();
        let sum_sq: f64 = sizes.iter().map(|s| s * s).sum();
        let largest = sizes.iter().copied().fold(0.0, f64::max);
        let deliveries_per_send = if sum > 0.0 { sum_sq / sum } else { 0.0 };
        let largest_share = match dist {
            RoomSizes::Fixed(_) => 1.0 / rooms,
            RoomSizes::Zipf { .. } if sum > 0.0 => largest / sum,
            RoomSizes::Zipf { .. } => 0.0,
        };
        Self { rooms, mean_size: memberships / rooms, deliveries_per_send, largest, largest_share, sizes }
    }

    /// Expected gateways holding members of the room of a send, with `g` gateways.
    pub fn gateways_per_send(&self, g: f64) -> f64 {
        if g <= 1.0 {
            return 1.0;
        }
        let span = |k: f64| g * (1.0 - (1.0 - 1.0 / g).powf(k));
        let sum: f64 = self.sizes.iter().sum();
        if sum <= 0.0 {
            return 1.0;
        }
        self.sizes.iter().map(|&k| k / sum * span(k)).sum()
    }
}

/// One component's count and what decided it.
#[derive(Debug, Clone, PartialEq)]
pub struct Count {
    /// Processes or nodes.
    pub count: u64,
    /// The limit that decided the count.
    pub limited_by: String,
    /// Demand over supply of that limit at this count (≤ 1 - headroom when planned well).
    pub utilisation: f64,
}

/// The answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Gateways.
    pub gateways: Count,
    /// Fanout workers.
    pub workers: Count,
    /// NATS nodes.
    pub nats: Count,
    /// Store nodes.
    pub store: Count,
    /// Deliveries per second.
    pub deliveries_per_sec: f64,
    /// Which component and limit binds first: the highest utilisation.
    pub bottleneck: String,
    /// Warnings (limits the plan cannot fix by adding processes).
    pub warnings: Vec<String>,
    /// The arithmetic, one line each.
    pub lines: Vec<String>,
}

fn ceil_div(demand: f64, supply: f64) -> u64 {
    if supply <= 0.0 {
        return u64::MAX;
    }
    ((demand / supply) - 1e-9).ceil().max(1.0) as u64
}

/// Plans `w` with the costs of `m`.
pub fn plan(m: &Model, w: &Workload) -> Plan {
    let mut lines = Vec::new();
    let mut warnings = Vec::new();
    let mut say = |s: String| lines.push(s);
    let use_share = 1.0 - w.headroom;
    let cores = w.cores.unwrap_or(m.machine.cores as f64);
    let mem_kib = w.mem_kib.unwrap_or(m.machine.mem_total_kib as f64);
    let c = &m.cpu;
    let factor = if m.server.kind == "cluster" { 1.0 } else { c.cluster_factor };

    // Workload.
    let conns = w.users as f64 * w.connections_per_user;
    let memberships = w.users as f64 * w.rooms_per_user;
    let rooms = RoomFigures::of(w.rooms, memberships);
    let deliveries = w.sends_per_sec * rooms.deliveries_per_send * w.connections_per_user;
    say(format!(
        "workload: {} users x {} connections = {conns:.0} connections; {memberships:.0} memberships in {:.0} rooms (mean {:.1} members, largest {:.0})",
        w.users, w.connections_per_user, rooms.rooms, rooms.mean_size, rooms.largest
    ));
    say(format!(
        "deliveries/s = sends/s x members of a send's room x connections per user = {:.0} x {:.2} x {} = {deliveries:.0}",
        w.sends_per_sec, rooms.deliveries_per_send, w.connections_per_user
    ));
    say(format!(
        "budget per process: {cores} cores x (1 - headroom {}) = {:.2} cores; {:.0} MiB x {use_share:.2} memory",
        w.headroom,
        cores * use_share,
        mem_kib / 1024.0
    ));
    if factor != 1.0 {
        say(format!("cluster CPU factor {factor} over the all-in-one costs ({})", c.cluster_factor_source));
    }

    // Gateways: CPU, connections, memory.
    let gw_cpu = (w.sends_per_sec * c.seconds_per_send + deliveries * c.seconds_per_delivery) * factor
        + conns * c.idle_cores_per_connection;
    let per_gw_cores = cores * use_share - c.quiet_cores - c.active_cores;
    let g_cpu = ceil_div(gw_cpu, per_gw_cores);
    say(format!(
        "gateway CPU = ({:.0} sends/s x {:.1} µs + {deliveries:.0} deliveries/s x {:.2} µs) x {factor} + {conns:.0} x {:.3} µs idle = {gw_cpu:.2} cores -> {g_cpu} gateways of {per_gw_cores:.2} cores",
        w.sends_per_sec,
        c.seconds_per_send * 1e6,
        c.seconds_per_delivery * 1e6,
        c.idle_cores_per_connection * 1e6
    ));
    let l = &m.limits;
    let conn_cap = (l.max_connections as f64).min(l.open_files.saturating_sub(l.reserved_files) as f64);
    let g_conn = ceil_div(conns, conn_cap * use_share);
    say(format!(
        "gateway connections: {conns:.0} / (min(--max-connections {}, open files {} - {}) = {conn_cap:.0} x {use_share:.2}) -> {g_conn} gateways",
        l.max_connections, l.open_files, l.reserved_files
    ));
    let mem_need = conns * m.memory.kib_per_connection;
    let mem_supply = mem_kib * use_share - m.memory.base_kib;
    let g_mem = ceil_div(mem_need, mem_supply);
    say(format!(
        "gateway memory: {conns:.0} x {:.2} KiB = {:.0} MiB / ({:.0} MiB per gateway less {:.0} MiB base) -> {g_mem} gateways",
        m.memory.kib_per_connection,
        mem_need / 1024.0,
        mem_kib * use_share / 1024.0,
        m.memory.base_kib / 1024.0
    ));
    let g = g_cpu.max(g_conn).max(g_mem);
    let gf = g as f64;
    let gw_options = [
        ("CPU", gw_cpu / (gf * (cores - c.quiet_cores - c.active_cores))),
        ("connections", conns / (gf * conn_cap)),
        ("memory", (mem_need / gf + m.memory.base_kib) / mem_kib),
    ];
    let gateways = pick(g, &gw_options);

    // Workers: the per-send cost (sequence, store, publish, ack), once more at the worker.
    let wk_cpu = w.sends_per_sec * c.seconds_per_send * factor;
    let per_wk = cores * use_share - c.active_cores;
    let wn = ceil_div(wk_cpu, per_wk);
    say(format!(
        "worker CPU = {:.0} sends/s x {:.1} µs x {factor} = {wk_cpu:.2} cores -> {wn} workers of {per_wk:.2} cores",
        w.sends_per_sec,
        c.seconds_per_send * 1e6
    ));
    if wn > l.partitions {
        warnings.push(format!(
            "{wn} workers needed but sends have {} partitions: at most {} workers are busy; raise the partition count",
            l.partitions, l.partitions
        ));
    }
    let hot_sends = w.sends_per_sec * rooms.largest_share;
    let hot_cores = hot_sends * c.seconds_per_send * factor;
    say(format!(
        "hottest room: {:.1} % of sends = {hot_sends:.0} sends/s, {hot_cores:.2} cores of one worker (a room is sequenced by one worker)",
        rooms.largest_share * 100.0
    ));
    if hot_cores > per_wk {
        warnings.push(format!(
            "the largest room alone needs {hot_cores:.2} cores of one worker (budget {per_wk:.2}): more workers do not help"
        ));
    }
    let workers = pick(wn, &[("CPU", wk_cpu / (wn as f64 * cores))]);

    // NATS: each send is a JetStream publish + ack and a reply, and one delivery message per
    // gateway that holds members of the room.
    let span = rooms.gateways_per_send(gf);
    let nats_msgs = w.sends_per_sec * (2.0 + span);
    let nats = if m.nats.per_sec > 0.0 {
        let by_load = ceil_div(nats_msgs, m.nats.per_sec * use_share);
        let n = by_load.max(w.nats_replicas);
        say(format!(
            "NATS msgs/s = sends/s x (publish + reply + {span:.2} gateways per room) = {nats_msgs:.0}; one node {:.0}/s x {use_share:.2} -> {by_load} node(s), at least {} for R{} -> {n}",
            m.nats.per_sec, w.nats_replicas, w.nats_replicas
        ));
        if w.sends_per_sec > m.nats.per_sec * use_share {
            warnings.push(format!(
                "{:.0} sends/s go through the one send stream's leader, which alone handles about {:.0} msgs/s: more NATS nodes add availability, not stream throughput",
                w.sends_per_sec, m.nats.per_sec
            ));
        }
        Count {
            count: n,
            limited_by: if by_load > w.nats_replicas { "messages/s".into() } else { "replicas".into() },
            utilisation: nats_msgs / (n as f64 * m.nats.per_sec),
        }
    } else {
        say(format!(
            "NATS msgs/s = {nats_msgs:.0}; no per-node figure in the model (measure with --nats): {} for R{}",
            w.nats_replicas, w.nats_replicas
        ));
        Count { count: w.nats_replicas, limited_by: "replicas (throughput unknown)".into(), utilisation: 0.0 }
    };

    // Store: every send is appended on `replication` replicas.
    let store = if m.store.per_sec > 0.0 {
        let writes = w.sends_per_sec * w.replication as f64;
        let by_load = ceil_div(writes, m.store.per_sec * use_share);
        let n = by_load.max(w.replication);
        say(format!(
            "store appends = {:.0} sends/s x RF {} = {writes:.0} replica appends/s; one node {:.0}/s x {use_share:.2} -> {by_load} node(s), at least RF -> {n}",
            w.sends_per_sec, w.replication, m.store.per_sec
        ));
        Count {
            count: n,
            limited_by: if by_load > w.replication { "appends/s".into() } else { "replication".into() },
            utilisation: writes / (n as f64 * m.store.per_sec),
        }
    } else {
        say(format!("store: no per-node figure in the model: {} for RF {}", w.replication, w.replication));
        Count { count: w.replication, limited_by: "replication (throughput unknown)".into(), utilisation: 0.0 }
    };

    let all = [("gateways", &gateways), ("workers", &workers), ("NATS", &nats), ("store", &store)];
    let (name, worst) =
        all.iter().max_by(|a, b| a.1.utilisation.total_cmp(&b.1.utilisation)).copied().unwrap_or(all[0]);
    let bottleneck = format!("{name} ({}, {:.0} % used at this count)", worst.limited_by, worst.utilisation * 100.0);
    if gw_cpu + wk_cpu <= cores * use_share && g_conn == 1 && g_mem == 1 {
        lines.push(format!(
            "all of it fits one all-in-one process: {:.2} of {:.2} cores, {conns:.0} connections",
            gw_cpu + wk_cpu,
            cores * use_share
        ));
    }
    Plan { gateways, workers, nats, store, deliveries_per_sec: deliveries, bottleneck, warnings, lines }
}

/// The count and the limit with the highest utilisation at that count.
fn pick(count: u64, options: &[(&str, f64)]) -> Count {
    let (name, u) = options.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap_or(("CPU", 0.0));
    Count { count, limited_by: name.into(), utilisation: u }
}

impl Plan {
    /// The plan as text: arithmetic, then the answer.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for l in &self.lines {
            let _ = writeln!(out, "  {l}");
        }
        let _ = writeln!(out);
        for (name, c) in [
            ("gateways", &self.gateways),
            ("fanout workers", &self.workers),
            ("NATS nodes", &self.nats),
            ("store nodes", &self.store),
        ] {
            let _ = writeln!(
                out,
                "{name:>15}: {:>5}   (limited by {}, {:.0} % used)",
                c.count,
                c.limited_by,
                c.utilisation * 100.0
            );
        }
        let _ = writeln!(out, "     bottleneck: {}", self.bottleneck);
        for w in &self.warnings {
            let _ = writeln!(out, "        warning: {w}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::model::tests::sample;

    fn workload(users: u64, sends: f64, rooms: RoomSizes) -> Workload {
        Workload {
            users,
            connections_per_user: 1.0,
            rooms_per_user: 1.0,
            sends_per_sec: sends,
            rooms,
            headroom: 0.3,
            replication: 3,
            nats_replicas: 3,
            cores: None,
            mem_kib: None,
        }
    }

    #[test]
    fn room_sizes_parse() {
        assert_eq!("100".parse::<RoomSizes>().unwrap(), RoomSizes::Fixed(100.0));
        assert_eq!("fixed:8".parse::<RoomSizes>().unwrap(), RoomSizes::Fixed(8.0));
        assert_eq!("zipf:50".parse::<RoomSizes>().unwrap(), RoomSizes::Zipf { rooms: 50, s: 1.0 });
        assert_eq!("zipf:50:1.5".parse::<RoomSizes>().unwrap(), RoomSizes::Zipf { rooms: 50, s: 1.5 });
        for bad in ["0", "zipf", "zipf:0", "zipf:5:-1", "uniform", "fixed:x"] {
            assert!(bad.parse::<RoomSizes>().is_err(), "{bad}");
        }
    }

    #[test]
    fn deliveries_per_send_weight_rooms_by_their_senders() {
        let fixed = RoomFigures::of(RoomSizes::Fixed(100.0), 10_000.0);
        assert_eq!((fixed.rooms, fixed.mean_size, fixed.deliveries_per_send), (100.0, 100.0, 100.0));
        // Two rooms of 2/3 and 1/3 of 300 members: sends land in the big room 2/3 of the time.
        let z = RoomFigures::of(RoomSizes::Zipf { rooms: 2, s: 1.0 }, 300.0);
        assert!((z.mean_size - 150.0).abs() < 1e-9);
        assert!((z.deliveries_per_send - (200.0 * 200.0 + 100.0 * 100.0) / 300.0).abs() < 1e-9, "{z:?}");
        assert!((z.largest_share - 2.0 / 3.0).abs() < 1e-9);
        // One gateway: every room on it; many gateways: a room of 1 spans 1, a room of k spans < k.
        assert_eq!(fixed.gateways_per_send(1.0), 1.0);
        let one = RoomFigures::of(RoomSizes::Fixed(1.0), 10.0);
        assert!((one.gateways_per_send(4.0) - 1.0).abs() < 1e-9);
        assert!((RoomFigures::of(RoomSizes::Fixed(2.0), 10.0).gateways_per_send(2.0) - 1.5).abs() < 1e-9);
    }

    #[test]
    fn the_arithmetic_of_a_plan() {
        // 100 µs per send, 2 µs per delivery, cluster factor 2, 2 cores, 30 % headroom = 1.4 cores.
        let m = sample();
        let p = plan(&m, &workload(50_000, 1000.0, RoomSizes::Fixed(100.0)));
        assert_eq!(p.deliveries_per_sec, 100_000.0);
        // Gateway CPU (1000 x 100e-6 + 100000 x 2e-6) x 2 = 0.6 cores: 1 by CPU;
        // connections: 50,000 / (10,000 x 0.7) = 7.14 -> 8 gateways.
        assert_eq!(p.gateways.count, 8);
        assert_eq!(p.gateways.limited_by, "connections");
        // Worker CPU 1000 x 100e-6 x 2 = 0.2 cores -> 1.
        assert_eq!(p.workers.count, 1);
        // Store: 1000 x 3 = 3000 appends / (1000 x 0.7) -> 5 nodes.
        assert_eq!(p.store.count, 5);
        assert_eq!(p.store.limited_by, "appends/s");
        // NATS: 1,000,000/s per node, so the 3 replicas are enough.
        assert_eq!(p.nats.count, 3);
        assert!(p.bottleneck.starts_with("gateways (connections, 62 %"), "{}", p.bottleneck);
        assert!(p.render().contains("bottleneck"));
    }

    #[test]
    fn cpu_bound_plans_and_warnings() {
        let mut m = sample();
        m.store.per_sec = 0.0;
        // 20,000 sends/s into rooms of 10: gateways (20000 x 100e-6 + 200000 x 2e-6) x 2 = 4.8 cores -> 4 of 1.4.
        let p = plan(&m, &workload(1000, 20_000.0, RoomSizes::Fixed(10.0)));
        assert_eq!(p.gateways.count, 4);
        assert_eq!(p.gateways.limited_by, "CPU");
        // Workers 4.0 cores -> 3 of 1.4.
        assert_eq!(p.workers.count, 3);
        assert_eq!(p.store.count, 3, "unknown store figure: RF nodes");
        // One room with everyone: the hot room cannot be split.
        let p = plan(&m, &workload(1000, 20_000.0, RoomSizes::Fixed(1000.0)));
        assert!(p.warnings.iter().any(|w| w.contains("largest room")), "{:?}", p.warnings);
        // A small workload fits one process.
        let p = plan(&m, &workload(100, 10.0, RoomSizes::Fixed(10.0)));
        assert!(p.lines.iter().any(|l| l.contains("one all-in-one")), "{:?}", p.lines);
    }
}
