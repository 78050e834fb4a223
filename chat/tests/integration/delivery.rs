//! Sending, sequencing, idempotency, replay with `since`, and ordering under concurrency.

use std::collections::HashSet;

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn send_is_acked_and_delivered_to_every_member_with_gapless_seq() {
    let server = server().await;
    let mut alice = Client::login(&server.ws_url, "alice").await;
    let mut bob = Client::login(&server.ws_url, "bob").await;
    let joined = alice.join("general").await;
    assert_eq!(joined["last_seq"], 0);
    bob.join("general").await;

    alice.send(json!({"type": "send", "room": "general", "client_msg_id": "c-1", "body": "hello", "req": 9})).await;
    let ack = alice.expect("ack").await;
    assert_eq!(ack["req"], 9);
    assert_eq!(ack["seq"], 1);
    assert_eq!(ack["client_msg_id"], "c-1");
    assert_eq!(ack["room"], "general");
    assert!(ack["ts"].as_i64().unwrap() > 1_700_000_000_000);
    let id = ack["id"].as_str().unwrap().to_owned();
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);

    for client in [&mut alice, &mut bob] {
        let message = client.messages(1).await.remove(0);
        assert_eq!(message["seq"], 1);
        assert_eq!(message["id"], id.as_str());
        assert_eq!(message["user"], "alice");
        assert_eq!(message["body"], "hello");
        assert_eq!(message["client_msg_id"], "c-1");
        assert_eq!(message["ts"], ack["ts"]);
        let trace = message["trace_id"].as_str().unwrap();
        assert!(
            trace.len() == 32 && trace.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{trace}"
        );
        assert_ne!(trace, "0".repeat(32));
    }
    let second = bob.say("general", "b-1", "hi alice").await;
    assert_eq!(second["seq"], 2);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn client_traceparent_joins_its_trace() {
    let server = server().await;
    let mut alice = Client::login(&server.ws_url, "alice").await;
    alice.join("t").await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    alice.send(json!({"type": "send", "room": "t", "client_msg_id": "c", "body": "x", "traceparent": parent})).await;
    let message = alice.messages(1).await.remove(0);
    assert_eq!(message["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn resend_with_same_client_msg_id_gets_same_ack_even_after_reconnect() {
    let server = server().await;
    let mut alice = Client::login(&server.ws_url, "alice").await;
    alice.join("r").await;
    let first = alice.say("r", "dup-1", "once").await;
    let again = alice.say("r", "dup-1", "once").await;
    assert_eq!(first["id"], again["id"]);
    assert_eq!(first["seq"], again["seq"]);
    drop(alice);

    let mut alice = Client::login(&server.ws_url, "alice").await;
    alice.join("r").await;
    let after_reconnect = alice.say("r", "dup-1", "once").await;
    assert_eq!(after_reconnect["id"], first["id"]);
    // A different user with the same client_msg_id is a different message.
    let mut bob = Client::login(&server.ws_url, "bob").await;
    bob.join("r").await;
    let bobs = bob.say("r", "dup-1", "mine").await;
    assert_ne!(bobs["id"], first["id"]);
    assert_eq!(bobs["seq"], 2);
    let (_, page) = get_json(&format!("{}/api/rooms/r/messages", server.http_url)).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 2, "{page}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn join_with_since_replays_then_goes_live_without_gap_or_duplicate() {
    let server = server().await;
    let mut writer = Client::login(&server.ws_url, "writer").await;
    writer.join("log").await;
    for i in 1..=30 {
        writer.say("log", &format!("m{i}"), &format!("body {i}")).await;
    }
    let mut reader = Client::login(&server.ws_url, "reader").await;
    reader.send(json!({"type": "join", "room": "log", "since": 12, "req": "j"})).await;
    let joined = reader.expect("joined").await;
    assert_eq!(joined["last_seq"], 30);
    assert_eq!(joined["req"], "j");
    // Live sends race with the replay.
    let sender = tokio::spawn(async move {
        for i in 31..=60 {
            writer.send(json!({"type": "send", "room": "log", "client_msg_id": format!("m{i}"), "body": "live"})).await;
        }
        for _ in 31..=60 {
            writer.expect("ack").await;
        }
        writer
    });
    let seqs: Vec<u64> = reader.messages(48).await.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (13..=60).collect::<Vec<_>>());
    sender.await.unwrap();
    // Nothing more arrives: ping is answered right after.
    reader.send(json!({"type": "ping", "req": 1})).await;
    assert_eq!(reader.expect("pong").await["req"], 1);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn since_beyond_the_end_gets_only_live_messages() {
    let server = server().await;
    let mut a = Client::login(&server.ws_url, "a").await;
    a.join("x").await;
    a.say("x", "1", "one").await;
    a.messages(1).await;
    let mut b = Client::login(&server.ws_url, "b").await;
    b.send(json!({"type": "join", "room": "x", "since": 99})).await;
    assert_eq!(b.expect("joined").await["last_seq"], 1);
    a.say("x", "2", "two").await;
    assert_eq!(b.messages(1).await[0]["seq"], 2);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn twenty_concurrent_senders_are_seen_in_one_gapless_order_by_every_member() {
    const SENDERS: usize = 20;
    const EACH: usize = 15;
    let server = server().await;
    let mut members = Vec::new();
    for i in 0..SENDERS {
        let mut client = Client::login(&server.ws_url, &format!("user{i}")).await;
        client.join("busy").await;
        members.push(client);
    }
    let total = SENDERS * EACH;
    let tasks: Vec<_> = members
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            tokio::spawn(async move {
                for n in 0..EACH {
                    client.send(json!({"type": "send", "room": "busy", "client_msg_id": format!("{i}-{n}"), "body": format!("{i}/{n}")})).await;
                }
                let mut order = Vec::with_capacity(total);
                let mut acks = 0;
                while order.len() < total || acks < EACH {
                    let frame = client.next().await;
                    match frame["type"].as_str() {
                        Some("message") => order.push((frame["seq"].as_u64().unwrap(), frame["id"].as_str().unwrap().to_owned())),
                        Some("ack") => acks += 1,
                        Some("presence") | Some("typing") => {}
                        _ => panic!("unexpected {frame}"),
                    }
                }
                order
            })
        })
        .collect();
    let mut orders = Vec::new();
    for task in tasks {
        orders.push(task.await.unwrap());
    }
    let first = &orders[0];
    let seqs: Vec<u64> = first.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, (1..=total as u64).collect::<Vec<_>>());
    assert_eq!(first.iter().map(|(_, id)| id).collect::<HashSet<_>>().len(), total);
    for order in &orders[1..] {
        assert_eq!(order, first);
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn leave_stops_delivery_and_send_needs_join() {
    let server = server().await;
    let mut a = Client::login(&server.ws_url, "a").await;
    let mut b = Client::login(&server.ws_url, "b").await;
    a.join("r").await;
    b.join("r").await;
    b.send(json!({"type": "leave", "room": "r", "req": 3})).await;
    let left = b.expect("left").await;
    assert_eq!((left["room"].as_str(), left["req"].as_i64()), (Some("r"), Some(3)));
    a.say("r", "1", "after b left").await;
    b.send(json!({"type": "send", "room": "r", "client_msg_id": "x", "body": "y"})).await;
    let error = b.expect("error").await;
    assert_eq!(error["code"], "not_joined");
    b.send(json!({"type": "leave", "room": "r", "req": 4})).await;
    let again = b.expect("left").await;
    assert_eq!((again["room"].as_str(), again["req"].as_i64()), (Some("r"), Some(4)), "leaving twice is answered left");
    b.send(json!({"type": "typing", "room": "r"})).await;
    assert_eq!(b.expect("error").await["code"], "not_joined");
    server.shutdown().await.unwrap();
}
