//! History paging over WebSocket and HTTP.

use serde_json::json;

use crate::support::*;

fn seqs(page: &serde_json::Value) -> Vec<u64> {
    page["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect()
}

#[tokio::test]
async fn history_pages_backwards_and_forwards() {
    let server = server().await;
    let mut a = Client::login(&server.ws_url, "a").await;
    a.join("h").await;
    for i in 1..=120 {
        a.send(json!({"type": "send", "room": "h", "client_msg_id": format!("{i}"), "body": format!("{i}")})).await;
    }
    let mut acked = 0;
    while acked < 120 {
        if a.next().await["type"] == "ack" {
            acked += 1;
        }
    }
    let mut b = Client::login(&server.ws_url, "b").await;
    b.send(json!({"type": "history", "room": "h", "req": "p1"})).await;
    let newest = b.expect("history").await;
    assert_eq!(newest["req"], "p1");
    assert_eq!(seqs(&newest), (71..=120).collect::<Vec<_>>());
    assert_eq!(newest["has_more"], true);
    let first = &newest["messages"][0];
    for field in ["room", "seq", "id", "user", "body", "ts", "client_msg_id", "trace_id"] {
        assert!(!first[field].is_null(), "history message lacks {field}");
    }
    assert!(first.get("type").is_none());

    b.send(json!({"type": "history", "room": "h", "before": 71, "limit": 50})).await;
    let older = b.expect("history").await;
    assert_eq!(seqs(&older), (21..=70).collect::<Vec<_>>());
    assert_eq!(older["has_more"], true);
    b.send(json!({"type": "history", "room": "h", "before": 21, "limit": 50})).await;
    let oldest = b.expect("history").await;
    assert_eq!(seqs(&oldest), (1..=20).collect::<Vec<_>>());
    assert_eq!(oldest["has_more"], false);

    b.send(json!({"type": "history", "room": "h", "after": 100, "limit": 10})).await;
    let forward = b.expect("history").await;
    assert_eq!(seqs(&forward), (101..=110).collect::<Vec<_>>());
    assert_eq!(forward["has_more"], true);
    b.send(json!({"type": "history", "room": "h", "after": 110, "limit": 200})).await;
    let tail = b.expect("history").await;
    assert_eq!(seqs(&tail), (111..=120).collect::<Vec<_>>());
    assert_eq!(tail["has_more"], false);

    // limit is capped at 200
    b.send(json!({"type": "history", "room": "h", "after": 0, "limit": 1000})).await;
    assert_eq!(seqs(&b.expect("history").await).len(), 120);

    b.send(json!({"type": "history", "room": "empty"})).await;
    let empty = b.expect("history").await;
    assert_eq!(seqs(&empty), Vec::<u64>::new());
    assert_eq!(empty["has_more"], false);

    let (status, page) = get_json(&format!("{}/api/rooms/h/messages?before=11&limit=5", server.http_url)).await;
    assert_eq!(status, 200);
    assert_eq!(page["room"], "h");
    assert_eq!(seqs(&page), vec![6, 7, 8, 9, 10]);
    assert_eq!(page["has_more"], true);
    let (status, page) = get_json(&format!("{}/api/rooms/h/messages?after=118", server.http_url)).await;
    assert_eq!((status, seqs(&page), page["has_more"].as_bool()), (200, vec![119, 120], Some(false)));
    let (status, body) = get_json(&format!("{}/api/rooms/bad.room/messages", server.http_url)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")));
    let (status, _) = get_json(&format!("{}/api/rooms/h/messages?limit=-3", server.http_url)).await;
    assert_eq!(status, 400);
    server.shutdown().await.unwrap();
}
