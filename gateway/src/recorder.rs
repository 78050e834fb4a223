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
//! Connections never wait on the disk: lines go through a bounded queue to one writer thread,
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

/// Batches of lines waiting for the writer; beyond this they are dropped and counted.
const QUEUE: usize = 4_096;

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

/// Lines of one connection, handed to the writer together.
struct Chunk {
    text: Vec<u8>,
    lines: u64,
}

/// The gateway's recorder: cheap to ask whether it is on, never blocking a connection.
pub struct Recorder {
    enabled: AtomicBool,
    bodies: bool,
    dir: PathBuf,
    started: Instant,
    /// `None` once the recorder is dropped: the writer then drains what is queued and stops.
    queue: Option<mpsc::Sender<Chunk>>,
    writer: Option<std::thread::JoinHandle<()>>,
    written: Arc<AtomicU64>,
    dropped: AtomicU64,
}

impl Drop for Recorder {
    /// Lets the writer write and flush every queued line before the process goes on (a graceful
    /// shutdown drops the recorder after the last connection closed).
    fn drop(&mut self) {
        self.queue = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
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
        let (queue, chunks) = mpsc::channel(QUEUE);
        let written = Arc::new(AtomicU64::new(0));
        let prefix = format!("{gateway}-{}", protocol::now_ms());
        let mut files = Files::new(config.dir.clone(), prefix, config.max_file_bytes, config.max_total_bytes);
        let file = files.open_next().map_err(error)?;
        let output = Output { files, file, size: 0, written: written.clone() };
        let writer = std::thread::Builder::new()
            .name("recorder".into())
            .spawn(move || write_chunks(chunks, output))
            .map_err(error)?;
        Ok(Arc::new(Recorder {
            enabled: AtomicBool::new(config.enabled),
            bodies: config.bodies,
            dir: config.dir,
            started: Instant::now(),
            queue: Some(queue),
            writer: Some(writer),
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

    fn submit(&self, chunk: Chunk) {
        let lines = chunk.lines;
        if self.queue.as_ref().is_none_or(|queue| queue.try_send(chunk).is_err()) {
            self.dropped.fetch_add(lines, Ordering::Relaxed);
        }
    }
}

/// One connection's lines since its last write batch: formatted in place (no allocation per
/// line) and handed to the writer in one piece by [`ConnectionRecording::flush`].
pub struct ConnectionRecording {
    recorder: Arc<Recorder>,
    conn: u64,
    text: Vec<u8>,
    lines: u64,
}

impl ConnectionRecording {
    /// The recording of connection `conn`.
    pub fn new(recorder: Arc<Recorder>, conn: u64) -> Self {
        ConnectionRecording { recorder, conn, text: Vec::new(), lines: 0 }
    }

    /// Starts a line, or `None` while recording is off.
    fn line(&mut self, dir: &'static str, kind: &'static str, bytes: usize) -> Option<Line<'_>> {
        if !self.recorder.enabled() {
            return None;
        }
        let at_us = u64::try_from(self.recorder.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.lines += 1;
        let mut line = Line { out: &mut self.text, bodies: self.recorder.bodies };
        line.raw(b"{\"at_us\":");
        line.number(at_us);
        line.raw(b",\"conn\":");
        line.number(self.conn);
        line.raw(b",\"dir\":\"");
        line.raw(dir.as_bytes());
        line.raw(b"\",\"type\":\"");
        line.raw(kind.as_bytes());
        line.raw(b"\",\"bytes\":");
        line.number(bytes as u64);
        Some(line)
    }

    /// The connection opened (its session id in `id`).
    pub fn opened(&mut self, session: Uuid) {
        if let Some(mut line) = self.line("in", "open", 0) {
            line.uuid("id", session);
            line.end();
        }
    }

    /// The connection ended, with the close code the server sent (none when the client left).
    /// Hands what is left to the writer.
    pub fn closed(&mut self, code: Option<u16>) {
        if let Some(mut line) = self.line("out", "close", 0) {
            if let Some(code) = code {
                line.number_field("code", u64::from(code));
            }
            line.end();
        }
        self.flush();
    }

    /// A client frame that parsed.
    pub fn client_frame(&mut self, frame: &ClientFrame, bytes: usize) {
        let kind = frame.kind();
        let Some(mut line) = self.line("in", kind, bytes) else { return };
        match frame {
            ClientFrame::Hello { user, .. } => {
                if let Some(user) = user {
                    line.string("user", user);
                }
            }
            ClientFrame::Join { room, since } => {
                line.string("room", room);
                if let Some(since) = since {
                    line.number_field("since", *since);
                }
            }
            ClientFrame::Send { room, client_msg_id, body, .. } => {
                line.string("room", room);
                line.string("client_msg_id", client_msg_id);
                line.body(body);
            }
            ClientFrame::Leave { room } | ClientFrame::History { room, .. } | ClientFrame::Typing { room } => {
                line.string("room", room)
            }
            ClientFrame::Ping => {}
        }
        line.end();
    }

    /// A client frame refused before it parsed (too large, binary, not JSON): its size only.
    pub fn invalid_client_frame(&mut self, bytes: usize) {
        if let Some(line) = self.line("in", "invalid", bytes) {
            line.end();
        }
    }

    /// A message frame written to the connection.
    pub fn message(&mut self, message: &ChatMessage, bytes: usize) {
        if let Some(mut line) = self.line("out", "message", bytes) {
            line.string("room", &message.room);
            line.uuid("id", message.id);
            line.number_field("seq", message.seq);
            line.body(&message.body);
            line.end();
        }
    }

    /// A room event written to many connections as ready-made text (presence, typing): its
    /// size only.
    pub fn event(&mut self, bytes: usize) {
        if let Some(line) = self.line("out", "event", bytes) {
            line.end();
        }
    }

    /// Any other server frame written to the connection.
    pub fn server_frame(&mut self, frame: &ServerFrame, bytes: usize) {
        if let ServerFrame::Message(message) = frame {
            return self.message(message, bytes);
        }
        let kind = match frame {
            ServerFrame::Welcome { .. } => "welcome",
            ServerFrame::Joined { .. } => "joined",
            ServerFrame::Left { .. } => "left",
            ServerFrame::Ack { .. } => "ack",
            ServerFrame::Message(_) => "message",
            ServerFrame::History { .. } => "history",
            ServerFrame::Presence { .. } => "presence",
            ServerFrame::Typing { .. } => "typing",
            ServerFrame::Pong { .. } => "pong",
            ServerFrame::Reconnect { .. } => "reconnect",
            ServerFrame::Error { .. } => "error",
        };
        let Some(mut line) = self.line("out", kind, bytes) else { return };
        match frame {
            ServerFrame::Welcome { user, session, .. } => {
                line.string("user", user);
                line.uuid("id", *session);
            }
            ServerFrame::Joined { room, last_seq, .. } => {
                line.string("room", room);
                line.number_field("seq", *last_seq);
            }
            ServerFrame::Ack { room, client_msg_id, id, seq, .. } => {
                line.string("room", room);
                line.string("client_msg_id", client_msg_id);
                line.uuid("id", *id);
                line.number_field("seq", *seq);
            }
            ServerFrame::History { room, messages, .. } => {
                line.string("room", room);
                if let Some(last) = messages.last() {
                    line.number_field("seq", last.seq);
                }
            }
            ServerFrame::Left { room, .. } | ServerFrame::Presence { room, .. } | ServerFrame::Typing { room, .. } => {
                line.string("room", room)
            }
            ServerFrame::Error { code, .. } => line.string("code", code.as_str()),
            ServerFrame::Message(_) | ServerFrame::Pong { .. } | ServerFrame::Reconnect { .. } => {}
        }
        line.end();
    }

    /// Hands the lines gathered since the last flush to the writer (the connection calls it
    /// after each batch of frames it writes).
    pub fn flush(&mut self) {
        if self.lines == 0 {
            return;
        }
        let capacity = self.text.capacity();
        let text = std::mem::replace(&mut self.text, Vec::with_capacity(capacity));
        self.recorder.submit(Chunk { text, lines: std::mem::take(&mut self.lines) });
    }
}

/// A JSON line being written into a connection's buffer.
struct Line<'a> {
    out: &'a mut Vec<u8>,
    bodies: bool,
}

impl Line<'_> {
    fn raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    fn number(&mut self, value: u64) {
        self.raw(itoa::Buffer::new().format(value).as_bytes());
    }

    fn key(&mut self, name: &str) {
        self.raw(b",\"");
        self.raw(name.as_bytes());
        self.raw(b"\":");
    }

    fn number_field(&mut self, name: &str, value: u64) {
        self.key(name);
        self.number(value);
    }

    fn uuid(&mut self, name: &str, value: Uuid) {
        self.key(name);
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        self.raw(b"\"");
        self.raw(value.hyphenated().encode_lower(&mut text).as_bytes());
        self.raw(b"\"");
    }

    /// A string field, escaped as JSON (client text can hold anything).
    fn string(&mut self, name: &str, value: &str) {
        self.key(name);
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *self.out, value);
    }

    fn body(&mut self, body: &str) {
        if self.bodies {
            self.string("body", body);
        } else {
            self.number_field("body_len", body.len() as u64);
        }
    }

    fn end(self) {
        self.out.extend_from_slice(b"}\n");
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
    fn write(&mut self, chunk: &Chunk) -> std::io::Result<()> {
        self.file.write_all(&chunk.text)?;
        self.size += chunk.text.len() as u64;
        self.written.fetch_add(chunk.lines, Ordering::Relaxed);
        // Chunks hold whole lines, so every file ends with a whole line.
        if self.size >= self.files.max_file_bytes {
            self.file.flush()?;
            self.file = self.files.open_next()?;
            self.size = 0;
        }
        Ok(())
    }
}

/// How often the writer looks for chunks when it found none. It polls instead of waiting on the
/// queue, so a connection handing over a chunk never has to wake a thread (a futex call per
/// chunk cost more than formatting the lines).
const WRITER_POLL: std::time::Duration = std::time::Duration::from_millis(10);
/// How long written lines may sit in the file's buffer before they are flushed.
const WRITER_FLUSH: std::time::Duration = std::time::Duration::from_millis(200);

/// The writer: chunks to files until every sender is gone, rotating by size, flushing at least
/// every [`WRITER_FLUSH`] (so a recording is readable while it runs).
fn write_chunks(mut chunks: mpsc::Receiver<Chunk>, mut output: Output) {
    let mut flushed = Instant::now();
    let mut dirty = false;
    loop {
        let result = match chunks.try_recv() {
            Ok(chunk) => {
                dirty = true;
                output.write(&chunk)
            }
            Err(mpsc::error::TryRecvError::Empty) => {
                let mut result = Ok(());
                if dirty && flushed.elapsed() >= WRITER_FLUSH {
                    result = output.file.flush();
                    (dirty, flushed) = (false, Instant::now());
                }
                std::thread::sleep(WRITER_POLL);
                result
            }
            Err(mpsc::error::TryRecvError::Disconnected) => {
                if let Err(e) = output.file.flush() {
                    tracing::error!(dir = %output.files.dir.display(), error = %e, "recording: last lines lost");
                }
                return;
            }
        };
        if let Err(e) = result {
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

    /// Every whole line in the directory (a file may go away under the rotation, and the last
    /// line of the newest may be half written while it is read).
    fn read(dir: &Path) -> Vec<serde_json::Value> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        paths.sort_by_key(|p| sortable_name(p));
        paths
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .flat_map(|text| text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect::<Vec<_>>())
            .collect()
    }

    /// The recorded lines once the last one is the send `last_client_msg_id` (the writer flushes within 200 ms).
    async fn lines(dir: &Path, last_client_msg_id: &str) -> Vec<serde_json::Value> {
        for _ in 0..500 {
            let lines = read(dir);
            if lines.last().is_some_and(|l| l["client_msg_id"] == last_client_msg_id) {
                return lines;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("{last_client_msg_id} not recorded after 5 s: {:?}", read(dir));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_are_recorded_in_order_with_body_lengths_but_not_bodies_or_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = Recorder::start(config(dir.path(), false, 1 << 20, 1 << 30), "gw-1").unwrap();
        let mut conn = ConnectionRecording::new(recorder.clone(), 7);
        conn.opened(Uuid::nil());
        conn.client_frame(&ClientFrame::Hello { user: Some("alice".into()), token: Some("jwt".into()) }, 40);
        conn.client_frame(&send(1), 80);
        conn.flush();
        let lines = lines(dir.path(), "c1").await;
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
        let mut conn = ConnectionRecording::new(recorder.clone(), 1);
        conn.client_frame(&send(1), 80);
        conn.flush();
        let lines = lines(dir.path(), "c1").await;
        assert_eq!(lines[0]["body"], "secret words");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_rotate_by_size_and_the_oldest_go_past_the_total_cap() {
        let dir = tempfile::tempdir().unwrap();
        // About 130 bytes a line: 1 KiB files, at most 4 KiB in all.
        let recorder = Recorder::start(config(dir.path(), false, 1024, 4096), "gw-1").unwrap();
        let mut conn = ConnectionRecording::new(recorder.clone(), 1);
        for n in 0..200 {
            conn.client_frame(&send(n), 80);
            conn.flush();
        }
        let lines = lines(dir.path(), "c199").await;
        let total: u64 = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        assert!(total <= 4096 + 1024, "{total} bytes kept");
        assert!(lines.len() < 200 && !lines.is_empty(), "{} lines kept", lines.len());
        // What is kept is the newest, in order.
        assert_eq!(lines.last().unwrap()["client_msg_id"], "c199");
        let numbers: Vec<u64> =
            lines.iter().map(|l| l["client_msg_id"].as_str().unwrap()[1..].parse().unwrap()).collect();
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    }

    #[test]
    fn dropping_the_recorder_writes_every_queued_line_before_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = Recorder::start(config(dir.path(), false, 1 << 20, 1 << 30), "gw-1").unwrap();
        let mut conn = ConnectionRecording::new(recorder.clone(), 1);
        for n in 0..100 {
            conn.client_frame(&send(n), 80);
        }
        conn.closed(None);
        drop(conn);
        drop(recorder);
        let lines = read(dir.path());
        assert_eq!(lines.len(), 101, "{lines:?}");
        assert_eq!(lines.last().unwrap()["type"], "close");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn switched_off_it_reports_so() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = Recorder::start(config(dir.path(), false, 1024, 4096), "gw-1").unwrap();
        recorder.set_enabled(false);
        let mut conn = ConnectionRecording::new(recorder.clone(), 1);
        conn.client_frame(&send(1), 80);
        conn.flush();
        let status = recorder.status();
        assert!(!status.enabled && status.written == 0 && status.dropped == 0, "{status:?}");
    }
}
