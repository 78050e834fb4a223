//! A real Prometheus (Debian's `prometheus`) scrapes the all-in-one server's `/metrics`, and
//! PromQL over the scraped series returns exactly the counts the test caused. The shipped
//! rules (deploy/prometheus/alerts.yml) load into it and evaluate without errors, every query of
//! the Grafana dashboard runs, and promtool accepts the rules and the example config. A missing
//! binary fails the test, it never skips.

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
    wait_for(&prometheus, "sum(chat_sequence_to_gateway_seconds_count)", sent).await;
    wait_for(&prometheus, r#"sum(chat_frames_received_total{type="send"})"#, sent).await;
    wait_for(&prometheus, "sum(chat_joins_total)", 2.0).await;
    wait_for(&prometheus, "sum(chat_connections)", 2.0).await;
    wait_for(&prometheus, r#"count(chat_sends_total{outcome!="acked"}) or vector(0)"#, 0.0).await;
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

fn path(p: &std::path::Path) -> &str {
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
