//! Bad input gets a clear error, keeps the connection open and changes nothing.

use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

async fn assert_error(client: &mut Client, code: &str) -> serde_json::Value {
    let error = client.expect("error").await;
    assert_eq!(error["code"], code, "{error}");
    assert!(!error["message"].as_str().unwrap_or_default().is_empty());
    error
}

#[tokio::test]
async fn frames_before_hello_are_unauthorized_and_connection_stays_open() {
    let server = server().await;
    let mut client = Client::connect(&server.ws_url).await;
    client.send(json!({"type": "join", "room": "r", "req": 1})).await;
    assert_eq!(assert_error(&mut client, "unauthorized").await["req"], 1);
    client.send(json!({"type": "ping"})).await;
    assert_error(&mut client, "unauthorized").await;
    client.send(json!({"type": "hello", "user": "late"})).await;
    assert_eq!(client.expect("welcome").await["user"], "late");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_frames_get_bad_request() {
    let server = server().await;
    let mut client = Client::login(&server.ws_url, "alice").await;
    client.join("r").await;
    client.send_raw(Message::text("{not json")).await;
    assert_error(&mut client, "bad_request").await;
    client.send_raw(Message::binary(vec![1u8, 2, 3])).await;
    assert_error(&mut client, "bad_request").await;
    client.send_raw(Message::text("[1,2]")).await;
    assert_error(&mut client, "bad_request").await;
    client.send(json!({"type": "fly", "req": "u"})).await;
    assert_eq!(assert_error(&mut client, "bad_request").await["req"], "u");
    client.send(json!({"room": "r"})).await;
    assert_error(&mut client, "bad_request").await;
    client.send(json!({"type": 7})).await;
    assert_error(&mut client, "bad_request").await;
    client.send(json!({"type": "send", "room": "r", "body": "no id", "req": 5})).await;
    assert_eq!(assert_error(&mut client, "bad_request").await["req"], 5);
    client.send(json!({"type": "send", "room": "r", "client_msg_id": 5, "body": "x"})).await;
    assert_error(&mut client, "bad_request").await;
    client.send(json!({"type": "join", "room": "r", "since": -1})).await;
    assert_error(&mut client, "bad_request").await;
    client.send(json!({"type": "hello", "user": "again"})).await;
    assert_error(&mut client, "bad_request").await;
    for room in ["", "a.b", "a b", "a*", "x>", &"r".repeat(65)] {
        client.send(json!({"type": "join", "room": room})).await;
        assert_error(&mut client, "bad_request").await;
    }
    client.send(json!({"type": "send", "room": "r", "client_msg_id": "", "body": "x"})).await;
    assert_error(&mut client, "bad_request").await;
    client.send(json!({"type": "send", "room": "r", "client_msg_id": "x".repeat(65), "body": "x"})).await;
    assert_error(&mut client, "bad_request").await;
    // The connection still works and nothing was stored.
    let ack = client.say("r", "ok", "fine").await;
    assert_eq!(ack["seq"], 1);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_user_names_are_refused() {
    let server = server().await;
    for user in ["", "has space", "é", &"u".repeat(65)] {
        let mut client = Client::connect(&server.ws_url).await;
        client.send(json!({"type": "hello", "user": user})).await;
        assert_error(&mut client, "bad_request").await;
    }
    let mut client = Client::connect(&server.ws_url).await;
    client.send(json!({"type": "hello"})).await;
    assert_error(&mut client, "bad_request").await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn oversize_frames_are_too_large_and_huge_ones_close_with_1009() {
    let server = server().await;
    let mut client = Client::login(&server.ws_url, "alice").await;
    client.join("r").await;
    let big = "x".repeat(70 * 1024);
    client.send(json!({"type": "send", "room": "r", "client_msg_id": "big", "body": big})).await;
    assert_error(&mut client, "too_large").await;
    let long_body = "y".repeat(5_000);
    client.send(json!({"type": "send", "room": "r", "client_msg_id": "long", "body": long_body})).await;
    assert_error(&mut client, "too_large").await;
    client.send(json!({"type": "ping", "req": 2})).await;
    assert_eq!(client.expect("pong").await["req"], 2);
    let huge = "z".repeat(1024 * 1024);
    client.send_raw(Message::text(huge)).await;
    assert_eq!(client.closed().await, 1009);
    // The server is unharmed.
    let mut other = Client::login(&server.ws_url, "bob").await;
    other.join("r").await;
    assert_eq!(other.say("r", "1", "still here").await["seq"], 1);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn empty_and_blank_bodies_get_bad_request_and_store_nothing() {
    let server = server().await;
    let mut client = Client::login(&server.ws_url, "alice").await;
    client.join("r").await;
    for (n, body) in ["", " ", " \t\n\r ", "\u{3000}"].into_iter().enumerate() {
        client
            .send(json!({"type": "send", "room": "r", "client_msg_id": format!("blank-{n}"), "body": body, "req": n}))
            .await;
        let error = assert_error(&mut client, "bad_request").await;
        assert_eq!(error["req"], n, "{error}");
        assert!(error["message"].as_str().unwrap().contains("body"), "{error}");
    }
    // Nothing was stored: the next message is the room's first, and history is just it.
    let ack = client.say("r", "ok", " text with spaces around ").await;
    assert_eq!(ack["seq"], 1);
    let history = whole_history(&server.http_url, "r").await;
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0]["body"], " text with spaces around ");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_text_frame_of_invalid_utf8_closes_with_1007() {
    let server = server().await;
    let mut client = Client::login(&server.ws_url, "alice").await;
    // tungstenite only builds text messages from valid UTF-8: the frame is written by hand.
    let invalid = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    client.send_raw(Message::Frame(invalid)).await;
    assert_eq!(client.closed().await, 1007);
    // The server is unharmed.
    let mut other = Client::login(&server.ws_url, "bob").await;
    other.join("r").await;
    assert_eq!(other.say("r", "1", "still here").await["seq"], 1);
    server.shutdown().await.unwrap();
}
