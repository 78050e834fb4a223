//! Per-hop timings of a run: after the run, the journeys (`GET /debug/messages/{id}`) of up to
//! `--journeys` stored messages (acked, or delivered after an `internal` answer), spread evenly
//! over the run, are read from the first gateway, and the time between each two consecutive hops
//! of each journey is kept as a sample of that hop pair (`store.append→fanout.publish`), for
//! `loadgen compare`.
//!
//! Hops are ordered by their `at_us` (each process's wall clock: pairs that cross machines
//! include their clock offset, which is the same in both runs of a comparison), `fault.*` marks
//! are left out (they annotate a hop, they are not one), and only the first hop of each name is
//! kept (a message fanned out by several gateways has one `gateway.fanout` per gateway).
//!
//! The journal is a bounded in-memory recorder on the server: long runs may have forgotten their
//! first messages (counted as `failed`). When the gateway has an admin token the requests need it
//! (`--admin-token`); without it the first answer is 401 and sampling stops there, with the
//! reason in `error`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::audit::fmt_id;
use crate::runner::Shared;

/// Requests in flight at once.
const CONCURRENCY: usize = 8;
/// Limit of one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Limit of the whole sampling.
const TOTAL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest journey read.
const MAX_BODY: usize = 1 << 20;

/// Durations between consecutive hops of sampled journeys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HopSamples {
    /// Journeys asked for.
    pub requested: u64,
    /// Journeys read.
    pub read: u64,
    /// Journeys asked for but not read (forgotten by the server's bounded journal, or an error).
    pub failed: u64,
    /// Why sampling stopped early or read nothing (e.g. the admin token is missing).
    pub error: Option<String>,
    /// One entry per hop pair, in path order (by where its first hop usually stands).
    pub pairs: Vec<HopPair>,
}

/// The durations of one hop pair.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HopPair {
    /// `from→to`, e.g. `store.append→fanout.publish`.
    pub hop: String,
    /// Microseconds from `from` to `to`, one per journey that had both in a row.
    pub us: Vec<u64>,
}

/// The durations between consecutive hops of one journey (the JSON of `/debug/messages/{id}`),
/// with the position of each pair's first hop in the journey.
pub fn hop_durations(journey: &serde_json::Value) -> Vec<(String, u64, usize)> {
    let mut hops: Vec<(&str, i64)> = journey["hops"]
        .as_array()
        .map(|hops| {
            hops.iter()
                .filter_map(|h| Some((h["hop"].as_str()?, h["at_us"].as_i64()?)))
                .filter(|(name, _)| !name.starts_with("fault."))
                .collect()
        })
        .unwrap_or_default();
    hops.sort_by_key(|&(_, at)| at);
    let mut seen = HashSet::new();
    hops.retain(|(name, _)| seen.insert(*name));
    hops.windows(2)
        .enumerate()
        .map(|(i, w)| (format!("{}→{}", w[0].0, w[1].0), (w[1].1 - w[0].1).max(0) as u64, i))
        .collect()
}

/// Groups journeys' hop durations into pairs, ordered by the mean position of each pair's
/// first hop (the usual path order).
pub fn group(journeys: &[Vec<(String, u64, usize)>]) -> Vec<HopPair> {
    let mut by: HashMap<&str, (Vec<u64>, usize)> = HashMap::new();
    for j in journeys {
        for (hop, us, pos) in j {
            let e = by.entry(hop.as_str()).or_default();
            e.0.push(*us);
            e.1 += pos;
        }
    }
    let mut pairs: Vec<(f64, HopPair)> = by
        .into_iter()
        .map(|(hop, (us, pos))| (pos as f64 / us.len() as f64, HopPair { hop: hop.to_string(), us }))
        .collect();
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.hop.cmp(&b.1.hop)));
    pairs.into_iter().map(|(_, p)| p).collect()
}

/// Up to `n` message ids spread evenly over the run's stored sends: acked, or seen delivered
/// after an answer that did not say (`internal` at the deadline: often the slowest, the ones a
/// trace is wanted for).
fn pick_ids(shared: &Shared, n: usize) -> Vec<String> {
    let records = &shared.records;
    let stored: Vec<[u8; 16]> = (0..records.len() as u32)
        .filter_map(|i| {
            let record = records.get(i)?;
            record.ack().map(|a| a.id).or_else(|| record.seen().map(|s| s.id))
        })
        .collect();
    if stored.is_empty() || n == 0 {
        return Vec::new();
    }
    let n = n.min(stored.len());
    (0..n).map(|k| fmt_id(&stored[k * stored.len() / n])).collect()
}

/// Reads up to `n` journeys of the run's messages from its first gateway and groups their hop
/// durations. Never fails: what went wrong is in `error` and `failed`.
pub async fn sample(shared: &Shared, n: usize, admin_token: Option<&str>) -> HopSamples {
    let ids = pick_ids(shared, n);
    let mut out = HopSamples { requested: ids.len() as u64, ..HopSamples::default() };
    let Some((target, addrs)) = shared.targets.first() else {
        out.error = Some("no gateway".into());
        return out;
    };
    if ids.is_empty() {
        return out;
    }
    let host = format!("{}:{}", target.host, target.port);
    let mut results = stream::iter(ids)
        .map(|id| {
            let (host, addrs) = (host.clone(), addrs.clone());
            async move { get_json(&addrs, &host, &format!("/debug/messages/{id}"), admin_token).await }
        })
        .buffer_unordered(CONCURRENCY);
    let mut journeys = Vec::new();
    let deadline = tokio::time::Instant::now() + TOTAL_TIMEOUT;
    loop {
        let next = match tokio::time::timeout_at(deadline, results.next()).await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(_) => {
                out.error = Some(format!("stopped after {} s", TOTAL_TIMEOUT.as_secs()));
                break;
            }
        };
        match next {
            Ok(journey) => {
                out.read += 1;
                journeys.push(hop_durations(&journey));
            }
            Err(Fetch::Refused(reason)) => {
                out.error = Some(reason);
                break;
            }
            Err(Fetch::Failed(reason)) => {
                out.failed += 1;
                if out.read == 0 && out.failed >= 3 {
                    out.error = Some(reason);
                    break;
                }
            }
        }
    }
    out.failed = out.requested - out.read;
    out.pairs = group(&journeys);
    out
}

/// Why a journey could not be read.
#[derive(Debug)]
enum Fetch {
    /// The gateway refuses: asking for more is pointless.
    Refused(String),
    /// This one failed (not found, timeout, bad answer).
    Failed(String),
}

/// `GET path` over HTTP/1.1 as JSON.
async fn get_json(
    addrs: &[SocketAddr],
    host: &str,
    path: &str,
    token: Option<&str>,
) -> Result<serde_json::Value, Fetch> {
    let (status, body) = match tokio::time::timeout(REQUEST_TIMEOUT, get(addrs, host, path, token)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(Fetch::Refused(format!("GET http://{host}{path}: {e}"))),
        Err(_) => return Err(Fetch::Failed(format!("GET http://{host}{path}: timed out"))),
    };
    match status {
        200 => serde_json::from_slice(&body).map_err(|e| Fetch::Failed(format!("journey: {e}"))),
        401 | 403 => Err(Fetch::Refused(format!(
            "GET http://{host}{path}: {status}; the gateway has an admin token: pass --admin-token"
        ))),
        404 => Err(Fetch::Failed("journey not found (forgotten by the server's journal?)".into())),
        _ => Err(Fetch::Failed(format!("GET http://{host}{path}: status {status}"))),
    }
}

/// A minimal HTTP/1.1 GET (one connection per request; `Content-Length`, chunked or
/// read-to-close bodies).
async fn get(addrs: &[SocketAddr], host: &str, path: &str, token: Option<&str>) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(addrs).await?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.take(MAX_BODY as u64 + 16 * 1024).read_to_end(&mut response).await?;
    parse_response(&response).ok_or_else(|| std::io::Error::other("malformed HTTP response"))
}

/// Status and body of a whole HTTP/1.1 response.
fn parse_response(response: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&response[..end]).ok()?;
    let body = &response[end + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase()))
        .collect();
    if headers.get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return Some((status, dechunk(body)?));
    }
    let body = match headers.get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        Some(n) => body.get(..n)?.to_vec(),
        None => body.to_vec(),
    };
    Some((status, body))
}

/// The payload of a chunked body.
fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn durations_between_consecutive_hops_without_fault_marks() {
        let j = json!({"hops": [
            {"process": "p", "hop": "gateway.receive", "at_us": 1_000},
            {"process": "p", "hop": "fanout.sequence", "at_us": 1_300},
            {"process": "p", "hop": "store.append", "at_us": 1_310},
            {"process": "p", "hop": "fault.injected", "at_us": 1_320, "detail": {"action": "delay"}},
            {"process": "p", "hop": "gateway.ack", "at_us": 3_600},
            {"process": "p", "hop": "fanout.publish", "at_us": 3_400},
            {"process": "q", "hop": "gateway.fanout", "at_us": 3_500},
            {"process": "r", "hop": "gateway.fanout", "at_us": 3_550},
        ]});
        let d = hop_durations(&j);
        let names: Vec<(&str, u64)> = d.iter().map(|(h, us, _)| (h.as_str(), *us)).collect();
        assert_eq!(
            names,
            [
                ("gateway.receive→fanout.sequence", 300),
                ("fanout.sequence→store.append", 10),
                ("store.append→fanout.publish", 2_090),
                ("fanout.publish→gateway.fanout", 100),
                ("gateway.fanout→gateway.ack", 100),
            ]
        );
        assert!(hop_durations(&json!({})).is_empty());
    }

    #[test]
    fn pairs_are_grouped_in_path_order() {
        let j1 = vec![("a→b".to_string(), 5, 0), ("b→c".to_string(), 7, 1)];
        let j2 = vec![("a→b".to_string(), 6, 0), ("b→d".to_string(), 1, 1), ("d→c".to_string(), 2, 2)];
        let pairs = group(&[j1, j2]);
        let names: Vec<&str> = pairs.iter().map(|p| p.hop.as_str()).collect();
        assert_eq!(names, ["a→b", "b→c", "b→d", "d→c"]);
        assert_eq!(pairs[0].us, [5, 6]);
    }

    #[test]
    fn http_responses_with_length_chunks_or_close() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}trailing";
        assert_eq!(parse_response(r), Some((200, b"{}".to_vec())));
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4;x=y\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(parse_response(r), Some((200, b"{\"a\":1}".to_vec())));
        let r = b"HTTP/1.0 401 Unauthorized\r\n\r\nno";
        assert_eq!(parse_response(r), Some((401, b"no".to_vec())));
        assert_eq!(parse_response(b"garbage"), None);
    }
}
