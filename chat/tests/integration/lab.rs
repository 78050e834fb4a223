//! The debugging lab, `chat lab`, as players use it: for every challenge and every mechanism
//! it can plant, a round started with a fixed seed shows the symptom, leaves no fault marks
//! (no `fault.injected` hop, no fault metric, nothing listed by `GET /admin/faults`, no span tag
//! about faults in the traces its processes export to a real Jaeger), and a solver that reads
//! only what a player can (loadgen's audit and report, journeys, metrics, logs, traces) finds
//! the cause, which `chat lab answer` grades correct; a wrong answer grades wrong, a
//! missing field is a usage error, and `chat lab stop` leaves no process and no port behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use chat::lab::catalog::{self, Mechanism};
use serde_json::Value;

use crate::support::*;

/// Runs `chat lab ARGS` with the lab directory `dir`; returns the exit status and stdout.
fn lab(dir: &Path, args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_chat"))
        .arg("lab")
        .args(args)
        .env("CHAT_LAB_DIR", dir)
        .env_remove("CHAT_ADMIN_TOKEN")
        .output()
        .expect("running chat lab");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

/// The loadgen binary beside chat, brought up to date once per test run (`cargo test -p chat`
/// builds only loadgen's library, and a stale binary would audit by older rules). Built as
/// `cargo test --workspace` builds it (for loadgen's own tests), so under that command this is a
/// no-op: `cargo build -p loadgen` alone resolves other features and rebuilt a hundred crates.
/// It runs without the variables cargo sets for a test (`CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`,
/// ...): build scripts watch some of them (ring's does), and inherited they made this build
/// recompile ring and everything above it in the middle of the suite (CI, 2026-12-05).
fn loadgen_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let mut cargo = Command::new(env!("CARGO"));
            for (name, _) in std::env::vars_os() {
                let name = name.to_string_lossy();
                let set_for_tests =
                    ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_EXE_", "CARGO_CRATE_", "CARGO_TARGET_TMPDIR"]
                        .iter()
                        .any(|prefix| name.starts_with(prefix))
                        || ["CARGO_PRIMARY_PACKAGE", "OUT_DIR"].contains(&name.as_ref());
                if set_for_tests {
                    cargo.env_remove(name.as_ref());
                }
            }
            let status = cargo
                .args(["build", "--workspace", "--tests"])
                .current_dir(testkit::workspace_root())
                .status()
                .expect("cargo build --workspace --tests");
            assert!(status.success(), "building loadgen (cargo build --workspace --tests)");
            Path::new(env!("CARGO_BIN_EXE_chat")).with_file_name("loadgen")
        })
        .clone()
}

/// A port with the next two free too (a releases round takes three).
fn free_ports() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if port < 60_000 && (0..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", port + i)).is_ok()) {
            return port;
        }
    }
}

/// A seed that makes `challenge` plant `mechanism` (the test covers every mechanism; the
/// solver never sees what was drawn).
fn seed_for(challenge: &str, mechanism: Mechanism) -> u64 {
    let challenge = catalog::challenge(challenge).unwrap();
    (0..1000).find(|&seed| challenge.draw(seed).variant == mechanism.name()).unwrap()
}

/// The `NAME http://...` lines `chat lab start` printed, as process id → base URL (the
/// cluster's `bus` monitoring line left out: it is not a chat process).
fn printed_urls(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (name, url) = (words.next()?, words.next()?);
            (url.starts_with("http://") && name != "bus").then(|| (name.to_owned(), url.to_owned()))
        })
        .collect()
}

/// The processes' log directory `chat lab start` printed (its `logs` line).
fn printed_logs(out: &str) -> PathBuf {
    let line = out.lines().find(|line| line.starts_with("logs ")).expect("a logs line");
    PathBuf::from(line.split_whitespace().nth(1).unwrap())
}

/// A round being played; stopped when dropped (a failing test leaves nothing running).
struct Round {
    dir: PathBuf,
    /// Process id → base URL, as `start` printed them.
    urls: BTreeMap<String, String>,
    /// The processes' logs, as `start` printed them.
    logs: PathBuf,
    /// The Jaeger the round's processes export spans to, and when the round started (µs since
    /// the epoch).
    traces: (String, u128),
    challenge: String,
}

impl Drop for Round {
    fn drop(&mut self) {
        if self.dir.join("round.json").exists() {
            let (code, out) = lab(&self.dir, &["stop"]);
            eprintln!("lab round left running, stopped: {code} {out}");
        }
    }
}

/// Says on the test's output which round starts, and when (seconds into the lab test): libtest
/// shows it only when the test fails, and then it tells which round failed and what ran beside.
fn announce(challenge: &str, seed: u64) {
    static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let since = STARTED.get_or_init(std::time::Instant::now).elapsed().as_secs_f64();
    let drawn = catalog::challenge(challenge).map(|c| c.draw(seed).variant).unwrap_or_default();
    eprintln!("lab test: at {since:.0} s, round {challenge} ({drawn}) starts");
}

/// Now, in µs since the epoch (Jaeger's time).
fn now_us() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros()
}

impl Round {
    /// A round of `challenge` with `seed` (on 127.0.0.1 from free ports), its spans exported to
    /// `jaeger`.
    fn start(challenge: &str, seed: u64, jaeger: &testkit::Jaeger) -> Round {
        announce(challenge, seed);
        let since = now_us();
        let dir = tempfile::tempdir().unwrap().keep();
        let loadgen = loadgen_binary();
        let port = free_ports().to_string();
        let seed = seed.to_string();
        let args = ["start", challenge, "--seed", &seed, "--team", "testers", "--port", &port];
        let otlp = jaeger.otlp_endpoint();
        let extra = ["--loadgen", loadgen.to_str().unwrap(), "--otlp-endpoint", &otlp];
        let (code, out) = lab(&dir, &[&args[..], &extra].concat());
        assert_eq!(code, 0, "{out}");
        let (urls, logs) = (printed_urls(&out), printed_logs(&out));
        Round { dir, urls, logs, traces: (jaeger.api(), since), challenge: challenge.to_owned() }
    }

    fn answer(&self, fields: &[(&str, &str)]) -> (i32, String) {
        let mut args = vec!["answer", &self.challenge];
        for (flag, value) in fields {
            args.push(flag);
            args.push(value);
        }
        lab(&self.dir, &args)
    }

    /// The round's state, read only for what a player is not given: the admin token (to show
    /// that `GET /admin/faults` lists nothing) and the pids (to show that stop leaves none).
    fn state(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.dir.join("round.json")).unwrap()).unwrap()
    }

    /// Nothing in any process names a fault: no listed fault, no fault metric, no
    /// `fault.injected` hop in the journeys of `ids`, no span tag in the round's traces.
    async fn assert_unmarked(&self, ids: &[String]) {
        let (api, since) = &self.traces;
        // Spans are exported in batches every few seconds.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let mut traced = 0;
            for service in ["chat", "chat-gateway", "chat-fanout"] {
                traced += traces_from_jaeger(api, service, *since).await.len();
            }
            if traced > 0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no trace of the round in Jaeger");
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        let token = self.state()["admin_token"].as_str().unwrap().to_owned();
        for url in self.urls.values() {
            let headers = [("Authorization", format!("Bearer {token}"))];
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let (status, listed) = request("GET", &format!("{url}/admin/faults"), &headers, "").await;
            assert_eq!(status, 200);
            assert_eq!(serde_json::from_str::<Value>(&listed).unwrap()["faults"], serde_json::json!([]), "{url}");
            let (_, metrics) = get(&format!("{url}/metrics")).await;
            let marked: Vec<&str> =
                metrics.lines().filter(|l| l.starts_with("chat_faults_injected") && !l.ends_with(" 0")).collect();
            assert!(marked.is_empty(), "{url}: {marked:?}");
            for id in ids {
                let (_, journey) = get_json(&format!("{url}/debug/messages/{id}")).await;
                let hops = journey["hops"].as_array().cloned().unwrap_or_default();
                assert!(hops.iter().all(|h| h["hop"] != "fault.injected"), "{journey:#}");
            }
        }
    }

    /// Stops the round and checks that no process of it runs and no port is held.
    fn stop(self) {
        let pids: Vec<u64> =
            self.state()["processes"].as_array().unwrap().iter().map(|p| p["pid"].as_u64().unwrap()).collect();
        let (code, out) = lab(&self.dir, &["stop"]);
        assert_eq!(code, 0, "{out}");
        for pid in pids {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
            assert!(stat.is_empty() || state == Some('Z'), "pid {pid} still runs: {stat}");
        }
        for url in self.urls.values() {
            let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
            assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(), "{url} still bound");
        }
        assert!(!self.dir.join("round.json").exists());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A player's audited loadgen run against `url` in the lab's rooms; returns its JSON report.
fn loadgen_run(url: &str, seconds: u32, report: &Path) -> Value {
    player_run(&[url], Run { seconds, rate: 40, journeys: 150 }, report)
}

/// How long, how fast, and how many journeys a player's run samples.
struct Run {
    seconds: u32,
    rate: u32,
    journeys: u32,
}

/// Rooms each of a player's clients joins over several gateways: with three, every room has
/// members on both gateways of a cluster (client i connects to gateway i mod 2). Over one
/// process, one room each, as the round's own traffic.
fn rooms_per_client(urls: &[&str]) -> &'static str {
    if urls.len() > 1 {
        "3"
    } else {
        "1"
    }
}

/// A player's audited loadgen run over the gateways at `urls` (base URLs) in the lab's rooms;
/// returns its JSON report.
fn player_run(urls: &[&str], run: Run, report: &Path) -> Value {
    let ws: Vec<String> = urls.iter().map(|u| format!("{}/ws", u.replacen("http://", "ws://", 1))).collect();
    let status = Command::new(loadgen_binary())
        .args(["--url", &ws.join(","), "--clients", "16", "--rooms", "8", "--room-prefix", "lab"])
        .args(["--rooms-per-client", rooms_per_client(urls)])
        .args(["--rate", &run.rate.to_string(), "--duration", &format!("{}s", run.seconds)])
        .args(["--journeys", &run.journeys.to_string(), "--progress", "never", "--report"])
        .arg(report)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("running loadgen");
    assert!(status.code().is_some_and(|c| c <= 1), "loadgen could not run: {status}");
    serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap()
}

/// An answer's fields as `answer` takes them.
fn borrowed<'a>(answer: &'a [(&'static str, String)]) -> Vec<(&'a str, &'a str)> {
    answer.iter().map(|(flag, value)| (*flag, value.as_str())).collect()
}

// === missing-message ===

/// What a player concludes for missing-message: the room from the audit, and the hop from the
/// journey of a missing message (queued to every member by the gateway: lost writing to the
/// socket; never reached the gateway: lost at the worker's publish).
async fn solve_missing_message(round: &Round) -> (Vec<(&'static str, String)>, Vec<String>) {
    let url = &round.urls["chat"];
    let report = loadgen_run(url, 6, &round.dir.join("run.json"));
    let missing: Vec<&Value> =
        report["audit"]["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "missing").collect();
    assert!(!missing.is_empty(), "the symptom: messages missing: {:#}", report["audit"]);
    let rooms: std::collections::BTreeSet<&str> = missing.iter().map(|f| f["room"].as_str().unwrap()).collect();
    assert_eq!(rooms.len(), 1, "one room: {rooms:?}");
    let ids: Vec<String> = missing.iter().map(|f| f["id"].as_str().unwrap().to_owned()).collect();
    let (_, journey) = get_json(&format!("{url}/debug/messages/{}", ids[0])).await;
    let hops: Vec<&str> = journey["hops"].as_array().unwrap().iter().map(|h| h["hop"].as_str().unwrap()).collect();
    assert!(hops.contains(&"store.append") && hops.contains(&"fanout.publish"), "{journey:#}");
    let hop = if hops.contains(&"gateway.fanout") { "gateway.deliver" } else { "fanout.publish" };
    let room = rooms.into_iter().next().unwrap().to_owned();
    (vec![("--hop", hop.to_owned()), ("--kind", "drop".to_owned()), ("--room", room)], ids)
}

/// missing-message: each mechanism's round solved from journeys and scored; usage errors and
/// partly right answers are told apart.
pub(crate) async fn missing_message_every_mechanism_is_found_from_evidence() {
    let jaeger = &testkit::Jaeger::start().await;
    for mechanism in [Mechanism::DeliverDrop, Mechanism::PublishDropUnrepaired] {
        let round = Round::start("missing-message", seed_for("missing-message", mechanism), jaeger);
        let (answer, ids) = solve_missing_message(&round).await;
        round.assert_unmarked(&ids).await;
        // A missing field is a usage error and is not scored; a wrong room is partly right.
        let (code, out) = round.answer(&borrowed(&answer[..2]));
        assert_eq!(code, 2, "{out}");
        let mut wrong_room = answer.clone();
        wrong_room[2].1 = "lab-r99".into();
        let (code, out) = round.answer(&borrowed(&wrong_room));
        assert_eq!((code, out.starts_with("partly")), (1, true), "{mechanism:?}: {out}");
        let (code, out) = round.answer(&borrowed(&answer));
        assert_eq!(code, 0, "{mechanism:?}: {answer:?}: {out}");
        assert!(out.starts_with("correct") && out.contains("attempt 2"), "{out}");
        let (code, revealed) = lab(&round.dir, &["reveal"]);
        assert!(code == 0 && revealed.contains(mechanism.name()), "{revealed}");
        let (_, board) = lab(&round.dir, &["scoreboard"]);
        assert!(board.lines().any(|l| l.starts_with("testers") && l.contains("correct")), "{board}");
        round.stop();
    }
}

// === performance-regression ===

/// What a player concludes for performance-regression: the release whose deliveries are
/// slowest; then, from its journeys' hop timings against the other releases', where the time
/// goes: the hop pair that is slower by a fixed amount (and if none up to the gateway's fan-out
/// is, but deliveries are, it is the write to the connections).
fn solve_performance_regression(round: &Round) -> Vec<(&'static str, String)> {
    let reports: BTreeMap<&String, Value> = round
        .urls
        .iter()
        .map(|(name, url)| (name, loadgen_run(url, 4, &round.dir.join(format!("{name}.json")))))
        .collect();
    let p50 = |report: &Value, lat: &str| report["latency_ms"][lat]["p50"].as_f64().unwrap();
    let (slow, slow_report) =
        reports.iter().max_by(|a, b| p50(a.1, "send_to_delivery").total_cmp(&p50(b.1, "send_to_delivery"))).unwrap();
    let median_of = |report: &Value, pair: &str| -> f64 {
        let pairs = report["samples"]["hops"]["pairs"].as_array().unwrap();
        let mut us: Vec<u64> = pairs
            .iter()
            .find(|p| p["hop"] == pair)
            .map(|p| p["us"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect())
            .unwrap_or_default();
        us.sort_unstable();
        us.get(us.len() / 2).copied().unwrap_or(0) as f64 / 1000.0
    };
    let others: Vec<&Value> = reports.iter().filter(|(n, _)| n != &slow).map(|(_, r)| r).collect();
    let excess = |pair: &str| {
        let usual = others.iter().map(|r| median_of(r, pair)).fold(0.0, f64::max);
        median_of(slow_report, pair) - usual
    };
    let sequence = excess("gateway.receive→fanout.sequence");
    let publish = excess("store.append→fanout.publish");
    // A worker that publishes late also sequences late (sends queue behind it), so a slow
    // publish explains a slow sequence, not the other way round.
    let hop = if publish > 15.0 {
        "fanout.publish"
    } else if sequence > 15.0 {
        "fanout.sequence"
    } else {
        // Nothing up to the fan-out is slower, and the sender's ack far less than deliveries: it
        // is slowed only when it queues behind a delayed delivery on its own connection.
        let excess_of = |lat: &str| p50(slow_report, lat) - others.iter().map(|r| p50(r, lat)).fold(0.0, f64::max);
        let (ack_excess, delivery_excess) = (excess_of("send_to_ack"), excess_of("send_to_delivery"));
        assert!(
            ack_excess < delivery_excess / 2.0,
            "slow acks but no slow hop: {sequence} {publish} {ack_excess} (deliveries {delivery_excess})"
        );
        "gateway.deliver"
    };
    vec![("--process", (*slow).clone()), ("--hop", hop.to_owned()), ("--kind", "delay".to_owned())]
}

/// Each round is solved twice, each way from its own evidence: by comparing loadgen runs against
/// the releases (their reports' journey samples), and from the traces in Jaeger alone.
pub(crate) async fn performance_regression_every_mechanism_is_found_by_comparison_and_from_traces() {
    let jaeger = &testkit::Jaeger::start().await;
    for mechanism in [Mechanism::SequenceDelay, Mechanism::PublishDelay, Mechanism::DeliverDelay] {
        let round = Round::start("performance-regression", seed_for("performance-regression", mechanism), jaeger);
        assert_eq!(round.urls.len(), 3, "three releases: {:?}", round.urls);
        let answer = solve_performance_regression(&round);
        round.assert_unmarked(&[]).await;
        let from_traces = solve_performance_regression_from_traces(&round.traces.0, round.traces.1).await;
        assert_eq!(from_traces, answer, "{mechanism:?}: traces and loadgen runs disagree");
        let (code, out) = round.answer(&[("--process", "release-x"), ("--hop", "store.append"), ("--kind", "drop")]);
        assert_eq!((code, out.starts_with("wrong")), (1, true), "{out}");
        let (code, out) = round.answer(&borrowed(&answer));
        assert_eq!(code, 0, "{mechanism:?}: {answer:?}: {out}");
        round.stop();
    }
}

/// Spans of one trace from Jaeger's API, by operation: (process's `service.instance.id`, start
/// and end in µs).
type TraceSpans = BTreeMap<String, Vec<(String, u64, u64)>>;

/// Every trace of `service` that Jaeger holds since `since_us` (µs since the epoch), each as its
/// spans by operation. Panics if any span or process carries a tag about faults.
async fn traces_from_jaeger(api: &str, service: &str, since_us: u128) -> Vec<TraceSpans> {
    let url = format!("{api}/traces?service={service}&start={since_us}&limit=2000");
    // Jaeger builds the whole answer (up to 2,000 traces) before sending it: over 10 s once in CI
    // while the other tests ran beside it.
    let (status, body) = get_json_within(std::time::Duration::from_secs(60), &url).await;
    assert_eq!(status, 200, "{body}");
    let mut traces = Vec::new();
    for trace in body["data"].as_array().unwrap() {
        let instance = |process: &Value| -> String {
            let tags = process["tags"].as_array().unwrap();
            let id = tags.iter().find(|t| t["key"] == "service.instance.id").expect("instance id");
            id["value"].as_str().unwrap().to_owned()
        };
        let processes: BTreeMap<&str, String> =
            trace["processes"].as_object().unwrap().iter().map(|(id, p)| (id.as_str(), instance(p))).collect();
        let mut spans = TraceSpans::new();
        for span in trace["spans"].as_array().unwrap() {
            let keys = span["tags"].as_array().unwrap().iter().map(|t| t["key"].as_str().unwrap());
            let process_keys = trace["processes"].as_object().unwrap().values().flat_map(|p| {
                p["tags"].as_array().unwrap().iter().map(|t| t["key"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
            });
            let marked: Vec<String> =
                keys.map(str::to_owned).chain(process_keys).filter(|k| k.contains("fault")).collect();
            assert!(marked.is_empty(), "a span names a fault: {marked:?} in {span:#}");
            let start = span["startTime"].as_u64().unwrap();
            let process = processes[span["processID"].as_str().unwrap()].clone();
            let operation = span["operationName"].as_str().unwrap().to_owned();
            spans.entry(operation).or_default().push((process, start, start + span["duration"].as_u64().unwrap()));
        }
        traces.push(spans);
    }
    traces
}

/// performance-regression from traces alone: per release (a span's process), the median of
/// three stretches of each send's trace: `gateway.receive` to `fanout.sequence` (waiting to be
/// sequenced), the end of `store.append` to the end of `fanout.publish` (stored, not yet
/// published), and `gateway.deliver` to the end of its last `ws.write` (written to the
/// connections). The release with stretches slower than on every other release, by more than
/// 15 ms, is the slow one; a late publish also makes sends wait to be sequenced (they queue
/// behind it), so a slow publish explains a slow sequence, not the other way round.
async fn solve_performance_regression_from_traces(api: &str, since_us: u128) -> Vec<(&'static str, String)> {
    let traces = traces_from_jaeger(api, "chat", since_us).await;
    let mut stretches: BTreeMap<(String, &str), Vec<u64>> = BTreeMap::new();
    for spans in &traces {
        let first = |op: &str| spans.get(op).and_then(|s| s.iter().min_by_key(|(_, start, _)| *start)).cloned();
        let (Some(receive), Some(sequence), Some(append), Some(publish), Some(deliver)) = (
            first("gateway.receive"),
            first("fanout.sequence"),
            first("store.append"),
            first("fanout.publish"),
            first("gateway.deliver"),
        ) else {
            continue;
        };
        let Some(written) = spans.get("ws.write").and_then(|w| w.iter().map(|(_, _, end)| *end).max()) else {
            continue;
        };
        let release = receive.0.clone();
        let mut add = |hop, us: u64| stretches.entry((release.clone(), hop)).or_default().push(us);
        add("fanout.sequence", sequence.1.saturating_sub(receive.1));
        add("fanout.publish", publish.2.saturating_sub(append.2));
        add("gateway.deliver", written.saturating_sub(deliver.1));
    }
    let median = |us: &Vec<u64>| {
        let mut sorted = us.clone();
        sorted.sort_unstable();
        sorted[sorted.len() / 2] as f64 / 1000.0
    };
    let releases: std::collections::BTreeSet<&String> = stretches.keys().map(|(r, _)| r).collect();
    assert_eq!(releases.len(), 3, "traces of three releases in Jaeger: {releases:?}");
    let mut slower = Vec::new();
    for ((release, hop), us) in &stretches {
        assert!(us.len() >= 20, "{release} {hop}: only {} traces", us.len());
        let others = stretches
            .iter()
            .filter(|((r, h), _)| r != release && h == hop)
            .map(|(_, us)| median(us))
            .fold(0.0, f64::max);
        if median(us) - others > 15.0 {
            slower.push((release.clone(), *hop));
        }
    }
    let slow: std::collections::BTreeSet<&String> = slower.iter().map(|(release, _)| release).collect();
    assert_eq!(slow.len(), 1, "one release is slower: {slower:?}");
    let release = slow.into_iter().next().unwrap().clone();
    let hop = ["fanout.publish", "fanout.sequence", "gateway.deliver"]
        .into_iter()
        .find(|hop| slower.iter().any(|(_, h)| h == hop))
        .unwrap();
    vec![("--process", release), ("--hop", hop.to_owned()), ("--kind", "delay".to_owned())]
}

#[test]
fn lab_usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(lab(dir.path(), &["start", "no-such-challenge"]).0, 2);
    assert_eq!(lab(dir.path(), &["answer", "missing-message", "--hop", "x", "--kind", "y", "--room", "z"]).0, 2);
    assert_eq!(lab(dir.path(), &["reveal"]).0, 2);
    assert_eq!(lab(dir.path(), &["frobnicate"]).0, 2);
    let (code, listed) = lab(dir.path(), &["list"]);
    assert_eq!(code, 0);
    for challenge in catalog::CHALLENGES {
        assert!(listed.contains(challenge.name), "{listed}");
    }
}

// === stuck-sends ===

/// `chat debug waits` against `urls`: its exit status and output.
fn debug_waits(urls: &[&String], min_ms: u32) -> (i32, String) {
    let joined: Vec<&str> = urls.iter().map(|u| u.as_str()).collect();
    let output = Command::new(env!("CARGO_BIN_EXE_chat"))
        .args(["debug", "waits", "--min-ms", &min_ms.to_string(), "--url", &joined.join(",")])
        .output()
        .expect("running chat debug waits");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned())
}

/// What a player concludes for stuck-sends: a cycle in `chat debug waits` over every process is
/// a deadlock (the sequencing operations in it; here it must span both workers); without one, a
/// sequencing that waits on the bus is a late publish (its journeys, when any send gets through,
/// show it too), and none at all is a worker that does not take the sends.
fn solve_stuck_sends(round: &Round) -> Vec<(&'static str, String)> {
    let urls: Vec<&String> = round.urls.values().collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut waits = debug_waits(&urls, 1000);
    while waits.0 == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(500));
        waits = debug_waits(&urls, 1000);
    }
    let (code, table) = waits;
    assert!(table.contains("send lab-r"), "sends wait for their worker: {table}");
    if code == 1 {
        assert!(table.contains("CYCLE") && table.contains("room-lock:"), "{table}");
        let cycle = table.split("CYCLE").nth(1).unwrap();
        let in_cycle: std::collections::BTreeSet<&str> = cycle
            .lines()
            .filter(|line| !line.trim().starts_with("waits for"))
            .filter_map(|line| line.trim().split_once(": sequence ").map(|(process, _)| process))
            .collect();
        assert_eq!(in_cycle.into_iter().collect::<Vec<_>>(), ["fanout-1", "fanout-2"], "{table}");
        return vec![("--hop", "fanout.sequence".into()), ("--kind", "deadlock".into())];
    }
    assert_eq!(code, 0, "{table}");
    assert!(table.contains("no cycle"), "{table}");
    let gateways = [round.urls["gw-1"].as_str(), round.urls["gw-2"].as_str()];
    let report = player_run(&gateways, Run { seconds: 3, rate: 40, journeys: 150 }, &round.dir.join("run.json"));
    // Refused, not known by their deadline (`internal`), or never answered.
    let unanswered = ["unavailable", "internal"].iter().map(|c| report["errors"][c].as_u64().unwrap_or(0)).sum::<u64>()
        + report["audit"]["unacked"].as_u64().unwrap_or(0);
    assert!(
        unanswered > 0 || report["throughput"]["acked"].as_u64() < report["throughput"]["sent"].as_u64(),
        "sends fail: {:#}",
        report["audit"]
    );
    let (_, now) = debug_waits(&urls, 0);
    let publishing = now.lines().any(|l| l.contains(" sequence lab-r") && l.trim_end().ends_with("bus.deliver"));
    let sequencing = now.lines().any(|l| l.contains(" sequence lab-r"));
    if publishing {
        vec![("--hop", "fanout.publish".into()), ("--kind", "delay".into())]
    } else {
        assert!(!sequencing, "neither publishing nor idle: {now}");
        vec![("--hop", "fanout.sequence".into()), ("--kind", "stall".into())]
    }
}

/// stuck-sends: each mechanism's round solved from the waits the processes report.
pub(crate) async fn stuck_sends_only_the_deadlock_shows_a_cycle() {
    let jaeger = &testkit::Jaeger::start().await;
    for mechanism in [Mechanism::LockInversion, Mechanism::SequenceStall, Mechanism::PublishStall] {
        let round = start_cluster_round("stuck-sends", seed_for("stuck-sends", mechanism), jaeger);
        let answer = solve_stuck_sends(&round);
        round.assert_unmarked(&[]).await;
        let (code, out) = round.answer(&[("--hop", "gateway.deliver"), ("--kind", "drop")]);
        assert_eq!((code, out.starts_with("wrong")), (1, true), "{out}");
        let (code, out) = round.answer(&borrowed(&answer));
        assert_eq!(code, 0, "{mechanism:?}: {answer:?}: {out}");
        round.stop();
    }
}

// === the cluster challenges ===

/// A cluster round on the shared test CQL node (no Cassandra of its own).
fn start_cluster_round(challenge: &str, seed: u64, jaeger: &testkit::Jaeger) -> Round {
    announce(challenge, seed);
    let since = now_us();
    let cql = testkit::cassandra();
    let dir = tempfile::tempdir().unwrap().keep();
    let loadgen = loadgen_binary();
    let seed = seed.to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_chat"))
        .args(["lab", "start", challenge, "--seed", &seed, "--team", "testers", "--loadgen"])
        .arg(&loadgen)
        .args(["--otlp-endpoint", &jaeger.otlp_endpoint()])
        .env("CHAT_LAB_DIR", &dir)
        .env("CHAT_LOCAL_CQL_NODES", cql)
        // The shared node is warm (it has served the suite); a round's fresh keyspace needs no
        // 30 s JIT warm-up, and 16 rounds of it were a quarter of the suite's time.
        .env("CHAT_WARM_UP_SECS", "3")
        .env_remove("CHAT_ADMIN_TOKEN")
        .output()
        .expect("running chat lab start");
    let out = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{out}");
    let (urls, logs) = (printed_urls(&out), printed_logs(&out));
    Round { dir, urls, logs, traces: (jaeger.api(), since), challenge: challenge.to_owned() }
}

/// The value of a metric line `name` (summed over its label sets) in `/metrics` of `url`.
async fn metric_sum(url: &str, name: &str) -> f64 {
    let (_, text) = get(&format!("{url}/metrics")).await;
    text.lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with(' ') || l[name.len()..].starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The mean of histogram `name` on `url` (its `_sum` over its `_count`; 0 with no observation).
async fn histogram_mean(url: &str, name: &str) -> f64 {
    metric_sum(url, &format!("{name}_sum")).await / metric_sum(url, &format!("{name}_count")).await.max(1.0)
}

/// partitioned-gateway: a gateway that is not ready names itself (and why); otherwise the
/// gateway whose messages arrive from the bus seconds after they were sequenced, or whose sends
/// are acked seconds after the workers' answers reached it (watched until its traffic shows it:
/// a late feed or ack is seen only once messages have come through it).
async fn solve_partitioned_gateway(round: &Round) -> Vec<(&'static str, String)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        for gateway in ["gw-1", "gw-2"] {
            let (status, why) = get(&format!("{}/readyz", round.urls[gateway])).await;
            if status == 503 {
                assert!(why.contains("not connected to NATS"), "{why}");
                return vec![("--process", gateway.into()), ("--hop", "gateway.nats".into()), ("--kind", "cut".into())];
            }
        }
        let mut lag = Vec::new();
        for gateway in ["gw-1", "gw-2"] {
            lag.push((histogram_mean(&round.urls[gateway], "chat_sequence_to_gateway_seconds").await, gateway));
        }
        lag.sort_by(|a, b| b.0.total_cmp(&a.0));
        if lag[0].0 > 1.0 && lag[1].0 < 0.5 {
            return vec![("--process", lag[0].1.into()), ("--hop", "gateway.feed".into()), ("--kind", "delay".into())];
        }
        // Acks: slow on one gateway while the workers' answers reach it on time means the
        // gateway holds them after they arrived.
        let mut acks = Vec::new();
        for gateway in ["gw-1", "gw-2"] {
            let url = &round.urls[gateway];
            let ack = histogram_mean(url, "chat_send_ack_seconds").await;
            let answer = histogram_mean(url, "chat_sequence_to_answer_seconds").await;
            acks.push((ack, answer, gateway));
        }
        acks.sort_by(|a, b| b.0.total_cmp(&a.0));
        if acks[0].0 > 2.0 && acks[0].1 < 0.5 && acks[1].0 < 1.0 {
            return vec![
                ("--process", acks[0].2.into()),
                ("--hop", "gateway.answer".into()),
                ("--kind", "delay".into()),
            ];
        }
        assert!(std::time::Instant::now() < deadline, "no gateway is cut or late: {lag:?}, acks {acks:?}");
    }
}

/// duplicate-after-stall: the worker whose bus redelivers sends; then, from journeys of the
/// slow sends, whether it held them before sequencing or published them late.
async fn solve_duplicate_after_stall(round: &Round) -> Vec<(&'static str, String)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    let worker = loop {
        let mut redelivering = Vec::new();
        for worker in ["fanout-1", "fanout-2"] {
            if metric_sum(&round.urls[worker], "chat_send_redeliveries_total").await > 0.0 {
                redelivering.push(worker);
            }
        }
        if let [worker] = redelivering[..] {
            break worker;
        }
        assert!(redelivering.len() < 2, "both workers redelivered");
        assert!(std::time::Instant::now() < deadline, "no redelivery within 40 s");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    // Every journey of a player's run, to find the slow ones. The fault strikes one send in
    // twenty of one worker's: a run may happen to hold no late publish, so a player who sees
    // none looks again before calling it a stall (three runs without one: a stall).
    let gateways = [round.urls["gw-1"].as_str(), round.urls["gw-2"].as_str()];
    let mut report = Value::Null;
    let mut late_publish = false;
    for run in 0..3 {
        report = player_run(
            &gateways,
            Run { seconds: 12, rate: 20, journeys: 1000 },
            &round.dir.join(format!("run{run}.json")),
        );
        // Nothing was stored twice: the audit passed (no stored_twice finding).
        assert_eq!(report["audit"]["counts"]["stored_twice"].as_u64().unwrap_or(0), 0, "{:#}", report["audit"]);
        late_publish = publish_seconds_after_store(&report);
        if late_publish {
            break;
        }
    }
    let hop = if late_publish { "fanout.publish" } else { "fanout.sequence" };
    let kind = if hop == "fanout.publish" { "delay" } else { "stall" };
    if hop == "fanout.sequence" {
        let slowest = |pair: &str| -> u64 {
            let pairs = report["samples"]["hops"]["pairs"].as_array().unwrap();
            pairs
                .iter()
                .filter(|p| p["hop"] == pair)
                .flat_map(|p| p["us"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()))
                .max()
                .unwrap_or(0)
        };
        let held = [
            "gateway.receive→fanout.sequence",
            "gateway.receive→fanout.redelivered",
            "fanout.redelivered→fanout.sequence",
        ]
        .iter()
        .map(|p| slowest(p))
        .max()
        .unwrap_or(0);
        assert!(held > 3_000_000, "a send held before sequencing: {:#}", report["samples"]["hops"]);
    }
    vec![("--process", worker.into()), ("--hop", hop.into()), ("--kind", kind.into())]
}

/// Whether a run's journeys hold a publish seconds after its store. The gateway may have
/// repaired the message from the store, or the bus redelivered it, before the publish; so every
/// hop pair that ends in the publish or starts at the store counts (nothing else waits seconds
/// after the store).
fn publish_seconds_after_store(report: &Value) -> bool {
    report["samples"]["hops"]["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            let pair = p["hop"].as_str().unwrap();
            pair.ends_with("→fanout.publish") || pair.starts_with("store.append→")
        })
        .any(|p| p["us"].as_array().unwrap().iter().any(|v| v.as_u64().unwrap() > 1_500_000))
}

/// The value of the metric line `series` (name and labels exactly as exposed) of `url`.
async fn metric_value(url: &str, series: &str) -> f64 {
    let (_, text) = get(&format!("{url}/metrics")).await;
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

/// byzantine: a gateway whose own writes fail the chain's self-check is the one rewriting; forks
/// seen by the gateways come from the worker that sequenced and published the forged message;
/// with the chain intact, a worker whose messages' `ts` disagrees with its own journey hops is
/// lying about the time.
async fn solve_byzantine(round: &Round) -> Vec<(&'static str, String)> {
    let gateways = [round.urls["gw-1"].as_str(), round.urls["gw-2"].as_str()];
    let report = player_run(&gateways, Run { seconds: 5, rate: 30, journeys: 0 }, &round.dir.join("run.json"));
    let findings = report["audit"]["findings"].as_array().unwrap().clone();
    for gateway in ["gw-1", "gw-2"] {
        let altered =
            metric_value(&round.urls[gateway], "chat_chain_violations_total{kind=\"altered\",source=\"deliver\"}")
                .await;
        if altered > 0.0 {
            assert!(findings.iter().any(|f| f["kind"] == "chain_altered"), "the auditor caught it too");
            return vec![
                ("--process", gateway.into()),
                ("--hop", "gateway.deliver".into()),
                ("--kind", "rewrite".into()),
            ];
        }
    }
    let mut altered_on_feed = 0.0;
    for gateway in ["gw-1", "gw-2"] {
        let series = "chat_chain_violations_total{kind=\"altered\",source=\"feed\"}";
        altered_on_feed += metric_value(&round.urls[gateway], series).await;
    }
    if altered_on_feed > 0.0 {
        // Altered before any gateway had it: what differs from the stored message, and who
        // published it?
        let finding = findings.iter().find(|f| f["kind"] == "chain_altered").expect("the auditor caught it too");
        let (id, room) = (finding["id"].as_str().unwrap(), finding["room"].as_str().unwrap());
        let (_, journey) = get_json(&format!("{}/debug/messages/{id}", round.urls["gw-1"])).await;
        let hops = journey["hops"].as_array().unwrap();
        let arrived = hops
            .iter()
            .find(|h| {
                let detail = &h["detail"];
                h["hop"] == "chain.violation" && detail["source"] == "feed" && detail["kind"] == "altered"
            })
            .unwrap_or_else(|| panic!("{journey:#}"))["detail"]["seq"]
            .as_u64()
            .unwrap();
        let history = whole_history(&round.urls["gw-1"], room).await;
        let stored = history.iter().find(|m| m["id"] == id).expect("stored")["seq"].as_u64().unwrap();
        assert_eq!(arrived, stored + 1, "it arrived under another seq than the one stored: {journey:#}");
        let worker =
            hops.iter().find(|h| h["hop"] == "fanout.publish").expect("published")["process"].as_str().unwrap();
        return vec![("--process", worker.into()), ("--hop", "fanout.publish".into()), ("--kind", "forge_seq".into())];
    }
    if let Some(fork) = findings.iter().find(|f| f["kind"] == "equivocation") {
        let forks = metric_value(&round.urls["gw-1"], "chat_chain_violations_total{kind=\"fork\",source=\"feed\"}")
            .await
            + metric_value(&round.urls["gw-2"], "chat_chain_violations_total{kind=\"fork\",source=\"feed\"}").await;
        assert!(forks > 0.0, "the gateways saw the fork");
        let id = fork["id"].as_str().unwrap();
        let (_, journey) = get_json(&format!("{}/debug/messages/{id}", round.urls["gw-1"])).await;
        let hops = journey["hops"].as_array().unwrap();
        let worker =
            hops.iter().find(|h| h["hop"] == "fanout.publish").expect("published")["process"].as_str().unwrap();
        return vec![("--process", worker.into()), ("--hop", "fanout.publish".into()), ("--kind", "equivocate".into())];
    }
    assert!(findings.iter().all(|f| f["kind"] != "chain_altered"), "{findings:#?}");
    // The chain is intact: compare each stored message's ts with its sequencing in the journey.
    let mut skewed = std::collections::BTreeSet::new();
    for room in (0..8).map(|i| format!("lab-r{i}")) {
        let history = whole_history(&round.urls["gw-1"], &room).await;
        for message in history.iter().rev().take(5) {
            let (_, journey) =
                get_json(&format!("{}/debug/messages/{}", round.urls["gw-1"], message["id"].as_str().unwrap())).await;
            let Some(sequenced) = journey["hops"].as_array().unwrap().iter().find(|h| h["hop"] == "fanout.sequence")
            else {
                continue;
            };
            let off_ms = sequenced["at_us"].as_i64().unwrap() / 1000 - message["ts"].as_i64().unwrap();
            if off_ms.abs() > 30_000 {
                skewed.insert(sequenced["process"].as_str().unwrap().to_owned());
            }
        }
    }
    assert_eq!(skewed.len(), 1, "one worker's clock lies: {skewed:?}");
    vec![("--process", skewed.pop_first().unwrap()), ("--hop", "fanout.clock".into()), ("--kind", "skew".into())]
}

/// lost-after-maintenance: a gateway whose queues skip deliveries that are never caught up has
/// the slow-consumer policy wrong; otherwise the receivers who miss messages are on one gateway:
/// if the bus shows that gateway without the room's subscription, it was not restored after the
/// reconnect, else the messages were lost writing to the sockets.
///
/// The cause misses messages run after run, in one room and on one gateway; two cores starved
/// by the tests beside it (a Cassandra node booting) can make a few others late too. So, as a
/// player would, it reads where most of the missing messages are, and runs again when a run
/// does not say clearly.
async fn solve_lost_after_maintenance(round: &Round) -> Vec<(&'static str, String)> {
    let gateways = [round.urls["gw-1"].as_str(), round.urls["gw-2"].as_str()];
    let mut runs = Vec::new();
    let (gateway, room) = loop {
        let report = player_run(&gateways, Run { seconds: 8, rate: 80, journeys: 0 }, &round.dir.join("run.json"));
        // A message some members never got: `missing` when it was one of this run's acked sends, a
        // `gap` when it was someone else's (the room's earlier traffic) and later seqs came.
        let missing: Vec<Value> = report["audit"]["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["kind"] == "missing" || f["kind"] == "gap")
            .cloned()
            .collect();
        assert!(!missing.is_empty(), "the symptom: messages missing: {:#}", report["audit"]);
        for gateway in ["gw-1", "gw-2"] {
            let url = &round.urls[gateway];
            let skipped = metric_value(url, "chat_drops_total{reason=\"queue_full\"}").await;
            let caught_up = metric_value(url, "chat_drops_total{reason=\"resynced_from_store\"}").await;
            if skipped > 0.0 && caught_up == 0.0 {
                return vec![("--process", gateway.into()), ("--hop", "gateway.outbox".into())];
            }
        }
        // Each missed delivery by the receiver's gateway (the player's client i is on
        // gw-(i mod 2 + 1)) and room.
        let mut by_gateway: BTreeMap<String, usize> = BTreeMap::new();
        let mut by_room: BTreeMap<String, usize> = BTreeMap::new();
        for finding in &missing {
            for user in finding["recipients"].as_array().unwrap() {
                let client: u32 = user.as_str().unwrap().rsplit('u').next().unwrap().parse().unwrap();
                *by_gateway.entry(format!("gw-{}", client % 2 + 1)).or_default() += 1;
                *by_room.entry(finding["room"].as_str().unwrap().to_owned()).or_default() += 1;
            }
        }
        let most = |counts: &BTreeMap<String, usize>| {
            let total: usize = counts.values().sum();
            let (name, n) = counts.iter().max_by_key(|(_, n)| **n).unwrap();
            (10 * n >= 9 * total).then(|| name.clone())
        };
        eprintln!("lab test: missed deliveries by gateway {by_gateway:?}, by room {by_room:?}");
        let found = (most(&by_gateway), most(&by_room));
        runs.push((by_gateway, by_room));
        if let (Some(gateway), Some(room)) = found {
            break (gateway, room);
        }
        assert!(runs.len() < 3, "missed deliveries are not in one room on one gateway, run after run: {runs:?}");
    };
    let (_, connz) = get_json("http://127.0.0.1:8222/connz?subs=1").await;
    let connection = connz["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == gateway.as_str())
        .unwrap_or_else(|| panic!("{gateway} is connected to the bus: {connz:#}"));
    let subscribed = connection["subscriptions_list"]
        .as_array()
        .is_some_and(|subs| subs.iter().any(|s| s.as_str() == Some(&protocol::subjects::room_feed(&room))));
    let hop = if subscribed { "gateway.deliver" } else { "gateway.resubscribe" };
    vec![("--process", gateway), ("--hop", hop.into())]
}

/// lost-after-maintenance: each mechanism's round solved from loadgen, metrics and NATS connz.
pub(crate) async fn lost_after_maintenance_every_mechanism_is_found_from_evidence() {
    let jaeger = &testkit::Jaeger::start().await;
    let challenge = "lost-after-maintenance";
    for mechanism in [Mechanism::ResubscribeLost, Mechanism::SlowConsumerDrop, Mechanism::DeliverDrop] {
        let round = start_cluster_round(challenge, seed_for(challenge, mechanism), jaeger);
        let answer = solve_lost_after_maintenance(&round).await;
        round.assert_unmarked(&[]).await;
        let (code, out) = round.answer(&[("--process", "fanout-1"), ("--hop", "fanout.publish")]);
        assert_eq!((code, out.starts_with("wrong")), (1, true), "{out}");
        let (code, out) = round.answer(&borrowed(&answer));
        assert_eq!(code, 0, "{mechanism:?}: {answer:?}: {out}");
        round.stop();
    }
}

/// refused-sends: first the symptom (a player's sends hang for seconds or are refused), while
/// both workers' view of the live workers is watched. A worker whose view drops while the
/// other's does not has stopped hearing that other one, and its log names whom: the named
/// worker's heartbeats are lost. With both views steady, the worker whose bus redelivers holds
/// sends (as in duplicate-after-stall).
async fn solve_refused_sends(round: &Round) -> Vec<(&'static str, String)> {
    let gateways = [round.urls["gw-1"].clone(), round.urls["gw-2"].clone()];
    let report_path = round.dir.join("symptom.json");
    let run = tokio::task::spawn_blocking(move || {
        let gateways = [gateways[0].as_str(), gateways[1].as_str()];
        player_run(&gateways, Run { seconds: 15, rate: 20, journeys: 0 }, &report_path)
    });
    let mut lowest: BTreeMap<&str, f64> = BTreeMap::new();
    while !run.is_finished() {
        for worker in ["fanout-1", "fanout-2"] {
            let live = metric_value(&round.urls[worker], "chat_workers_live").await;
            let seen = lowest.entry(worker).or_insert(live);
            *seen = seen.min(live);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let report = run.await.unwrap();
    // Refused, or not known by their deadline (`internal`).
    let refused = ["unavailable", "internal"].iter().map(|c| report["errors"][c].as_u64().unwrap_or(0)).sum::<u64>();
    let slowest_ack = report["latency_ms"]["send_to_ack"]["max"].as_f64().unwrap();
    assert!(refused > 0 || slowest_ack > 2000.0, "the symptom: {refused} refused, slowest ack {slowest_ack} ms");
    assert!(lowest.values().all(|live| *live >= 1.0), "each worker counts itself: {lowest:?}");
    let flapping: Vec<&str> = lowest.iter().filter(|(_, live)| **live < 2.0).map(|(w, _)| *w).collect();
    match flapping[..] {
        [] => solve_duplicate_after_stall(round).await,
        [view] => {
            let log = std::fs::read_to_string(round.logs.join(format!("{view}.log"))).unwrap();
            let silent: std::collections::BTreeSet<&str> = log
                .lines()
                .filter(|line| line.contains("worker silent"))
                .filter_map(|line| line.split("peer=").nth(1)?.split_whitespace().next())
                .collect();
            assert_eq!(silent.len(), 1, "{view}'s log names one silent peer: {silent:?}");
            let peer = silent.into_iter().next().unwrap().to_owned();
            assert_ne!(peer, view);
            vec![("--process", peer), ("--hop", "fanout.heartbeat".into()), ("--kind", "drop".into())]
        }
        _ => panic!("both workers lost sight of each other: {lowest:?}"),
    }
}

/// refused-sends: each mechanism's round solved from the workers' views and logs.
pub(crate) async fn refused_sends_every_mechanism_is_found_from_evidence() {
    let jaeger = &testkit::Jaeger::start().await;
    let challenge = "refused-sends";
    for mechanism in [Mechanism::OwnershipFlap, Mechanism::WorkerStall] {
        let round = start_cluster_round(challenge, seed_for(challenge, mechanism), jaeger);
        let answer = solve_refused_sends(&round).await;
        round.assert_unmarked(&[]).await;
        let (code, out) = round.answer(&[("--process", "gw-1"), ("--hop", "fanout.heartbeat"), ("--kind", "drop")]);
        assert_eq!(code, 1, "{out}");
        let (code, out) = round.answer(&borrowed(&answer));
        assert_eq!(code, 0, "{mechanism:?}: {answer:?}: {out}");
        round.stop();
    }
}

/// partitioned-gateway, duplicate-after-stall and byzantine: every mechanism's round solved.
pub(crate) async fn cluster_challenges_every_mechanism_is_found_from_evidence() {
    let jaeger = &testkit::Jaeger::start().await;
    let rounds = [
        ("partitioned-gateway", Mechanism::NatsCut),
        ("partitioned-gateway", Mechanism::FeedDelay),
        ("partitioned-gateway", Mechanism::AnswerDelay),
        ("duplicate-after-stall", Mechanism::WorkerStall),
        ("duplicate-after-stall", Mechanism::WorkerPublishDelay),
        ("byzantine", Mechanism::GatewayRewrite),
        ("byzantine", Mechanism::WorkerEquivocate),
        ("byzantine", Mechanism::ClockSkew),
        ("byzantine", Mechanism::SeqForge),
    ];
    for (challenge, mechanism) in rounds {
        let round = start_cluster_round(challenge, seed_for(challenge, mechanism), jaeger);
        assert_eq!(round.urls.len(), 4, "{:?}", round.urls);
        let answer = match challenge {
            "partitioned-gateway" => solve_partitioned_gateway(&round).await,
            "byzantine" => solve_byzantine(&round).await,
            _ => solve_duplicate_after_stall(&round).await,
        };
        round.assert_unmarked(&[]).await;
        let (code, out) = round.answer(&[("--process", "gw-9"), ("--hop", "store.append"), ("--kind", "drop")]);
        assert_eq!((code, out.starts_with("wrong")), (1, true), "{out}");
        let (code, out) = round.answer(&borrowed(&answer));
        assert_eq!(code, 0, "{challenge} {mechanism:?}: {answer:?}: {out}");
        round.stop();
    }
}
