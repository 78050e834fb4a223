//! A real Prometheus (Debian's `prometheus`) scrapes the all-in-one server's `/metrics`, and
//! PromQL over the scraped series returns exactly the counts the test caused. The shipped
//! rules (deploy/prometheus/alerts.yml) load into it and evaluate without errors, every query of
//! the Grafana dashboard runs, and promtool accepts the rules and the example config. promtool's
//! unit tests (deploy/prometheus/tests) cover every alert, firing and quiet, and every alert
//! links its runbook; amtool accepts the Alertmanager config and routes each severity to its
//! receiver. A missing binary fails the test, it never skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use testkit::{promtool, Prometheus};

use crate::support::*;

/// Longest wait for Prometheus to see a value (it scrapes and evaluates every second).
const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(200);

/// Polls `promql` until its only sample equals `expected`; returns the last value seen.
async fn wait_for(prometheus: &Prometheus, promql: &str, expected: f64) -> f64 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let result = prometheus.query(promql).await;
        let value = match result.as_slice() {
            [(_, value)] => Some(*value),
            _ => None,
        };
        if value == Some(expected) {
            return expected;
        }
        assert!(
            Instant::now() < deadline,
            "`{promql}` is {result:?}, expected {expected}, after {DEADLINE:?}\nprometheus log:\n{}",
            prometheus.log()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Sends `ids` from `sender`, waiting for each ack, then waits until every client got them.
async fn send_all(sender: &mut Client, others: &mut [&mut Client], room: &str, ids: std::ops::Range<usize>) {
    let n = ids.len();
    for i in ids {
        sender.say(room, &format!("m-{i}"), &format!("message {i}")).await;
    }
    sender.messages(n).await;
    for client in others.iter_mut() {
        client.messages(n).await;
    }
}

#[tokio::test]
async fn prometheus_scrapes_metrics_and_promql_returns_the_counts() {
    let server = server().await;
    let alerts = testkit::workspace_root().join("deploy/prometheus/alerts.yml");
    let prometheus = Prometheus::start_with_rules(&[server.addr.to_string()], std::slice::from_ref(&alerts)).await;
    // Scraped once before any traffic, so rates see the counters rise.
    wait_for(&prometheus, r#"up{job="chat"}"#, 1.0).await;

    let room = "observed";
    let mut alice = Client::login(&server.ws_url, "alice").await;
    let mut bob = Client::login(&server.ws_url, "bob").await;
    alice.join(room).await;
    bob.join(room).await;

    // Two batches with a scrape between them: a counter first seen at its final value has no
    // rate, and the SLO rules are rates.
    const FIRST: usize = 5;
    const TOTAL: usize = 12;
    send_all(&mut alice, &mut [&mut bob], room, 0..FIRST).await;
    wait_for(&prometheus, r#"sum(chat_sends_total{outcome="acked"})"#, FIRST as f64).await;
    send_all(&mut alice, &mut [&mut bob], room, FIRST..TOTAL).await;

    let sent = TOTAL as f64;
    wait_for(&prometheus, r#"sum(chat_sends_total{outcome="acked"})"#, sent).await;
    // Every message reached both members (the sender gets its own message too).
    wait_for(&prometheus, "sum(chat_deliveries_total)", 2.0 * sent).await;
    wait_for(&prometheus, "sum(chat_sequenced_total)", sent).await;
    wait_for(&prometheus, "sum(chat_send_ack_seconds_count)", sent).await;
    // Every send answered within its deadline, by the bound the alert ChatSendsAnsweredLate reads.
    wait_for(&prometheus, r#"sum(chat_send_answer_seconds_bucket{le=~"5(\\.0)?"})"#, sent).await;
    wait_for(&prometheus, "sum(chat_sequence_to_gateway_seconds_count)", sent).await;
    wait_for(&prometheus, r#"sum(chat_frames_received_total{type="send"})"#, sent).await;
    wait_for(&prometheus, "sum(chat_joins_total)", 2.0).await;
    wait_for(&prometheus, "sum(chat_connections)", 2.0).await;
    // Every outcome is exported from the start (as 0): none but `acked` moved.
    wait_for(&prometheus, r#"count(chat_sends_total{outcome="unavailable"})"#, 1.0).await;
    wait_for(&prometheus, r#"sum(chat_sends_total{outcome!="acked"})"#, 0.0).await;
    wait_for(&prometheus, "sum(chat_drops_total) or vector(0)", 0.0).await;

    // The docs' p99 query gives a latency inside the histogram's range.
    let p99 = prometheus.query("histogram_quantile(0.99, sum by (le) (rate(chat_send_ack_seconds_bucket[1m])))").await;
    match p99.as_slice() {
        [(_, p99)] => assert!(*p99 > 0.0 && *p99 <= 10.0, "send->ack p99 {p99}"),
        other => panic!("send->ack p99 query returned {other:?}"),
    }

    // The SLO recording rules evaluate over the scraped series: no send failed.
    wait_for(&prometheus, "chat:send_errors:ratio_rate5m", 0.0).await;
    let latency = prometheus.query("chat:e2e_latency_errors:ratio_rate5m").await;
    assert!(matches!(latency.as_slice(), [(_, v)] if (0.0..=2.0).contains(v)), "e2e latency error ratio {latency:?}");

    // Every shipped rule loaded and evaluated without error.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let groups = prometheus.rule_groups().await;
        let rules: Vec<&serde_json::Value> =
            groups.iter().flat_map(|g| g["rules"].as_array().into_iter().flatten()).collect();
        assert!(rules.len() >= 30, "only {} rules loaded from {}: {groups:?}", rules.len(), alerts.display());
        let bad: Vec<_> =
            rules.iter().filter(|r| r["health"] == "err").map(|r| (&r["name"], &r["lastError"])).collect();
        assert!(bad.is_empty(), "rules failing to evaluate: {bad:?}");
        if rules.iter().all(|r| r["health"] == "ok") {
            break;
        }
        assert!(Instant::now() < deadline, "rules not all evaluated after {DEADLINE:?}: {groups:?}");
        tokio::time::sleep(POLL).await;
    }

    // Every query of the Grafana dashboard is valid PromQL (Grafana's variables filled in).
    let dashboard = testkit::workspace_root().join("deploy/grafana/chat-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard).expect("read chat-dashboard.json"))
            .expect("dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 20, "only {} dashboard queries found", exprs.len());
    for expr in exprs {
        prometheus.query(&expr.replace("$__rate_interval", "1m").replace("$instance", ".*")).await;
    }

    let config = testkit::workspace_root().join("deploy/prometheus/prometheus.yml");
    for args in [["check", "rules", path(&alerts)], ["check", "config", path(&config)]] {
        let output = promtool(&args);
        assert!(
            output.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    drop(prometheus);
    server.shutdown().await.unwrap();
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 workspace path")
}

/// Every `"expr"` string anywhere in a dashboard.
fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value.as_str()) {
                    ("expr", Some(expr)) => out.push(expr.to_owned()),
                    _ => collect_exprs(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|item| collect_exprs(item, out)),
        _ => {}
    }
}

/// Alert names in a rules file, each with its `runbook_url`, in file order (a line scan: the
/// file's layout is ours).
fn alerts_with_runbooks(rules: &str) -> Vec<(String, Option<String>)> {
    let mut alerts: Vec<(String, Option<String>)> = Vec::new();
    for line in rules.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert:") {
            alerts.push((name.trim().to_owned(), None));
        } else if let (Some(url), Some(last)) = (line.strip_prefix("runbook_url:"), alerts.last_mut()) {
            last.1 = Some(url.trim().trim_matches('"').to_owned());
        }
    }
    alerts
}

/// `(alert name, fires)` of every `alert_rule_test` case in a promtool test file: `fires` is
/// false for `exp_alerts: []`.
fn alert_cases(tests: &str) -> Vec<(String, bool)> {
    let mut cases = Vec::new();
    let mut name = None;
    for line in tests.lines().map(str::trim) {
        if let Some(n) = line.strip_prefix("alertname:") {
            name = Some(n.trim().to_owned());
        } else if let Some(expected) = line.strip_prefix("exp_alerts:") {
            let name = name.take().unwrap_or_else(|| panic!("`exp_alerts` without an alertname: {line}"));
            cases.push((name, expected.trim() != "[]"));
        }
    }
    cases
}

fn assert_success(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn promtool_unit_tests_cover_every_alert_and_every_alert_has_a_runbook() {
    let root = testkit::workspace_root();
    let alerts_file = root.join("deploy/prometheus/alerts.yml");
    let alerts = alerts_with_runbooks(&std::fs::read_to_string(&alerts_file).expect("read alerts.yml"));
    assert!(alerts.len() >= 22, "only {} alerts found in {}", alerts.len(), alerts_file.display());

    // Every alert links its own runbook, and the runbook exists.
    for (name, url) in &alerts {
        let expected = format!("docs/runbooks/{name}.md");
        assert_eq!(url.as_deref(), Some(expected.as_str()), "runbook_url of {name}");
        assert!(root.join(&expected).is_file(), "{name}: {expected} does not exist");
    }

    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("deploy/prometheus/tests"))
        .expect("read deploy/prometheus/tests")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no promtool test files in deploy/prometheus/tests");

    // Every alert has a case where it fires and one where it stays quiet.
    let cases: Vec<(String, bool)> =
        files.iter().flat_map(|f| alert_cases(&std::fs::read_to_string(f).expect("read test file"))).collect();
    for (name, _) in &alerts {
        for fires in [true, false] {
            assert!(
                cases.contains(&(name.clone(), fires)),
                "no promtool case where {name} {} (deploy/prometheus/tests)",
                if fires { "fires" } else { "stays quiet" }
            );
        }
    }
    let known: Vec<&String> = alerts.iter().map(|(name, _)| name).collect();
    for (name, _) in &cases {
        assert!(known.contains(&name), "promtool case for {name}, which alerts.yml does not define");
    }

    // `promtool test rules` on each file, two at a time (the multi-day ones take a while).
    let outputs: Vec<(PathBuf, Output)> = std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .chunks(files.len().div_ceil(2))
            .map(|chunk| {
                scope.spawn(move || {
                    chunk.iter().map(|f| (f.clone(), promtool(&["test", "rules", path(f)]))).collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("promtool thread")).collect()
    });
    for (file, output) in outputs {
        assert_success(&format!("promtool test rules {}", file.display()), &output);
    }
}

/// The `amtool` binary: `CHAT_AMTOOL`, or the one `deploy/tools/amtool` prints (it builds it
/// once per machine with Go). Panics with what to do when neither works.
fn amtool_binary() -> PathBuf {
    if let Ok(binary) = std::env::var("CHAT_AMTOOL") {
        return binary.into();
    }
    let script = testkit::workspace_root().join("deploy/tools/amtool");
    let output = Command::new(&script).output().unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert_success(&format!("{} (set CHAT_AMTOOL to an amtool binary instead)", script.display()), &output);
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 path");
    PathBuf::from(stdout.lines().last().expect("deploy/tools/amtool printed no path").trim())
}

fn amtool(binary: &Path, args: &[&str]) -> Output {
    Command::new(binary).args(args).output().unwrap_or_else(|e| {
        panic!("`{}` could not run ({e}): set CHAT_AMTOOL or run deploy/tools/amtool", binary.display())
    })
}

#[test]
fn alertmanager_config_is_valid_routes_by_severity_and_holds_pages_during_experiments() {
    let amtool_bin = amtool_binary();
    let config = testkit::workspace_root().join("deploy/alertmanager/alertmanager.yml");
    let config_arg = format!("--config.file={}", path(&config));

    let output = amtool(&amtool_bin, &["check-config", path(&config)]);
    assert_success("amtool check-config", &output);
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(summary.contains("SUCCESS"), "amtool check-config: {summary}");

    // Each severity reaches its receiver (`--verify.receivers` makes amtool exit 1 otherwise;
    // the printed name is checked too).
    for (labels, receiver) in [
        (&["alertname=ChatSendAvailabilityFastBurn", "severity=page", "slo=send-availability"][..], "pager"),
        (&["alertname=ChatE2ELatencyBudgetErosion", "severity=ticket"][..], "tickets"),
        (&["alertname=ChatStoreSlow", "severity=warning", "op=append"][..], "chat"),
        (&["alertname=ChatFaultInjectionActive", "severity=info"][..], "chat"),
        (&["alertname=PlannedExperiment", "severity=none", "experiment=gameday"][..], "chat"),
        (&["alertname=SomethingUnlabelled"][..], "chat"),
    ] {
        let verify = format!("--verify.receivers={receiver}");
        let mut args = vec!["config", "routes", "test", config_arg.as_str(), verify.as_str()];
        args.extend_from_slice(labels);
        let output = amtool(&amtool_bin, &args);
        assert_success(&format!("amtool {}", args.join(" ")), &output);
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), receiver, "receiver of {labels:?}");
    }

    // Inhibition is not something `amtool config routes test` evaluates, and amtool has no
    // offline inhibition check; the rule is read from the file: a PlannedExperiment alert
    // holds back every page, with no `equal` that the runner's label-less alert could miss.
    let text = std::fs::read_to_string(&config).expect("read alertmanager.yml");
    let text: String =
        text.lines().filter(|line| !line.trim_start().starts_with('#')).map(|line| format!("{line}\n")).collect();
    let rules = text.split_once("\ninhibit_rules:").expect("alertmanager.yml has inhibit_rules").1;
    let rules = rules.split("\nreceivers:").next().unwrap_or(rules);
    let experiment_rule = rules
        .split("\n  - ")
        .find(|rule| rule.contains(r#"source_matchers: ['alertname="PlannedExperiment"'"#))
        .unwrap_or_else(|| panic!("no inhibit rule with source alertname=\"PlannedExperiment\":\n{rules}"));
    assert!(
        experiment_rule.contains(r#"target_matchers: ['severity="page"']"#),
        "the PlannedExperiment rule must target severity=\"page\":\n{experiment_rule}"
    );
    assert!(
        !experiment_rule.contains("equal:"),
        "the PlannedExperiment rule must not need equal labels:\n{experiment_rule}"
    );
}

/// A real Alertmanager (Debian's `prometheus-alertmanager`, or `CHAT_ALERTMANAGER`) on a free
/// port with the project's config, killed on drop.
struct Alertmanager {
    child: std::process::Child,
    url: String,
    _storage: tempfile::TempDir,
}

impl Alertmanager {
    fn start() -> Alertmanager {
        let binary = std::env::var("CHAT_ALERTMANAGER").unwrap_or_else(|_| "prometheus-alertmanager".into());
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let storage = tempfile::tempdir().expect("temp dir");
        let config = testkit::workspace_root().join("deploy/alertmanager/alertmanager.yml");
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", path(&config)))
            .arg(format!("--storage.path={}", path(storage.path())))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("`{binary}` could not start ({e}): apt-get install prometheus-alertmanager, or set CHAT_ALERTMANAGER")
            });
        Alertmanager { child, url: format!("http://127.0.0.1:{port}"), _storage: storage }
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The state Alertmanager gives alert `name`: `active` or `suppressed`.
async fn alert_state(http: &reqwest::Client, url: &str, name: &str) -> Option<String> {
    let alerts: serde_json::Value = http.get(format!("{url}/api/v2/alerts")).send().await.ok()?.json().await.ok()?;
    alerts.as_array()?.iter().find(|a| a["labels"]["alertname"] == name).map(|a| a["status"]["state"].to_string())
}

#[tokio::test]
async fn a_planned_experiment_holds_back_pages_in_a_real_alertmanager() {
    let alertmanager = Alertmanager::start();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    let alert = |name: &str, severity: &str| serde_json::json!({"labels": {"alertname": name, "severity": severity}});
    let post =
        |alerts: serde_json::Value| http.post(format!("{}/api/v2/alerts", alertmanager.url)).json(&alerts).send();
    // Up when it accepts alerts.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !post(serde_json::json!([alert("ChatNoGatewayUp", "page"), alert("ChatStoreErrors", "warning")]))
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "Alertmanager did not start at {}", alertmanager.url);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let state = |name: &'static str| alert_state(&http, &alertmanager.url, name);
    assert_eq!(state("ChatNoGatewayUp").await.as_deref(), Some("\"active\""), "a page goes out normally");

    // What deploy/chaos/run sends while an experiment runs.
    let planned = serde_json::json!([{"labels": {"alertname": "PlannedExperiment", "severity": "none", "experiment": "worker-kill"}}]);
    assert!(post(planned).await.unwrap().status().is_success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while state("ChatNoGatewayUp").await.as_deref() != Some("\"suppressed\"") {
        assert!(Instant::now() < deadline, "the page was not held back during the planned experiment");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(state("ChatStoreErrors").await.as_deref(), Some("\"active\""), "only pages are held back");
}
