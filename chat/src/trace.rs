//! `chat trace <id>`: a message's journey through every process, as a terminal timeline.

use anyhow::Context;
use serde_json::Value;

/// Fetches `/debug/messages/{id}` from `base_url` (with the admin token as a bearer token when
/// given: a gateway with client auth on asks for it) and prints it.
pub async fn print(base_url: &str, id: &str, admin_token: Option<&str>) -> anyhow::Result<()> {
    let url = format!("{}/debug/messages/{id}", base_url.trim_end_matches('/'));
    let mut request = reqwest::Client::new().get(&url);
    if let Some(token) = admin_token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.with_context(|| format!("GET {url}"))?;
    let status = response.status();
    let body: Value = response.json().await.with_context(|| format!("reading {url}"))?;
    if !status.is_success() {
        anyhow::bail!("{url}: {status}: {}", body["error"]["message"].as_str().unwrap_or("no details"));
    }
    print!("{}", render(&body));
    Ok(())
}

/// The timeline text of a journey document.
pub fn render(journey: &Value) -> String {
    let mut out = format!(
        "message {}\n  trace_id {}\n  room {}  seq {}  stored {}\n\n",
        journey["id"].as_str().unwrap_or("?"),
        journey["trace_id"].as_str().unwrap_or("?"),
        journey["room"].as_str().unwrap_or("?"),
        journey["seq"].as_u64().map_or("?".to_owned(), |s| s.to_string()),
        journey["stored"].as_bool().unwrap_or(false),
    );
    let hops = journey["hops"].as_array().cloned().unwrap_or_default();
    let start = hops.first().and_then(|h| h["at_us"].as_i64()).unwrap_or(0);
    let width = hops.iter().filter_map(|h| h["process"].as_str()).map(str::len).max().unwrap_or(7);
    for hop in &hops {
        let offset_ms = (hop["at_us"].as_i64().unwrap_or(start) - start) as f64 / 1000.0;
        let detail = match &hop["detail"] {
            Value::Object(map) if !map.is_empty() => {
                map.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
            }
            _ => String::new(),
        };
        let marker = if hop["hop"]
            .as_str()
            .is_some_and(|h| h.starts_with("fault") || h.starts_with("chain.") || h.contains("unrepaired"))
        {
            "!!"
        } else {
            "  "
        };
        out.push_str(&format!(
            "{marker}{offset_ms:>10.3} ms  {:<width$}  {:<24} {detail}\n",
            hop["process"].as_str().unwrap_or("?"),
            hop["hop"].as_str().unwrap_or("?"),
        ));
    }
    if hops.is_empty() {
        out.push_str("  (no hops remembered: the journey recorders are bounded; the message may be older)\n");
    }
    out
}
