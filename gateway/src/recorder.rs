//! Recording what clients send and what they are sent (`--record DIR`, switched at run time by
//! `POST /admin/record`), to read a session back or follow it frame by frame (docs/debugging.md).
//!
//! One JSON object per line and frame: `at_us` (monotonic microseconds since the recorder
//! started), `conn` (the connection's number in this gateway), `dir` (`in` from the client,
//! `out` to it), `type` (the frame type, or `open`/`close` for the connection itself), `bytes`
//! (the frame's size) and, where the frame has them, `user`, `room`, `client_msg_id`, `id`,
//! `seq`, `since`, `code`. Presence and typing events, written to many connections as one
//! ready-made text, are recorded as `event` with their size only. Bodies are written only with `--record-bodies`; otherwise a send or
//! message carries `body_len` instead. Tokens are never written.
//!
//! Connections never wait on the disk: lines go through a bounded queue to one writer task,
//! and a line that finds the queue full is dropped and counted ([`RecordingStatus::dropped`]).
//! Files are `DIR/<gateway>-<unix ms at start>-<n>.jsonl`; a new one starts past
//! `max_file_bytes`, and the oldest are deleted while the directory holds more than
//! `max_total_bytes`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use protocol::frames::ClientFrame;
use protocol::{ChatMessage, ServerFrame};
use serde::Serialize;
use tokio::sync::mpsc;
use uuid::Uuid;

/// Where and how much to record.
#[derive(Debug, Clone)]
pub struct RecordConfig {
    /// The directory the files go to (created if missing).
    pub dir: PathBuf,
    /// Record from the start (else only once switched on through the admin API).
    pub enabled: bool,
    /// Write message bodies (else their length).
    pub bodies: bool,
    /// Size at which a file is closed and the next one started.
    pub max_file_bytes: u64,
    /// Total size of the directory's recordings beyond which the oldest are deleted.
    pub max_total_bytes: u64,
}

/// Lines waiting for the writer; beyond this they are dropped and counted.
const QUEUE: usize = 65_536;

/// One recorded frame.
#[derive(Debug, Serialize)]
struct Line {
    at_us: u64,
    conn: u64,
    dir: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_msg_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    since: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_len: Option<usize>,
}

impl Line {
    fn new(conn: u64, dir: &'static str, kind: &'static str, bytes: usize) -> Self {
        Line {
            at_us: 0,
            conn,
            dir,
            kind,
            bytes,
            user: None,
            room: None,
            client_msg_id: None,
            id: None,
            seq: None,
            since: None,
            code: None,
            body: None,
            body_len: None,
        }
    }

    fn room(mut self, room: &str) -> Self {
        self.room = Some(room.to_owned());
        self
    }
}

/// What `GET /admin/record` answers.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RecordingStatus {
    /// Whether frames are being recorded now.
    pub enabled: bool,
    /// The directory recorded to.
    pub dir: String,
    /// Whether bodies are written.
    pub bodies: bool,
    /// Lines written since the gateway started.
    pub written: u64,
    /// Lines dropped because the writer fell behind (the recording has gaps when not 0).
    pub dropped: u64,
}

/// The gateway's recorder: cheap to ask whether it is on, never blocking a connection.
pub struct Recorder {
    enabled: AtomicBool,
    bodies: bool,
    dir: PathBuf,
    started: Instant,
    queue: mpsc::Sender<Line>,
    written: Arc<AtomicU64>,
    dropped: AtomicU64,
}

/// Why recording could not start.
#[derive(Debug, thiserror::Error)]
#[error("recording to {dir}: {source}")]
pub struct RecordError {
    dir: String,
    source: std::io::Error,
}

impl Recorder {
    /// Starts the writer (a thread of its own, so the runtime never waits on the disk) for
    /// `gateway`'s recordings.
    pub fn start(config: RecordConfig, gateway: &str) -> Result<Arc<Self>, RecordError> {
        let error = |source| RecordError { dir: config.dir.display().to_string(), source };
        std::fs::create_dir_all(&config.dir).map_err(error)?;
        let (queue, lines) = mpsc::channel(QUEUE);
        let written = Arc::new(AtomicU64::new(0));
        let prefix = format!("{gateway}-{}", protocol::now_ms());
        let mut files = Files::new(config.dir.clone(), prefix, config.max_file_bytes, config.max_total_bytes);
        let file = files.open_next().map_err(error)?;
        let output = Output { files, file, size: 0, written: written.clone() };
        std::thread::Builder::new().name("recorder".into()).spawn(move || write_lines(lines, output)).map_err(error)?;
        Ok(Arc::new(Recorder {
            enabled: AtomicBool::new(config.enabled),
            bodies: config.bodies,
            dir: config.dir,
            started: Instant::now(),
            queue,
            written,
            dropped: AtomicU64::new(0),
        }))
    }

    /// Whether frames are recorded now.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Switches recording on or off.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
        tracing::info!(dir = %self.dir.display(), on, "recording switched");
    }

    /// Where the recording stands.
    pub fn status(&self) -> RecordingStatus {
        RecordingStatus {
            enabled: self.enabled(),
            dir: self.dir.display().to_string(),
            bodies: self.bodies,
            written: self.written.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }

    fn push(&self, mut line: Line) {
        line.at_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        if self.queue.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A connection opened (its session id in `id`).
    pub fn opened(&self, conn: u64, session: Uuid) {
        let mut line = Line::new(conn, "in", "open", 0);
        line.id = Some(session);
        self.push(line);
    }

    /// A connection ended, with the close code the server sent (none when the client left).
    pub fn closed(&self, conn: u64, code: Option<u16>) {
        let mut line = Line::new(conn, "out", "close", 0);
        line.code = code.map(|c| c.to_string());
        self.push(line);
    }

    /// A client frame that parsed.
    pub fn client_frame(&self, conn: u64, frame: &ClientFrame, bytes: usize) {
        let line = match frame {
            ClientFrame::Hello { user, .. } => {
                let mut line = Line::new(conn, "in", "hello", bytes);
                line.user = user.clone();
                line
            }
            ClientFrame::Join { room, since } => {
                let mut line = Line::new(conn, "in", "join", bytes).room(room);
                line.since = *since;
                line
            }
            ClientFrame::Leave { room } => Line::new(conn, "in", "leave", bytes).room(room),
            ClientFrame::Send { room, client_msg_id, body, .. } => {
                let mut line = Line::new(conn, "in", "send", bytes).room(room);
                line.client_msg_id = Some(client_msg_id.clone());
                self.body(&mut line, body);
                line
            }
            ClientFrame::History { room, .. } => Line::new(conn, "in", "history", bytes).room(room),
            ClientFrame::Typing { room } => Line::new(conn, "in", "typing", bytes).room(room),
            ClientFrame::Ping => Line::new(conn, "in", "ping", bytes),
        };
        self.push(line);
    }

    /// A client frame that did not parse (or was too large, or binary): its size only.
    pub fn invalid_client_frame(&self, conn: u64, bytes: usize) {
        self.push(Line::new(conn, "in", "invalid", bytes));
    }

    /// A message frame written to a connection.
    pub fn message(&self, conn: u64, message: &ChatMessage, bytes: usize) {
        let mut line = Line::new(conn, "out", "message", bytes).room(&message.room);
        line.user = Some(message.user.clone());
        line.client_msg_id = Some(message.client_msg_id.clone());
        line.id = Some(message.id);
        line.seq = Some(message.seq);
        self.body(&mut line, &message.body);
        self.push(line);
    }

    /// A room event fanned out to a connection as ready-made text (presence, typing): its size.
    pub fn event(&self, conn: u64, bytes: usize) {
        self.push(Line::new(conn, "out", "event", bytes));
    }

    /// Any other server frame written to a connection.
    pub fn server_frame(&self, conn: u64, frame: &ServerFrame, bytes: usize) {
        let line = match frame {
            ServerFrame::Welcome { user, session, .. } => {
                let mut line = Line::new(conn, "out", "welcome", bytes);
                line.user = Some(user.clone());
                line.id = Some(*session);
                line
            }
            ServerFrame::Joined { room, last_seq, .. } => {
                let mut line = Line::new(conn, "out", "joined", bytes).room(room);
                line.seq = Some(*last_seq);
                line
            }
            ServerFrame::Left { room, .. } => Line::new(conn, "out", "left", bytes).room(room),
            ServerFrame::Ack { room, client_msg_id, id, seq, .. } => {
                let mut line = Line::new(conn, "out", "ack", bytes).room(room);
                line.client_msg_id = Some(client_msg_id.clone());
                line.id = Some(*id);
                line.seq = Some(*seq);
                line
            }
            ServerFrame::Message(message) => return self.message(conn, message, bytes),
            ServerFrame::History { room, messages, .. } => {
                let mut line = Line::new(conn, "out", "history", bytes).room(room);
                line.seq = messages.last().map(|m| m.seq);
                line
            }
            ServerFrame::Presence { room, user, .. } => {
                let mut line = Line::new(conn, "out", "presence", bytes).room(room);
                line.user = Some(user.clone());
                line
            }
            ServerFrame::Typing { room, user } => {
                let mut line = Line::new(conn, "out", "typing", bytes).room(room);
                line.user = Some(user.clone());
                line
            }
            ServerFrame::Pong { .. } => Line::new(conn, "out", "pong", bytes),
            ServerFrame::Reconnect { .. } => Line::new(conn, "out", "reconnect", bytes),
            ServerFrame::Error { code, .. } => {
                let mut line = Line::new(conn, "out", "error", bytes);
                line.code = Some(code.as_str().to_owned());
                line
            }
        };
        self.push(line);
    }

    fn body(&self, line: &mut Line, body: &str) {
        if self.bodies {
            line.body = Some(body.to_owned());
        } else {
            line.body_len = Some(body.len());
        }
    }
}

/// The recording's files: the one being written and the rotation over the directory.
struct Files {
    dir: PathBuf,
    prefix: String,
    next: u64,
    max_file_bytes: u64,
    max_total_bytes: u64,
}

impl Files {
    fn new(dir: PathBuf, prefix: String, max_file_bytes: u64, max_total_bytes: u64) -> Self {
        Files { dir, prefix, next: 0, max_file_bytes: max_file_bytes.max(1), max_total_bytes }
    }

    /// Opens the next file, deleting the oldest recordings beyond the total cap first.
    fn open_next(&mut self) -> std::io::Result<std::io::BufWriter<std::fs::File>> {
        self.enforce_cap()?;
        let path = self.dir.join(format!("{}-{:06}.jsonl", self.prefix, self.next));
        self.next += 1;
        Ok(std::io::BufWriter::with_capacity(256 << 10, std::fs::File::create(path)?))
    }

    /// Deletes the oldest `.jsonl` files (by name: gateway, start time, number) while the
    /// directory holds more than the cap, leaving room for one more file.
    fn enforce_cap(&self) -> std::io::Result<()> {
        let mut files: Vec<(PathBuf, u64)> = std::fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .filter(|entry| entry.path().extension().is_some_and(|e| e == "jsonl"))
            .filter_map(|entry| Some((entry.path(), entry.metadata().ok()?.len())))
            .collect();
        files.sort_by_key(|(path, _)| sortable_name(path));
        let mut total: u64 = files.iter().map(|(_, len)| len).sum();
        for (path, len) in files {
            if total + self.max_file_bytes <= self.max_total_bytes {
                break;
            }
            std::fs::remove_file(&path)?;
            total -= len;
        }
        Ok(())
    }
}

/// Files of one recording sort by their number; recordings by their start time.
fn sortable_name(path: &Path) -> (String, String) {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // <gateway>-<start ms>-<n>.jsonl: start time and number are the last two dash fields.
    let mut fields = name.rsplitn(3, '-');
    let number = fields.next().unwrap_or_default().to_owned();
    let start = fields.next().unwrap_or_default().to_owned();
    (format!("{start:0>16}"), number)
}

/// The file being written and how much is in it.
struct Output {
    files: Files,
    file: std::io::BufWriter<std::fs::File>,
    size: u64,
    written: Arc<AtomicU64>,
}

impl Output {
    fn write(&mut self, line: &Line) -> std::io::Result<()> {
        let mut text = serde_json::to_vec(line).map_err(std::io::Error::other)?;
        text.push(b'\n');
        self.file.write_all(&text)?;
        self.size += text.len() as u64;
        self.written.fetch_add(1, Ordering::Relaxed);
        if self.size >= self.files.max_file_bytes {
            self.file.flush()?;
            self.file = self.files.open_next()?;
            self.size = 0;
        }
        Ok(())
    }
}

/// The writer: lines to files until every sender is gone, rotating by size, flushing after
/// every batch (so a recording is readable while it runs).
fn write_lines(mut lines: mpsc::Receiver<Line>, mut output: Output) {
    while let Some(first) = lines.blocking_recv() {
        let mut result = output.write(&first);
        while result.is_ok() {
            match lines.try_recv() {
                Ok(line) => result = output.write(&line),
                Err(_) => break,
            }
        }
        if let Err(e) = result.and_then(|()| output.file.flush()) {
            tracing::error!(dir = %output.files.dir.display(), error = %e, "recording stopped: cannot write");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, bodies: bool, max_file_bytes: u64, max_total_bytes: u64) -> RecordConfig {
        RecordConfig { dir: dir.to_owned(), enabled: true, bodies, max_file_bytes, max_total_bytes }
    }

    fn send(n: usize) -> ClientFrame {
        ClientFrame::Send {
            room: "r".into(),
            client_msg_id: format!("c{n}"),
            body: "secret words".into(),
            traceparent: None,
        }
    }

    async fn lines(dir: &Path, recorder: &Recorder, want: u64) -> Vec<serde_json::Value> {
        for _ in 0..200 {
            if recorder.status().written >= want {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        paths.sort_by_key(|p| sortable_name(p));
        paths
            .iter()
            .flat_map(|p| {
                std::fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_are_recorded_in_order_with_body_lengths_but_not_bodies_or_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = Recorder::start(config(dir.path(), false, 1 << 20, 1 << 30), "gw-1").unwrap();
        recorder.opened(7, Uuid::nil());
        recorder.client_frame(7, &ClientFrame::Hello { user: Some("alice".into()), token: Some("jwt".into()) }, 40);
        recorder.client_frame(7, &send(1), 80);
        let lines = lines(dir.path(), &recorder, 3).await;
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[1]["type"], "hello");
        assert_eq!(lines[1]["user"], "alice");
        assert_eq!(lines[2]["client_msg_id"], "c1");
        assert_eq!(lines[2]["body_len"], 12);
        let text = serde_json::to_string(&lines).unwrap();
        assert!(!text.contains("secret") && !text.contains("jwt"), "{text}");
        assert!(lines.windows(2).all(|w| w[0]["at_us"].as_u64() <= w[1]["at_us"].as_u64()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bodies_are_recorded_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = Recorder::start(config(dir.path(), true, 1 << 20, 1 << 30), "gw-1").unwrap();
        recorder.client_frame(1, &send(1), 80);
        let lines = lines(dir.path(), &recorder, 1).await;
        assert_eq!(lines[0]["body"], "secret words");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_rotate_by_size_and_the_oldest_go_past_the_total_cap() {
        let dir = tempfile::tempdir().unwrap();
        // About 130 bytes a line: 1 KiB files, at most 4 KiB in all.
        let recorder = Recorder::start(config(dir.path(), false, 1024, 4096), "gw-1").unwrap();
        for n in 0..200 {
            recorder.client_frame(1, &send(n), 80);
        }
        let lines = lines(dir.path(), &recorder, 200).await;
        let total: u64 = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        assert!(total <= 4096 + 1024, "{total} bytes kept");
        assert!(lines.len() < 200 && !lines.is_empty(), "{} lines kept", lines.len());
        // What is kept is the newest, in order.
        assert_eq!(lines.last().unwrap()["client_msg_id"], "c199");
        let numbers: Vec<u64> =
            lines.iter().map(|l| l["client_msg_id"].as_str().unwrap()[1..].parse().unwrap()).collect();
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn switched_off_it_reports_so() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = Recorder::start(config(dir.path(), false, 1024, 4096), "gw-1").unwrap();
        recorder.set_enabled(false);
        let status = recorder.status();
        assert!(!status.enabled && status.written == 0 && status.dropped == 0, "{status:?}");
    }
}
