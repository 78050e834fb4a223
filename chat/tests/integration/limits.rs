//! Configurable limits: rate, rooms per connection, connections, slow consumers.

use std::time::Duration;

use chat::testing::TestServerOptions;
use serde_json::json;

use crate::support::*;

fn options(edit: impl FnOnce(&mut gateway::Limits)) -> TestServerOptions {
    let mut options = TestServerOptions::default();
    edit(&mut options.gateway.limits);
    options
}

#[tokio::test]
async fn sends_beyond_the_rate_are_rate_limited() {
    let server = server_with(options(|l| {
        l.send_rate_per_sec = 1;
        l.send_burst = 3;
    }))
    .await;
    let mut a = Client::login(&server.ws_url, "a").await;
    a.join("r").await;
    for i in 0..5 {
        a.send(json!({"type": "send", "room": "r", "client_msg_id": format!("{i}"), "body": "x", "req": i})).await;
    }
    let (mut acks, mut limited) = (0, 0);
    while acks + limited < 5 {
        let frame = a.next().await;
        match frame["type"].as_str().unwrap() {
            "ack" => acks += 1,
            "error" => {
                assert_eq!(frame["code"], "rate_limited");
                limited += 1;
            }
            _ => {}
        }
    }
    assert_eq!((acks, limited), (3, 2));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn rooms_per_connection_and_connections_per_process_are_capped() {
    let server = server_with(options(|l| {
        l.max_rooms_per_connection = 2;
        l.max_connections = 2;
    }))
    .await;
    let mut a = Client::login(&server.ws_url, "a").await;
    a.join("one").await;
    a.join("two").await;
    a.send(json!({"type": "join", "room": "three"})).await;
    let error = a.expect("error").await;
    assert_eq!(error["code"], "bad_request");
    assert!(error["message"].as_str().unwrap().contains("at most 2 rooms"));
    let _b = Client::login(&server.ws_url, "b").await;
    let refused = tokio_tungstenite::connect_async(server.ws_url.as_str()).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("third connection should be refused with 503, got {:?}", other.map(|_| ())),
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_small_queue_loses_nothing_for_a_reader_that_keeps_up_eventually() {
    let server = server_with(options(|l| {
        l.outbound_queue = 2;
        l.send_rate_per_sec = 10_000;
        l.send_burst = 10_000;
        l.slow_consumer_timeout = Duration::from_secs(30);
    }))
    .await;
    let mut reader = Client::login(&server.ws_url, "reader").await;
    reader.join("q").await;
    let mut writer = Client::login(&server.ws_url, "writer").await;
    writer.join("q").await;
    for i in 0..300 {
        writer
            .send(json!({"type": "send", "room": "q", "client_msg_id": format!("{i}"), "body": "x".repeat(500)}))
            .await;
    }
    let seqs: Vec<u64> = reader.messages(300).await.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=300).collect::<Vec<_>>());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_consumer_that_stops_reading_is_closed_with_4008() {
    let server = server_with(options(|l| {
        l.outbound_queue = 4;
        l.slow_consumer_timeout = Duration::from_millis(500);
        l.send_rate_per_sec = 10_000;
        l.send_burst = 10_000;
        l.max_body_chars = 60_000;
    }))
    .await;
    let mut sleeper = Client::login(&server.ws_url, "sleeper").await;
    sleeper.join("flood").await;
    let mut writer = Client::login(&server.ws_url, "writer").await;
    writer.join("flood").await;
    let body = "x".repeat(60_000);
    // ~30 MB: far more than the socket buffers hold while the sleeper does not read.
    // The writer does not read either, so it may be closed as a slow consumer too.
    let flood = tokio::spawn(async move {
        use futures_util::SinkExt;
        for i in 0..500 {
            let frame = json!({"type": "send", "room": "flood", "client_msg_id": format!("{i}"), "body": body});
            let sent = writer.ws.send(tokio_tungstenite::tungstenite::Message::text(frame.to_string())).await;
            if sent.is_err() {
                break;
            }
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut kicked = false;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, metrics) = get(&format!("{}/metrics", server.http_url)).await;
        // Polling for the first slow-consumer close: the series is absent until then.
        if metric_or_zero(&metrics, "chat_disconnects_total{reason=\"slow_consumer\"}") >= 1.0 {
            kicked = true;
            break;
        }
    }
    assert!(kicked, "the sleeping consumer was not disconnected");
    flood.abort();
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn join_leave_and_history_floods_are_rate_limited() {
    let mut options = TestServerOptions::default();
    options.gateway.limits.control_rate_per_sec = 5;
    options.gateway.limits.control_burst = 20;
    let server = server_with(options).await;
    let mut mallory = Client::login(&server.ws_url, "mallory").await;
    let mut victim = Client::login(&server.ws_url, "victim").await;
    victim.join("lobby").await;
    // Every join and leave would tell the victim about mallory's presence; history reads the
    // store. 60 of them at once: the burst of 20 is answered, the rest refused.
    for n in 0..60 {
        let frame = match n % 3 {
            0 => json!({"type": "join", "room": "lobby", "req": n}),
            1 => json!({"type": "leave", "room": "lobby", "req": n}),
            _ => json!({"type": "history", "room": "lobby", "req": n}),
        };
        mallory.send(frame).await;
    }
    let mut limited = 0;
    for _ in 0..60 {
        let frame = mallory.next().await;
        if frame["type"] == "error" && frame["code"] == "rate_limited" {
            limited += 1;
        }
    }
    assert!((35..=45).contains(&limited), "{limited} of 60 refused; want about 40");
    // The budget refills (5 a second), and sends have their own.
    tokio::time::sleep(Duration::from_millis(300)).await;
    mallory.join("other").await;
    mallory.say("other", "m1", "still here").await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn one_user_holds_at_most_its_share_of_connections() {
    let mut options = TestServerOptions::default();
    options.gateway.limits.max_connections_per_user = 2;
    let server = server_with(options).await;
    let first = Client::login(&server.ws_url, "alice").await;
    let _second = Client::login(&server.ws_url, "alice").await;
    let mut third = Client::connect(&server.ws_url).await;
    third.send(json!({"type": "hello", "user": "alice"})).await;
    let refused = third.expect("error").await;
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    assert_eq!(third.closed().await, 1008);
    // Another user is not affected, and a closed connection gives its place back.
    let _bob = Client::login(&server.ws_url, "bob").await;
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = Client::connect(&server.ws_url).await;
        again.send(json!({"type": "hello", "user": "alice"})).await;
        if again.next().await["type"] == "welcome" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the closed connection's place did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await.unwrap();
}

/// A server admitting `max_sends_in_flight` sends at once, with `stall` (a `fanout.sequence`
/// fault) armed.
async fn stalled_server(max_sends_in_flight: usize, stall: serde_json::Value) -> chat::testing::RunningServer {
    stalled_server_with(options(|l| l.max_sends_in_flight = max_sends_in_flight), stall).await
}

/// A server started with `options`, with `stall` (a `fanout.sequence` fault) armed.
async fn stalled_server_with(mut options: TestServerOptions, stall: serde_json::Value) -> chat::testing::RunningServer {
    const TOKEN: &str = "shed-test-admin-token";
    options.gateway.admin_token = Some(TOKEN.into());
    let server = server_with(options).await;
    let bearer = format!("Bearer {TOKEN}");
    let headers = [("Authorization", bearer.as_str()), ("Content-Type", "application/json")];
    let url = format!("{}/admin/faults", server.http_url);
    let (status, body) = request("POST", &url, &headers, &stall.to_string()).await;
    assert_eq!(status, 201, "{body}");
    server
}

/// Past the process's cap of sends awaiting an answer, a send is answered `unavailable` at once
/// (shed, not queued), counted as `overloaded`; once answers come back, sends are taken again.
#[tokio::test]
async fn sends_past_the_in_flight_cap_are_shed_at_once_and_taken_again_after() {
    let stall = json!({"hop": "fanout.sequence", "action": "stall", "room": "slow", "delay_ms": 2_000, "count": 1});
    let server = stalled_server(2, stall).await;
    let base = server.http_url.clone();

    let mut a = Client::login(&server.ws_url, "a").await;
    a.join("slow").await;
    for i in 0..3 {
        a.send(json!({"type": "send", "room": "slow", "client_msg_id": format!("c-{i}"), "body": "x", "req": i})).await;
    }
    // The third is over the cap while the worker holds the first two: refused long before the
    // stall ends.
    let shed = a.next_within(Duration::from_millis(1_500)).await;
    assert_eq!(shed["type"], "error", "{shed}");
    assert_eq!(shed["code"], "unavailable", "{shed}");
    assert_eq!(shed["req"], 2, "{shed}");
    assert!(shed["message"].as_str().unwrap_or_default().contains("overloaded"), "{shed}");
    let (mut acked, started) = (Vec::new(), std::time::Instant::now());
    while acked.len() < 2 && started.elapsed() < Duration::from_secs(10) {
        let frame = a.next().await;
        if frame["type"] == "ack" {
            acked.push(frame["client_msg_id"].as_str().unwrap_or_default().to_owned());
        }
    }
    acked.sort();
    assert_eq!(acked, ["c-0", "c-1"], "the admitted sends are stored");
    // Places are given back: the shed send, retried with its id, is taken.
    a.say("slow", "c-2", "x").await;
    assert_eq!(whole_history(&base, "slow").await.len(), 3);
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    assert!(metrics.contains(r#"chat_drops_total{reason="overloaded"} 1"#), "{metrics}");
    assert!(metrics.contains("chat_sends_in_flight 0"), "{metrics}");
    server.shutdown().await.unwrap();
}

/// A stall is not overload: after quick answers, a room's worker holds its sends for 2 s while
/// 1,200 of them wait, more than the admission floor (1,024). No answers come meanwhile, which
/// the answer rate alone read as a collapse (it shed the sends past the floor); the answers
/// before the stall were quick, so the limit stays the cap, every send is admitted and stored.
#[tokio::test]
async fn sends_held_by_a_stall_after_quick_answers_are_admitted_up_to_the_cap() {
    const CLIENTS: usize = 12;
    const SENDS_EACH: usize = 100;
    let stall = json!({"hop": "fanout.sequence", "action": "stall", "room": "held", "delay_ms": 2_000, "count": 1});
    let mut options = options(|l| {
        l.send_rate_per_sec = 10_000;
        l.send_burst = 10_000;
        l.max_in_flight_sends = SENDS_EACH;
        l.outbound_queue = 4 * CLIENTS * SENDS_EACH;
    });
    // Time for 1,200 sends in one room after the stall, on a debug build.
    options.gateway.submit_timeout = Duration::from_secs(12);
    let server = stalled_server_with(options, stall).await;
    let base = server.http_url.clone();

    // Quick answers first, measured over a window of the answer rate (250 ms).
    let mut warm = Client::login(&server.ws_url, "warm").await;
    warm.join("quick").await;
    for i in 0..20 {
        warm.say("quick", &format!("w-{i}"), "x").await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let mut client = Client::login(&server.ws_url, &format!("u{c}")).await;
        client.join("held").await;
        clients.push(client);
    }
    for (c, client) in clients.iter_mut().enumerate() {
        for i in 0..SENDS_EACH {
            let id = format!("c{c}-{i}");
            client.send(json!({"type": "send", "room": "held", "client_msg_id": id, "body": "x", "req": i})).await;
        }
    }
    let answers = clients.into_iter().map(|mut client| {
        tokio::spawn(async move {
            let (mut acked, mut refused) = (0, Vec::new());
            while acked + refused.len() < SENDS_EACH {
                let frame = client.next_within(Duration::from_secs(20)).await;
                match frame["type"].as_str() {
                    Some("ack") => acked += 1,
                    Some("error") => refused.push(frame),
                    _ => {}
                }
            }
            (acked, refused)
        })
    });
    let mut acked = 0;
    for answer in answers {
        let (client_acked, refused) = answer.await.expect("client task");
        assert!(refused.is_empty(), "sends refused during the stall: {refused:?}");
        acked += client_acked;
    }
    assert_eq!(acked, CLIENTS * SENDS_EACH);
    assert_eq!(whole_history(&base, "held").await.len(), CLIENTS * SENDS_EACH);
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    let shed = metrics.lines().find_map(|line| line.strip_prefix(r#"chat_drops_total{reason="overloaded"} "#));
    assert!(matches!(shed, None | Some("0")), "{metrics}");
    server.shutdown().await.unwrap();
}

/// loadgen against a gateway that admits one send at a time while the worker holds the first:
/// every other send is refused at once (its send→refusal time is far below the hold), none of
/// them is stored, and the audit passes.
#[tokio::test]
async fn shed_sends_are_refused_quickly_and_never_stored_under_loadgen() {
    let stall = json!({"hop": "fanout.sequence", "action": "stall", "delay_ms": 3_000, "count": 1});
    let server = stalled_server(1, stall).await;

    let config = loadgen::Config {
        urls: vec![server.ws_url.clone()],
        clients: 4,
        rooms: 1,
        rooms_per_client: 1,
        phases: vec![loadgen::schedule::Phase { duration: Duration::from_secs(2), rate: 20.0 }],
        ramp: 0.0,
        history_rate: 0.0,
        seed: 11,
        drain: Duration::from_secs(5),
        prefix: "shed".into(),
        progress: false,
        ..loadgen::Config::default()
    };
    let report = tokio::time::timeout(Duration::from_secs(60), loadgen::run(config))
        .await
        .expect("loadgen finished in time")
        .expect("loadgen carried out");
    let shed = report.errors.get("unavailable").copied().unwrap_or(0);
    assert!(shed > 10, "most sends were shed while the worker held the first: {}", report.summary());
    let refusals = &report.latency_ms["send_to_refusal"];
    assert_eq!(refusals.count, shed, "every refusal is timed");
    assert!(refusals.max < 1_500.0, "refused at once, not after the 3 s hold: {refusals:?}");
    assert!(report.passed, "nothing refused was stored or delivered: {}", report.summary());
    assert_eq!(report.audit.counts.refused_but_delivered, 0);
    server.shutdown().await.unwrap();
}
