//! The distributed setup: gateways and fanout workers as separate `chat` processes on a real
//! nats-server and the shared Cassandra node, with processes killed mid-stream.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::Cluster;

use crate::support::*;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_chat"))
}

/// `gateways` gateways and `workers` workers on a nats-server of their own and the shared
/// Cassandra node; rosters every second, so presence across gateways settles fast.
async fn start_cluster(gateways: usize, workers: usize) -> Cluster {
    Cluster::builder(binary()).gateways(gateways).workers(workers).roster_interval(Duration::from_secs(1)).start().await
}

fn assert_gapless(messages: &[Value]) {
    let seqs: Vec<u64> = messages.iter().map(|m| m["seq"].as_u64().expect("seq")).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "seqs must run 1..n without gaps");
}

/// Sends `body` until it is acked, retrying `unavailable` and `internal` with the same client_msg_id.
async fn send_until_acked(client: &mut Client, room: &str, id: &str) -> (Value, usize) {
    let mut refusals = 0;
    loop {
        client.send(json!({"type": "send", "room": room, "client_msg_id": id, "body": id})).await;
        loop {
            let frame = client.next().await;
            match frame["type"].as_str() {
                Some("ack") if frame["client_msg_id"] == id => return (frame, refusals),
                Some("error") => {
                    // `unavailable`: not stored; `internal`: not known yet. Both are retried.
                    assert!(matches!(frame["code"].as_str(), Some("unavailable" | "internal")), "{frame}");
                    refusals += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
                _ => {}
            }
        }
    }
}

#[tokio::test]
async fn clients_on_two_gateways_see_one_gapless_order_and_each_other() {
    let cluster = start_cluster(2, 2).await;
    let mut clients = Vec::new();
    for i in 0..6 {
        let mut client = Client::login(&cluster.gateway_ws(i % 2), &format!("u{i}")).await;
        let joined = client.join("shared").await;
        if i == 1 {
            assert!(joined["members"].as_array().unwrap().contains(&json!("u0")), "members across gateways: {joined}");
        }
        clients.push(client);
    }
    let per_client = 10;
    let total = clients.len() * per_client;
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            tokio::spawn(async move {
                for n in 0..per_client {
                    client
                        .send(
                            json!({"type": "send", "room": "shared", "client_msg_id": format!("{i}-{n}"), "body": "x"}),
                        )
                        .await;
                }
                let messages = client.messages(total).await;
                messages
                    .iter()
                    .map(|m| (m["seq"].as_u64().unwrap(), m["id"].as_str().unwrap().to_owned()))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut orders = Vec::new();
    for task in tasks {
        orders.push(task.await.unwrap());
    }
    assert_eq!(orders[0].iter().map(|(s, _)| *s).collect::<Vec<_>>(), (1..=total as u64).collect::<Vec<_>>());
    for order in &orders[1..] {
        assert_eq!(order, &orders[0]);
    }
    assert_gapless(&whole_history(&cluster.gateway_url(0), "shared").await);
    // Each new message's ack came back to its gateway from a worker, and was timed once.
    let mut answers = 0.0;
    for gateway in 0..2 {
        let (_, metrics) = get(&format!("{}/metrics", cluster.gateway_url(gateway))).await;
        answers += metric(&metrics, "chat_sequence_to_answer_seconds_count");
    }
    assert_eq!(answers, total as f64);
}

#[tokio::test]
async fn presence_crosses_gateways() {
    let cluster = start_cluster(2, 1).await;
    let mut alice = Client::login(&cluster.gateway_ws(0), "alice").await;
    alice.join("p").await;
    let mut bob = Client::login(&cluster.gateway_ws(1), "bob").await;
    let joined = bob.join("p").await;
    assert_eq!(joined["members"], json!(["alice", "bob"]));
    assert_eq!(alice.next().await, json!({"type": "presence", "room": "p", "user": "bob", "state": "online"}));
    bob.send(json!({"type": "typing", "room": "p"})).await;
    assert_eq!(alice.next().await, json!({"type": "typing", "room": "p", "user": "bob"}));
    drop(bob);
    assert_eq!(alice.next().await, json!({"type": "presence", "room": "p", "user": "bob", "state": "offline"}));
}

#[tokio::test]
async fn kill_9_of_a_fanout_worker_loses_nothing_and_flow_resumes() {
    let mut cluster = start_cluster(1, 2).await;
    let mut reader = Client::login(&cluster.gateway_ws(0), "reader").await;
    reader.join("steady").await;
    let mut writer = Client::login(&cluster.gateway_ws(0), "writer").await;
    writer.join("steady").await;
    let mut acked = HashMap::new();
    let mut last_ack = Instant::now();
    let mut longest_stall = Duration::ZERO;
    for n in 0..120 {
        if n == 30 {
            cluster.kill_worker(0).await;
        }
        let (ack, _) = send_until_acked(&mut writer, "steady", &format!("m{n}")).await;
        longest_stall = longest_stall.max(last_ack.elapsed());
        last_ack = Instant::now();
        acked.insert(ack["id"].as_str().unwrap().to_owned(), ack["seq"].as_u64().unwrap());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(longest_stall < Duration::from_secs(10), "flow stalled for {longest_stall:?}");
    let stored = whole_history(&cluster.gateway_url(0), "steady").await;
    assert_gapless(&stored);
    assert_eq!(stored.len(), 120, "one stored message per acked send");
    for message in &stored {
        assert_eq!(acked.get(message["id"].as_str().unwrap()), message["seq"].as_u64().as_ref());
    }
    let live: Vec<u64> = reader.messages(120).await.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(live, (1..=120).collect::<Vec<_>>());
}

#[tokio::test]
async fn kill_9_of_a_gateway_its_clients_resume_on_the_other_without_loss() {
    let mut cluster = start_cluster(2, 1).await;
    let mut watcher = Client::login(&cluster.gateway_ws(0), "watcher").await;
    watcher.join("g").await;
    let mut writer = Client::login(&cluster.gateway_ws(1), "writer").await;
    writer.join("g").await;
    for n in 0..20 {
        send_until_acked(&mut writer, "g", &format!("a{n}")).await;
    }
    let before: Vec<Value> = watcher.messages(10).await;
    let last_seen = before.last().unwrap()["seq"].as_u64().unwrap();
    cluster.kill_gateway(0).await;
    let mut resumed = Client::login(&cluster.gateway_ws(1), "watcher").await;
    resumed.send(json!({"type": "join", "room": "g", "since": last_seen})).await;
    resumed.expect("joined").await;
    for n in 20..40 {
        send_until_acked(&mut writer, "g", &format!("a{n}")).await;
    }
    let after = resumed.messages(40 - last_seen as usize).await;
    let mut seqs: Vec<u64> = before.iter().chain(after.iter()).map(|m| m["seq"].as_u64().unwrap()).collect();
    let count = seqs.len();
    seqs.dedup();
    assert_eq!(seqs.len(), count, "no duplicates");
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
}

#[tokio::test]
async fn nats_restart_under_load_acked_messages_are_stored_exactly_once() {
    let mut cluster = start_cluster(1, 1).await;
    let mut writer = Client::login(&cluster.gateway_ws(0), "writer").await;
    writer.join("n").await;
    let mut acked: HashMap<String, String> = HashMap::new();
    let mut refused = 0;
    for n in 0..80 {
        if n == 25 {
            cluster.nats_mut().restart().await;
        }
        let id = format!("n{n}");
        writer.send(json!({"type": "send", "room": "n", "client_msg_id": id, "body": "x"})).await;
        loop {
            let frame = writer.next().await;
            match frame["type"].as_str() {
                Some("ack") => {
                    acked.insert(id.clone(), frame["id"].as_str().unwrap().to_owned());
                    break;
                }
                Some("error") => {
                    // Refused (not stored), or not known by its deadline: never silence.
                    assert!(matches!(frame["code"].as_str(), Some("unavailable" | "internal")), "{frame}");
                    refused += 1;
                    break;
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.gateway(0).wait_ready().await;
    let stored = whole_history(&cluster.gateway_url(0), "n").await;
    assert_gapless(&stored);
    let stored_ids: Vec<&str> = stored.iter().map(|m| m["client_msg_id"].as_str().unwrap()).collect();
    assert_eq!(stored_ids.iter().collect::<HashSet<_>>().len(), stored_ids.len(), "no client_msg_id stored twice");
    for (client_msg_id, id) in &acked {
        let found: Vec<&Value> = stored.iter().filter(|m| m["client_msg_id"] == client_msg_id.as_str()).collect();
        assert_eq!(found.len(), 1, "{client_msg_id} acked but stored {} times", found.len());
        assert_eq!(found[0]["id"], id.as_str());
    }
    // After the restart the system works again.
    let (ack, _) = send_until_acked(&mut writer, "n", "after").await;
    assert!(ack["seq"].as_u64().unwrap() > 0);
    eprintln!("nats restart: {} acked, {refused} refused or not known", acked.len());
}

#[tokio::test]
async fn the_journey_gathers_hops_from_every_process_and_chat_trace_prints_it() {
    let cluster = start_cluster(1, 1).await;
    let mut alice = Client::login(&cluster.gateway_ws(0), "alice").await;
    alice.join("j").await;
    let ack = alice.say("j", "j1", "where did I go").await;
    alice.messages(1).await;
    let id = ack["id"].as_str().unwrap();
    let url = format!("{}/debug/messages/{id}", cluster.gateway_url(0));
    let deadline = Instant::now() + Duration::from_secs(10);
    let journey = loop {
        let (status, journey) = get_json(&url).await;
        assert_eq!(status, 200, "{journey}");
        let hops: Vec<String> =
            journey["hops"].as_array().unwrap().iter().map(|h| h["hop"].as_str().unwrap().to_owned()).collect();
        if hops.iter().any(|h| h == "fanout.sequence") && hops.iter().any(|h| h == "gateway.fanout") {
            break journey;
        }
        assert!(Instant::now() < deadline, "incomplete journey: {journey}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let processes: HashSet<&str> =
        journey["hops"].as_array().unwrap().iter().map(|h| h["process"].as_str().unwrap()).collect();
    assert_eq!(processes.len(), 2, "hops from the gateway and the worker: {journey}");
    assert_eq!(journey["trace_id"], ack_trace(&journey));
    let output = tokio::process::Command::new(binary())
        .args(["trace", id, "--url", &cluster.gateway_url(0)])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout);
    for hop in ["gateway.receive", "fanout.sequence", "store.append", "gateway.fanout", "gateway.ack"] {
        assert!(text.contains(hop), "{hop} missing from:\n{text}");
    }
}

fn ack_trace(journey: &Value) -> Value {
    journey["trace_id"].clone()
}

#[tokio::test]
async fn the_store_briefly_unreachable_sends_fail_cleanly_the_worker_warms_it_again_and_the_system_recovers() {
    // A node of its own, so freezing it disturbs no other test.
    let node = tokio::task::spawn_blocking(|| testkit::DedicatedCassandra::start("test-cassandra-outage", 9342, 7342))
        .await
        .unwrap();
    let cluster = Cluster::builder(binary())
        .cql(node.addr.clone())
        .keyspace_prefix("outage")
        .roster_interval(Duration::from_secs(1))
        .start()
        .await;
    let base = cluster.gateway_url(0);
    // A store of the test's own on the same node, for an append bounded by a deadline.
    let bounded = storage::cql::CqlStore::connect(storage::cql::CqlConfig {
        nodes: vec![node.addr.clone()],
        keyspace: testkit::unique_keyspace("bounded"),
        ..Default::default()
    })
    .await
    .unwrap();
    // Its fence taken (taking one is not bounded), as a worker's is.
    let first = storage::RoomAppend {
        room: "b".into(),
        expected_last_seq: 0,
        messages: vec![testkit::message("b", 1, "writer")],
    };
    storage::HistoryStore::append(&bounded, first).await.unwrap();

    let mut writer = Client::login(&cluster.gateway_ws(0), "writer").await;
    writer.join("o").await;
    send_until_acked(&mut writer, "o", "before").await;

    node.freeze();
    // An append given 300 ms is given up by then (each request's own timeout is 1 s): a worker
    // holding a batch refuses its sends by their deadline, and the refusal settles them.
    let started = Instant::now();
    let append = storage::RoomAppend {
        room: "b".into(),
        expected_last_seq: 1,
        messages: vec![testkit::message("b", 2, "writer")],
    };
    let given_up = storage::HistoryStore::append_by(&bounded, append, (started + Duration::from_millis(300)).into())
        .await
        .expect_err("the store is frozen");
    assert_eq!(given_up.kind(), storage::StoreErrorKind::NotCommitted, "{given_up}");
    assert!(started.elapsed() < Duration::from_millis(800), "given up after {:?}", started.elapsed());
    let deadline = Instant::now() + Duration::from_secs(15);
    while get(&format!("{base}/readyz")).await.0 != 503 {
        assert!(Instant::now() < deadline, "/readyz stayed 200 with the store frozen");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // While frozen, a send is refused as unavailable (never half-accepted silently), within its
    // deadline: the worker's store read times out (1 s) before it wrote anything, so no copy of
    // the send can be stored and its refusal settles it. (Before, the gateway waited out the 5 s
    // deadline and the 6 s margin, then asked the store: about 12 s.)
    let sent = Instant::now();
    writer.send(json!({"type": "send", "room": "o", "client_msg_id": "during", "body": "x"})).await;
    let answer = loop {
        let frame = writer.next_within(Duration::from_secs(25)).await;
        if frame["type"] == "ack" || frame["type"] == "error" {
            break frame;
        }
    };
    assert_eq!(answer["code"], "unavailable", "{answer}");
    assert!(sent.elapsed() < Duration::from_secs(5), "refused within the deadline: {:?}", sent.elapsed());
    // The worker counts the store as down once 3 pings (one a second) have failed, and says why
    // it is not ready.
    let worker = cluster.worker_url(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, why) = get(&format!("{worker}/readyz")).await;
        assert_eq!(status, 503, "{why}");
        if why.contains("store-warm: the store stopped answering") {
            break;
        }
        assert!(Instant::now() < deadline, "the worker never counted the store down: {why}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    node.thaw();
    // Back, the store is warmed up again before the worker says ready: seen as a not-ready
    // `store-warm: warming` (a warm-up round of a debug build takes tens of ms, and a window
    // is 20 rounds), then ready.
    let (mut seen_warming, deadline) = (false, Instant::now() + Duration::from_secs(30));
    loop {
        let (status, why) = get(&format!("{worker}/readyz")).await;
        seen_warming |= why.contains("store-warm: warming the store up again");
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the worker is still not ready 30 s after the store came back: {why}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen_warming, "the worker said ready without warming the store up again");
    cluster.gateway(0).wait_ready().await;
    // The client retries with the same client_msg_id: exactly one message, whatever happened.
    let (retried, _) = send_until_acked(&mut writer, "o", "during").await;
    let (after, _) = send_until_acked(&mut writer, "o", "after").await;
    assert!(after["seq"].as_u64() > retried["seq"].as_u64());
    let stored = whole_history(&base, "o").await;
    assert_gapless(&stored);
    let ids: Vec<&str> = stored.iter().map(|m| m["client_msg_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["before", "during", "after"]);
    assert_eq!(storage::HistoryStore::last_seq(&bounded, "b").await.unwrap(), 1, "the given-up append left nothing");
}

#[tokio::test]
async fn users_of_a_gateway_that_dies_silently_go_offline_within_30_seconds() {
    let mut cluster = start_cluster(2, 1).await;
    let mut alice = Client::login(&cluster.gateway_ws(0), "alice").await;
    alice.join("d").await;
    let mut bob = Client::login(&cluster.gateway_ws(1), "bob").await;
    bob.join("d").await;
    assert_eq!(alice.next().await["state"], "online");
    let killed = Instant::now();
    cluster.kill_gateway(1).await;
    let offline = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let frame = alice.next().await;
            if frame["type"] == "presence" && frame["user"] == "bob" && frame["state"] == "offline" {
                return;
            }
        }
    })
    .await;
    assert!(offline.is_ok(), "bob still online 30 s after his gateway died");
    eprintln!("dead gateway detected after {:?}", killed.elapsed());
}

#[tokio::test]
async fn a_gateway_cut_from_nats_delivers_what_it_missed_once_it_is_back() {
    let mut cluster = start_cluster(1, 1).await;
    let relay = testkit::Relay::start(cluster.nats_addr()).await;
    let cut_off = cluster.add_gateway_on(&format!("nats://{}", relay.addr())).await;
    let cut_off = cluster.gateway(cut_off);
    let mut alice = Client::login(&cut_off.ws_url(), "alice").await;
    alice.join("quiet").await;
    let mut bob = Client::login(&cluster.gateway_ws(0), "bob").await;
    bob.join("quiet").await;
    send_until_acked(&mut bob, "quiet", "before").await;
    assert_eq!(alice.messages(1).await[0]["seq"], 1);

    // Only the relayed gateway loses NATS; the message is stored and reaches bob's gateway.
    relay.cut();
    let (status, _) = get(&format!("{}/readyz", cut_off.http_url())).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = status;
    while status != 503 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = get(&format!("{}/readyz", cut_off.http_url())).await.0;
    }
    assert_eq!(status, 503, "the cut-off gateway says it is not ready");
    let (ack, _) = send_until_acked(&mut bob, "quiet", "during").await;
    assert_eq!(ack["seq"], 2);

    // The room stays quiet: no later message will reveal the gap. The reconnect must.
    relay.restore();
    let missed = tokio::time::timeout(Duration::from_secs(30), alice.messages(1))
        .await
        .expect("the missed message arrives after NATS is back");
    assert_eq!((missed[0]["seq"].as_u64(), missed[0]["client_msg_id"].as_str()), (Some(2), Some("during")));
    let (_, journey) =
        get_json(&format!("{}/debug/messages/{}", cut_off.http_url(), ack["id"].as_str().unwrap())).await;
    assert!(journey.to_string().contains("gateway.gap_repair"), "the journey shows the repair: {journey}");
}

/// A send that expires in a worker's hands (the worker holds its batch past the send's 5 s
/// deadline) is answered by its deadline all the same: `internal`, "not known yet", since the
/// gateway cannot tell whether a worker will still store it. The worker, reaching it after its
/// own (earlier) deadline, refuses it; the gateway records that late word. It is not stored;
/// its retry is. (Before, the client waited until the worker got to it, 6.5 s, or with no word
/// the deadline and a 6 s margin, 11 s.)
#[tokio::test]
async fn a_send_expired_in_a_stalled_worker_is_answered_by_its_deadline_and_not_stored() {
    const TOKEN: &str = "expiry-admin-token-0123";
    let cluster = Cluster::builder(binary()).gateways(1).workers(1).admin_token(TOKEN).start().await;
    let fault =
        json!({"hop": "fanout.sequence", "action": "stall", "probability": 1, "seed": 7, "delay_ms": 6500, "count": 1});
    arm_fault(&cluster.worker_url(0), TOKEN, &fault).await;

    let mut alice = Client::login(&cluster.gateway_ws(0), "alice").await;
    alice.join("expiry").await;
    let sent = Instant::now();
    alice.send(json!({"type": "send", "room": "expiry", "client_msg_id": "m0", "body": "held"})).await;
    let answer = alice.next_within(Duration::from_secs(20)).await;
    let waited = sent.elapsed();
    assert_eq!((answer["type"].as_str(), answer["code"].as_str()), (Some("error"), Some("internal")), "{answer}");
    assert!(answer["message"].as_str().unwrap_or("").contains("retry with the same client_msg_id"), "{answer}");
    assert!(
        waited >= Duration::from_millis(4_500) && waited < Duration::from_secs(5),
        "answered by the 5 s deadline, not when the worker got to it (6.5 s): {waited:?}"
    );
    // The worker refuses it at 6.5 s; the gateway, still listening, counts that late word.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = get(&format!("{}/metrics", cluster.gateway_url(0))).await;
        if metrics.contains("chat_send_late_words_total{outcome=\"refused\"} 1") {
            break;
        }
        assert!(Instant::now() < deadline, "no late word counted: {metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(whole_history(&cluster.gateway_url(0), "expiry").await.is_empty(), "the refused send is not stored");

    let retry = alice.say("expiry", "m0", "held").await;
    assert_eq!(retry["seq"], 1, "{retry}");
    assert_eq!(whole_history(&cluster.gateway_url(0), "expiry").await.len(), 1);
}

/// A worker stopped (SIGTERM) with sends queued behind the batch in hand answers that batch,
/// hands the queued sends back to JetStream and says it is leaving, so the other worker takes
/// its partitions at once and stores them before their deadline. Without the hand-back they
/// would be redelivered only after the 8 s ack wait, past their deadline, and refused.
#[tokio::test]
async fn a_worker_stopped_with_sends_queued_hands_them_to_the_next_owner_in_time() {
    const TOKEN: &str = "leave-admin-token-0123";
    let mut cluster = Cluster::builder(binary()).gateways(1).workers(2).admin_token(TOKEN).start().await;
    // Worker 0's first room batch is held 1.5 s: what it pulls meanwhile queues behind it.
    let fault =
        json!({"hop": "fanout.sequence", "action": "stall", "probability": 1, "seed": 7, "delay_ms": 1500, "count": 1});
    arm_fault(&cluster.worker_url(0), TOKEN, &fault).await;
    let mut alice = Client::login(&cluster.gateway_ws(0), "alice").await;
    // Sixteen rooms: some in partitions of each worker.
    let rooms: Vec<String> = (0..16).map(|i| format!("leave-{i}")).collect();
    for room in &rooms {
        alice.join(room).await;
    }
    let started = Instant::now();
    for wave in 0..2 {
        for room in &rooms {
            alice.send(json!({"type": "send", "room": room, "client_msg_id": format!("w{wave}"), "body": "x"})).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let answers = async {
        let mut acked = HashSet::new();
        while acked.len() < 2 * rooms.len() {
            let frame = alice.next_within(Duration::from_secs(20)).await;
            if frame["type"] == "message" || frame["type"] == "presence" {
                continue;
            }
            assert_eq!(frame["type"], "ack", "every send is stored: {frame}");
            acked.insert((
                frame["room"].as_str().unwrap().to_owned(),
                frame["client_msg_id"].as_str().unwrap().to_owned(),
            ));
        }
        started.elapsed()
    };
    let (stopped, answered_after) = tokio::join!(cluster.terminate_worker(0, Duration::from_secs(20)), answers);
    assert!(stopped, "the worker stops on SIGTERM");
    assert!(
        answered_after < Duration::from_secs(5),
        "every send stored within its deadline, none left for a redelivery after the ack wait: {answered_after:?}"
    );
    for room in &rooms {
        let stored = whole_history(&cluster.gateway_url(0), room).await;
        let ids: Vec<&str> = stored.iter().map(|m| m["client_msg_id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), 2, "{room}: each send stored once: {ids:?}");
    }
}

/// A worker killed (kill -9) with sends in hand cannot hand them back: JetStream would offer
/// them again only after its 8 s ack wait, past their 5 s deadline, and they would be answered
/// `internal` (not known yet) at their deadline. The gateway follows the workers too: once the
/// worker that owned a pending send's partition has been silent for 3 s, it publishes a copy
/// for the partition's new owner, which stores it within the deadline. Each send is stored once.
#[tokio::test]
async fn sends_held_by_a_worker_killed_with_kill_9_are_stored_by_the_next_owner_in_time() {
    const TOKEN: &str = "copy-admin-token-0123";
    let mut cluster = Cluster::builder(binary()).gateways(1).workers(2).admin_token(TOKEN).start().await;
    // Worker 0 holds its first room batch far past the deadline; what it pulls meanwhile queues
    // behind it. Both are lost with the process.
    let fault = json!({"hop": "fanout.sequence", "action": "stall", "probability": 1, "seed": 7, "delay_ms": 30000, "count": 1});
    arm_fault(&cluster.worker_url(0), TOKEN, &fault).await;
    let mut alice = Client::login(&cluster.gateway_ws(0), "alice").await;
    // Sixteen rooms: some in partitions of each worker.
    let rooms: Vec<String> = (0..16).map(|i| format!("copy-{i}")).collect();
    for room in &rooms {
        alice.join(room).await;
    }
    let started = Instant::now();
    for room in &rooms {
        alice.send(json!({"type": "send", "room": room, "client_msg_id": "c0", "body": "x"})).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill_worker(0).await;
    let mut acked = HashMap::new();
    while acked.len() < rooms.len() {
        let frame = alice.next_within(Duration::from_secs(20)).await;
        if frame["type"] == "message" || frame["type"] == "presence" {
            continue;
        }
        assert_eq!(frame["type"], "ack", "every send is stored after {:?}: {frame}", started.elapsed());
        acked.insert(frame["room"].as_str().unwrap().to_owned(), started.elapsed());
    }
    // An ack means the copy was taken before the deadline (a worker stores no send past it);
    // without the copy these sends would get `internal` (not known yet) just before 5 s.
    let slowest = acked.values().max().copied().unwrap_or_default();
    eprintln!("slowest ack after {slowest:?}");
    assert!(slowest < Duration::from_secs(8), "every send answered before the ack wait: {acked:?}");
    for room in &rooms {
        let stored = whole_history(&cluster.gateway_url(0), room).await;
        assert_eq!(stored.len(), 1, "{room}: stored once: {stored:?}");
    }
    let (_, metrics) = get(&format!("{}/metrics", cluster.gateway_url(0))).await;
    let copies: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("chat_send_copies_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(copies >= 1.0, "the gateway published copies for the new owner: {copies}");
}

/// NATS frozen for 8 s: long enough that every process drops its connection (three unanswered
/// pings, about 6 s in) and connects again at the thaw. Sends made 4.5 s into the freeze still
/// have 1.5 s of their 5 s deadline left at the thaw. Before, JetStream handed each of them at the
/// thaw to the worker's pull from before the freeze, on a connection that was gone, and offered
/// it again only after the 8 s ack wait: every one was refused 11 s after it was sent. Now the
/// gateway publishes a copy of each send in flight when its connection comes back, and the
/// worker stores it in time. Sends made while the gateway is disconnected were refused at once;
/// now they wait for the connection (while 1 s of their deadline would be left) and are stored.
#[tokio::test]
async fn sends_caught_in_a_nats_freeze_that_breaks_connections_are_stored_within_their_deadline() {
    let cluster = Cluster::builder(binary()).gateways(1).workers(1).start().await;
    let base = cluster.gateway_url(0);
    let mut alice = Client::login(&cluster.gateway_ws(0), "alice").await;
    let rooms: Vec<String> = (0..8).map(|i| format!("frozen-{i}")).collect();
    for room in &rooms {
        alice.join(room).await;
        send_until_acked(&mut alice, room, "before").await;
    }
    let mut sent_at = HashMap::new();

    cluster.nats().signal("-STOP");
    let frozen = Instant::now();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    for (i, room) in rooms.iter().enumerate() {
        let send =
            json!({"type": "send", "room": room, "client_msg_id": format!("published-{i}"), "body": "x", "req": i});
        alice.send(send).await;
        sent_at.insert(i as u64, Instant::now());
    }
    // The gateway drops its connection about 6 s in; /readyz says so.
    while get(&format!("{base}/readyz")).await.0 == 200 {
        assert!(frozen.elapsed() < Duration::from_millis(7_500), "the gateway kept its connection to a frozen NATS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, room) in rooms.iter().enumerate() {
        let req = 100 + i as u64;
        let send =
            json!({"type": "send", "room": room, "client_msg_id": format!("waited-{i}"), "body": "x", "req": req});
        alice.send(send).await;
        sent_at.insert(req, Instant::now());
    }
    tokio::time::sleep(Duration::from_millis(8_000).saturating_sub(frozen.elapsed())).await;
    cluster.nats().signal("-CONT");

    let mut answers = HashMap::new();
    while answers.len() < sent_at.len() {
        let frame = alice.next_within(Duration::from_secs(20)).await;
        if matches!(frame["type"].as_str(), Some("ack" | "error")) {
            let req = frame["req"].as_u64().unwrap_or_else(|| panic!("an answer to a send carries its req: {frame}"));
            answers.entry(req).or_insert((frame, sent_at[&req].elapsed()));
        }
    }
    let late: Vec<String> = answers
        .iter()
        .filter(|(_, (frame, after))| frame["type"] != "ack" || *after >= Duration::from_millis(5_500))
        .map(|(req, (frame, after))| format!("send {req}, answered after {after:?}: {frame}"))
        .collect();
    if !late.is_empty() {
        let (_, worker_metrics) = get(&format!("{}/metrics", cluster.worker_url(0))).await;
        let sends: Vec<&str> = worker_metrics
            .lines()
            .filter(|l| ["chat_send", "chat_partition", "chat_store_op"].iter().any(|p| l.starts_with(p)))
            .collect();
        panic!(
            "every send acked within its 5 s deadline; not so:\n{}\n\nthe send stream's consumers now:\n{}\n\nthe worker's send metrics:\n{}",
            late.join("\n"),
            send_consumers(&cluster.nats().url()).await,
            sends.join("\n")
        );
    }
    for (i, room) in rooms.iter().enumerate() {
        let mut ids: Vec<String> = whole_history(&base, room)
            .await
            .iter()
            .map(|m| m["client_msg_id"].as_str().unwrap_or_default().to_owned())
            .collect();
        // Sends in flight together may take their seqs in either order.
        if let Some(sent) = ids.get_mut(1..) {
            sent.sort();
        }
        let expected = ["before".to_owned(), format!("published-{i}"), format!("waited-{i}")];
        assert_eq!(ids, expected, "room {room}: each send stored once");
    }
}

/// Each partition consumer of the send stream with messages on it, as evidence for a failure:
/// pending (not yet handed to a pull), handed out and unacked, and the pulls waiting.
async fn send_consumers(nats_url: &str) -> String {
    use futures_util::StreamExt;
    let client = match async_nats::connect(nats_url).await {
        Ok(client) => client,
        Err(e) => return format!("(cannot connect to NATS: {e})"),
    };
    let js = async_nats::jetstream::new(client);
    let mut stream = match js.get_stream(protocol::subjects::SEND_STREAM).await {
        Ok(stream) => stream,
        Err(e) => return format!("(no send stream: {e})"),
    };
    let mut lines = Vec::new();
    if let Ok(info) = stream.info().await {
        lines.push(format!("stream: {} messages, last seq {}", info.state.messages, info.state.last_sequence));
    }
    let mut consumers = stream.consumers();
    while let Some(Ok(info)) = consumers.next().await {
        if info.delivered.stream_sequence > 0 || info.num_pending > 0 {
            lines.push(format!(
                "{}: pending {}, unacked {}, redelivered {}, waiting pulls {}, delivered up to seq {}, acked up to seq {}",
                info.name,
                info.num_pending,
                info.num_ack_pending,
                info.num_redelivered,
                info.num_waiting,
                info.delivered.stream_sequence,
                info.ack_floor.stream_sequence
            ));
        }
    }
    lines.join("\n")
}

/// NATS frozen for longer than a worker's silence (3 s): every process hears nobody, a worker
/// not even itself, and counts the quiet as its own, so no partition moves and no worker
/// raises another's fence. Before, each worker took every partition during the freeze (the
/// store still answered) and the two fought over the fences after the thaw, their appends
/// fenced off.
#[tokio::test]
async fn nats_frozen_longer_than_a_worker_silence_moves_no_partition() {
    let cluster = Cluster::builder(binary()).gateways(1).workers(2).start().await;
    let shares = || async {
        let mut shares = Vec::new();
        for worker in 0..2 {
            let (_, metrics) = get(&format!("{}/metrics", cluster.worker_url(worker))).await;
            shares.push(metric(&metrics, "chat_partitions_owned"));
        }
        shares
    };
    let settled = Instant::now();
    let mut before = shares().await;
    while before.iter().sum::<f64>() != 16.0 && settled.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        before = shares().await;
    }
    assert_eq!(before.iter().sum::<f64>(), 16.0, "the workers share the 16 partitions: {before:?}");

    cluster.nats().signal("-STOP");
    let frozen = Instant::now();
    let mut seen = Vec::new();
    while frozen.elapsed() < Duration::from_secs(5) {
        seen.push(shares().await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    cluster.nats().signal("-CONT");
    let thawed = Instant::now();
    while thawed.elapsed() < Duration::from_secs(4) {
        seen.push(shares().await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(seen.iter().all(|shares| *shares == before), "a partition moved: {before:?}, then {seen:?}");

    // Both workers carry on with their shares, and nobody's append was fenced off.
    let mut alice = Client::login(&cluster.gateway_ws(0), "alice").await;
    for i in 0..16 {
        let room = format!("thawed-{i}");
        alice.join(&room).await;
        send_until_acked(&mut alice, &room, "t0").await;
    }
    for worker in 0..2 {
        let (_, metrics) = get(&format!("{}/metrics", cluster.worker_url(worker))).await;
        assert_eq!(metric_or_zero(&metrics, "chat_seq_conflicts_total"), 0.0, "worker {worker} was fenced off");
    }
}
