//! `--replay DIR`: a gateway recording (`chat --record DIR`, docs/debugging.md) read back as a
//! membership [`Plan`] and a send schedule, so the ordinary runner, clients and audit re-drive
//! the recorded traffic against any deployment.
//!
//! One client per recorded connection that sent `hello`, with the recorded user name; it joins
//! every room its connection joined; every recorded `in` `send` becomes a [`PlannedSend`] at its
//! recorded instant (relative to the first send, divided by the speed), from that client to
//! that room, with the recorded body or, when bodies were not recorded, a generated one of the
//! recorded length. History reads, leaves, typing and the recorded connections' disconnects are
//! not replayed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::plan::Plan;
use crate::schedule::PlannedSend;

/// The body of one replayed send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordedBody {
    /// Recorded with `--record-bodies`: sent as it was.
    Text(String),
    /// Only its length was recorded: a generated body of this many bytes.
    Len(usize),
}

/// A recording read back: who, where, and every send in order.
#[derive(Debug, Clone, Default)]
pub struct Recording {
    /// The directory read.
    pub dir: PathBuf,
    /// User name of each client (one per recorded connection that sent `hello`).
    pub users: Vec<String>,
    /// Room names, in the order they were first joined.
    pub rooms: Vec<String>,
    /// For each client, the rooms its connection joined.
    pub client_rooms: Vec<Vec<u32>>,
    /// Every recorded send, in recorded order; `at_us` is from the first send, unscaled.
    pub sends: Vec<PlannedSend>,
    /// The body of each send, indexed like `sends`.
    pub bodies: Vec<RecordedBody>,
    /// `.jsonl` files read.
    pub files: usize,
    /// Recorded sends left out: from a connection without `hello`, or to a room the
    /// connection had not joined (the server refused those too).
    pub skipped_sends: u64,
    /// Half-written last lines left out: a gateway killed while writing leaves one at the end of
    /// its newest file.
    pub cut_lines: u64,
}

/// Why a recording cannot be replayed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The directory or a file in it could not be read.
    #[error("cannot read recording {path}: {source}; give the directory `chat --record DIR` wrote")]
    Read {
        /// The directory or file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is not a recorder line.
    #[error("{path} line {line}: not a recording line ({reason})")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Its line number, from 1.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// Nothing to replay.
    #[error("recording {dir} is empty: {what}")]
    Empty {
        /// The directory.
        dir: PathBuf,
        /// What was missing.
        what: String,
    },
}

/// One recorder line, only the fields a replay needs.
#[derive(serde::Deserialize)]
struct Line {
    at_us: u64,
    conn: u64,
    dir: String,
    #[serde(rename = "type")]
    kind: String,
    user: Option<String>,
    room: Option<String>,
    body: Option<String>,
    body_len: Option<usize>,
}

/// A recorded connection becoming a client.
struct Conn {
    client: u32,
    rooms: Vec<u32>,
}

impl Recording {
    /// Reads every `DIR/<gateway>-<start ms>-<n>.jsonl`. Connections are told apart by gateway
    /// and recorder start (the file name without `-<n>`) and `conn`; instants of different
    /// recorders are put on one clock through their start times.
    pub fn load(dir: &Path) -> Result<Self, ReplayError> {
        let read_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ReplayError::Read { path, source }
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(read_err(dir))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        files.sort_by_key(|p| (sortable(p), p.clone()));
        if files.is_empty() {
            return Err(ReplayError::Empty { dir: dir.into(), what: "no .jsonl files".into() });
        }
        let mut out = Recording { dir: dir.into(), files: files.len(), ..Recording::default() };
        let mut room_ids: HashMap<String, u32> = HashMap::new();
        let mut conns: HashMap<(String, u64), Conn> = HashMap::new();
        // (absolute µs, order read, client, room, body)
        let mut sends: Vec<(u64, usize, u32, u32, RecordedBody)> = Vec::new();
        for path in &files {
            let (source, start_ms) = sortable(path);
            let text = std::fs::read_to_string(path).map_err(read_err(path))?;
            let last = text.lines().count().saturating_sub(1);
            let ends_cut = !text.ends_with('\n');
            for (n, raw) in text.lines().enumerate() {
                if raw.trim().is_empty() {
                    continue;
                }
                let line: Line = match serde_json::from_str(raw) {
                    Ok(line) => line,
                    Err(_) if n == last && ends_cut => {
                        out.cut_lines += 1;
                        continue;
                    }
                    Err(e) => {
                        return Err(ReplayError::Parse { path: path.clone(), line: n + 1, reason: e.to_string() })
                    }
                };
                if line.dir != "in" {
                    continue;
                }
                let key = (source.clone(), line.conn);
                match line.kind.as_str() {
                    "hello" => {
                        let client = out.users.len() as u32;
                        out.users.push(line.user.unwrap_or_else(|| format!("replay-u{client}")));
                        conns.insert(key, Conn { client, rooms: Vec::new() });
                    }
                    "join" => {
                        let (Some(conn), Some(room)) = (conns.get_mut(&key), line.room) else { continue };
                        let next = room_ids.len() as u32;
                        let id = *room_ids.entry(room.clone()).or_insert_with(|| {
                            out.rooms.push(room);
                            next
                        });
                        if !conn.rooms.contains(&id) {
                            conn.rooms.push(id);
                        }
                    }
                    "send" => {
                        let conn = conns.get(&key);
                        let room = line.room.as_ref().and_then(|r| room_ids.get(r));
                        let (Some(conn), Some(&room)) = (conn, room) else {
                            out.skipped_sends += 1;
                            continue;
                        };
                        if !conn.rooms.contains(&room) {
                            out.skipped_sends += 1;
                            continue;
                        }
                        let body = match (line.body, line.body_len) {
                            (Some(text), _) => RecordedBody::Text(text),
                            (None, len) => RecordedBody::Len(len.unwrap_or(0)),
                        };
                        let at = start_ms.saturating_mul(1000).saturating_add(line.at_us);
                        sends.push((at, sends.len(), conn.client, room, body));
                    }
                    _ => {}
                }
            }
        }
        out.client_rooms = vec![Vec::new(); out.users.len()];
        for conn in conns.into_values() {
            out.client_rooms[conn.client as usize] = conn.rooms;
        }
        if sends.is_empty() {
            let what = format!(
                "{} connections said hello but no send to a joined room was recorded ({} files)",
                out.users.len(),
                out.files
            );
            return Err(ReplayError::Empty { dir: dir.into(), what });
        }
        sends.sort_by_key(|s| (s.0, s.1));
        let first = sends[0].0;
        for (at, _, client, room, body) in sends {
            out.sends.push(PlannedSend { at_us: at - first, client, room });
            out.bodies.push(body);
        }
        Ok(out)
    }

    /// The send schedule at `speed` times the recorded pace.
    pub fn schedule(&self, speed: f64) -> Vec<PlannedSend> {
        self.sends.iter().map(|s| PlannedSend { at_us: (s.at_us as f64 / speed).round() as u64, ..*s }).collect()
    }

    /// The membership plan: recorded users and rooms; `prefix` only names the sends.
    pub fn plan(&self, prefix: &str) -> Plan {
        Plan::explicit(prefix, self.users.clone(), self.rooms.clone(), self.client_rooms.clone())
    }

    /// The largest recorded body (generated bodies are sliced from a pool this large).
    pub fn max_body(&self) -> usize {
        self.bodies
            .iter()
            .map(|b| match b {
                RecordedBody::Text(t) => t.len(),
                RecordedBody::Len(n) => *n,
            })
            .max()
            .unwrap_or(0)
    }
}

/// `<gateway>-<start ms>-<n>.jsonl` → (`<gateway>-<start ms>`, start ms); files sort by
/// gateway, start, then number.
fn sortable(path: &Path) -> (String, u64) {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let source = stem.rsplit_once('-').map_or(stem.as_str(), |(s, _)| s).to_string();
    let start_ms = source.rsplit_once('-').and_then(|(_, ms)| ms.parse().ok()).unwrap_or(0);
    (source, start_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, lines: &[&str]) {
        std::fs::write(dir.join(name), lines.join("\n") + "\n").unwrap();
    }

    #[test]
    fn a_recording_becomes_plan_and_schedule() {
        let dir = std::env::temp_dir().join(format!("loadgen-replay-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        write(
            &dir,
            "gw-1000-000000.jsonl",
            &[
                r#"{"at_us":1,"conn":1,"dir":"in","type":"open","bytes":0}"#,
                r#"{"at_us":2,"conn":1,"dir":"in","type":"hello","user":"alice","bytes":30}"#,
                r#"{"at_us":3,"conn":1,"dir":"in","type":"join","room":"r1","bytes":30}"#,
                r#"{"at_us":4,"conn":1,"dir":"out","type":"joined","room":"r1","bytes":30}"#,
                r#"{"at_us":5,"conn":2,"dir":"in","type":"hello","user":"bob","bytes":30}"#,
                r#"{"at_us":6,"conn":2,"dir":"in","type":"join","room":"r2","bytes":30}"#,
                r#"{"at_us":7,"conn":2,"dir":"in","type":"join","room":"r1","bytes":30}"#,
                r#"{"at_us":1000,"conn":1,"dir":"in","type":"send","room":"r1","client_msg_id":"x.0","body_len":12,"bytes":80}"#,
                r#"{"at_us":1500,"conn":1,"dir":"in","type":"send","room":"r2","client_msg_id":"x.1","body_len":12,"bytes":80}"#,
                r#"{"at_us":2000,"conn":2,"dir":"in","type":"history","room":"r2","bytes":30}"#,
            ],
        );
        write(
            &dir,
            "gw-1000-000001.jsonl",
            &[
                r#"{"at_us":3000,"conn":2,"dir":"in","type":"send","room":"r2","client_msg_id":"y.0","body":"hi","bytes":80}"#,
            ],
        );
        let rec = Recording::load(&dir).unwrap();
        assert_eq!(rec.users, ["alice", "bob"]);
        assert_eq!(rec.rooms, ["r1", "r2"]);
        assert_eq!(rec.client_rooms, vec![vec![0], vec![1, 0]]);
        assert_eq!(rec.skipped_sends, 1, "alice never joined r2");
        assert_eq!(
            rec.schedule(2.0),
            vec![PlannedSend { at_us: 0, client: 0, room: 0 }, PlannedSend { at_us: 1000, client: 1, room: 1 }]
        );
        assert_eq!(rec.bodies, vec![RecordedBody::Len(12), RecordedBody::Text("hi".into())]);
        let plan = rec.plan("p");
        assert_eq!((plan.user(1), plan.room_index("r2")), ("bob".to_string(), Some(1)));
        assert_eq!(plan.room_index("p-r0"), None);

        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(Recording::load(&dir), Err(ReplayError::Read { .. })));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(Recording::load(&dir), Err(ReplayError::Empty { .. })));
        write(&dir, "gw-1-000000.jsonl", &[r#"{"at_us":1,"conn":1,"dir":"in","type":"hello","user":"a","bytes":1}"#]);
        assert!(matches!(Recording::load(&dir), Err(ReplayError::Empty { .. })));
        write(&dir, "gw-1-000000.jsonl", &["not json"]);
        assert!(matches!(Recording::load(&dir), Err(ReplayError::Parse { line: 1, .. })));
        // A gateway killed mid-line: the cut last line is left out, the rest replays.
        let whole = [
            r#"{"at_us":1,"conn":1,"dir":"in","type":"hello","user":"a","bytes":1}"#,
            r#"{"at_us":2,"conn":1,"dir":"in","type":"join","room":"r","bytes":1}"#,
            r#"{"at_us":3,"conn":1,"dir":"in","type":"send","room":"r","client_msg_id":"c","body_len":1,"bytes":1}"#,
        ]
        .join("\n");
        std::fs::write(dir.join("gw-1-000000.jsonl"), whole + "\n{\"at_us\":4,\"conn\":1,\"di").unwrap();
        let rec = Recording::load(&dir).unwrap();
        assert_eq!((rec.sends.len(), rec.cut_lines), (1, 1));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
