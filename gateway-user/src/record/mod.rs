//! Session recordings: a tamper-evident store on the node's disk.
//!
//! Layout under the store directory (`recording.dir`, by default `/var/lib/gateway`):
//! - `sessions/<UTC date>/<session id>.jsonl`: one file per proxied connection, one JSON record
//!   per line, compressed to `.jsonl.zst` some time after the session closed;
//! - `journal/<UTC start time>.jsonl`: the node journal (see [`journal`]);
//! - `signing.pub`: the public half of the checkpoint signing key.
//!
//! Every record carries `v` (schema version), `seq`, `prev` (hex SHA-256 of the previous line's
//! bytes, all zeros for the first), `time` (UTC) and `event`. Signed `checkpoint` records cover
//! the chain before them. The journal chains each session's opening and final digest, so a
//! deleted or cut file is noticed too. `docs/recording.md` describes every record.
//!
//! Handlers write through [`SessionRecord`], which only queues records: one writer thread owns
//! the files and commits in groups (see [`writer`]). Every string handlers pass in is masked
//! when its [`Fields`] are built, before it is queued.

mod fields;
pub mod journal;
pub mod read;
pub mod retention;
pub mod signing;
pub mod verify;
mod writer;

/// Mode of the files in a store: the owner (root, as gatewayd runs) writes, its group reads.
/// Recordings are audit logs, so other users of the node cannot read them.
pub const FILE_MODE: u32 = 0o640;
/// Mode of the directories in a store.
pub const DIR_MODE: u32 = 0o750;

/// Creates `dir` and its missing parents with [`DIR_MODE`].
pub(crate) fn create_store_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

/// Options that create a store file with [`FILE_MODE`].
pub(crate) fn store_file_options() -> std::fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    config::{FailMode, RecordingConfig},
    identity::Subject,
};

pub use fields::Fields;
pub use writer::WriterStats;

/// Version of the record schema, written into every record as `v`.
pub const SCHEMA_VERSION: u32 = 1;
/// Directory of the session files inside the store.
pub const SESSIONS_DIR: &str = "sessions";
/// File name of the checkpoint key's public half inside the store.
pub const PUBLIC_KEY_FILE: &str = "signing.pub";

/// Errors while recording.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("failed to open the recording store {path}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] signing::KeyError),
    #[error("recording is unavailable ({reason}) and recording.fail_mode is closed")]
    Unavailable { reason: String },
    #[error("retention pass failed")]
    Retention(#[source] Box<retention::RetentionError>),
    #[error("the recorder has stopped")]
    Stopped,
}

/// Writes session recordings into the store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Recorder {
    inner: Arc<Inner>,
}

/// Source of the current time; tests move it to exercise retention.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

struct Inner {
    clock: Clock,
    dir: PathBuf,
    node: String,
    fail_mode: FailMode,
    health: Arc<Health>,
    sender: std::sync::mpsc::SyncSender<writer::Command>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("dir", &self.dir)
            .field("node", &self.node)
            .field("fail_mode", &self.fail_mode)
            .finish_non_exhaustive()
    }
}

/// Whether the store accepts writes, shared between the writer and the sessions.
#[derive(Debug, Default)]
pub struct Health {
    failing: AtomicBool,
    reason: Mutex<String>,
    /// Records queued and not yet written.
    queued: AtomicU64,
    /// Microseconds the oldest record of the writer's latest batch waited in the queue, or 0
    /// when the latest wake-up found nothing to write.
    lag_us: AtomicU64,
    /// `fdatasync` calls on session files and the journal since the daemon started.
    syncs: AtomicU64,
    changed: tokio::sync::Notify,
}

impl Health {
    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    pub fn reason(&self) -> String {
        self.reason.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Records queued for the writer and not written yet.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Returns the number of `fdatasync` calls the writer has made on session files and the
    /// journal.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Time the oldest record of the writer's latest batch waited between being queued and
    /// being written. It shows how far the writer is behind, but only once it writes again: a
    /// writer stuck in a system call is seen in [`queued`](Self::queued) instead.
    pub fn lag(&self) -> Duration {
        Duration::from_micros(self.lag_us.load(Ordering::Relaxed))
    }

    /// Waits until the store starts failing.
    pub async fn wait_failing(&self) {
        loop {
            let changed = self.changed.notified();
            if self.is_failing() {
                return;
            }
            changed.await;
        }
    }

    fn set_failing(&self, reason: String) -> bool {
        if let Ok(mut current) = self.reason.lock() {
            *current = reason;
        }
        let was = self.failing.swap(true, Ordering::AcqRel);
        if !was {
            self.changed.notify_waiters();
        }
        !was
    }

    fn set_healthy(&self) -> bool {
        let was = self.failing.swap(false, Ordering::AcqRel);
        if was {
            self.changed.notify_waiters();
        }
        was
    }
}

/// Target of a session.
#[derive(Clone, Debug, Serialize)]
pub struct TargetInfo {
    /// Target id: the target's index in the configuration, as the `TARGETS` map holds it.
    pub id: u32,
    pub name: String,
    pub class: String,
    /// Original destination the client dialed.
    pub addr: SocketAddr,
}

/// Outcome of a session.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Both sides finished normally.
    Closed,
    /// Closed by the proxy after the idle timeout.
    IdleTimeout,
    /// The upstream connection could not be made.
    UpstreamFailed,
    /// A read or write failed mid-session.
    Error,
    /// Closed because the daemon was stopping and the drain deadline passed.
    Shutdown,
    /// Not proxied: over the connection limit.
    RejectedLimit,
    /// Not proxied: no original destination was found for the connection.
    RejectedUnknown,
    /// Ended because recording failed and `recording.fail_mode` is closed.
    RecordingFailed,
    /// Not proxied: the client asked for something the gateway does not proxy, named in the
    /// reason, which the client received too.
    RejectedUnsupported,
}

/// Byte counts and result of a finished session.
#[derive(Clone, Debug)]
pub struct SessionEnd {
    pub outcome: Outcome,
    /// Error text for failed outcomes.
    pub reason: Option<String>,
    pub bytes_from_client: u64,
    pub bytes_from_upstream: u64,
    pub duration: Duration,
}

/// An open session recording. Records are queued to the writer thread in call order.
#[derive(Debug)]
pub struct SessionRecord {
    pub id: String,
    path: PathBuf,
    id_shared: Arc<str>,
    recorder: Recorder,
    started: std::time::Instant,
}

impl Recorder {
    /// Opens the store described by `config` and starts its writer thread. The daemon calls this
    /// once; it also recovers sessions a previous run left open.
    pub fn open(config: &RecordingConfig, node: String) -> Result<Self, RecordError> {
        Self::open_with_clock(config, node, Arc::new(SystemTime::now))
    }

    /// Like [`open`](Self::open), with the time taken from `clock`.
    pub fn open_with_clock(
        config: &RecordingConfig,
        node: String,
        clock: Clock,
    ) -> Result<Self, RecordError> {
        let dir = config.dir.clone();
        create_store_dir(&dir.join(SESSIONS_DIR)).map_err(|source| RecordError::Open {
            path: dir.clone(),
            source,
        })?;
        let key = signing::SigningKey::load_or_generate(
            &config.signing_key_path(),
            &dir.join(PUBLIC_KEY_FILE),
        )?;
        let health = Arc::new(Health::default());
        let (sender, thread) = writer::spawn(config, node.clone(), key, Arc::clone(&health))
            .map_err(|source| RecordError::Open {
                path: dir.clone(),
                source,
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                clock,
                dir,
                node,
                fail_mode: config.fail_mode,
                health,
                sender,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.inner.health
    }

    pub fn fail_mode(&self) -> FailMode {
        self.inner.fail_mode
    }

    /// Returns whether the writer thread is still running.
    pub fn writer_running(&self) -> bool {
        self.inner
            .thread
            .lock()
            .ok()
            .is_some_and(|thread| thread.as_ref().is_some_and(|thread| !thread.is_finished()))
    }

    /// Opens a new session recording and queues its `session.start` record. With
    /// `recording.fail_mode: closed` a failing store refuses the session.
    pub fn start(
        &self,
        subject: &Subject,
        client: SocketAddr,
        target: &TargetInfo,
    ) -> Result<SessionRecord, RecordError> {
        self.check_available()?;
        let now = self.now();
        let id = uuid::Uuid::now_v7().to_string();
        let date = DateTime::<Utc>::from(now).format("%Y-%m-%d").to_string();
        let relative = format!("{SESSIONS_DIR}/{date}/{id}.jsonl");
        let id_shared: Arc<str> = Arc::from(id.as_str());

        let mut base = Fields::base();
        base.str_verbatim("session", &id)
            .str_verbatim("node", &self.inner.node)
            .str_verbatim("protocol", &target.class);
        let mut fields = Fields::new();
        fields
            .serialize("subject", subject)
            .value("origin", &json!({ "addr": client }))
            .serialize("target", target);
        self.send(writer::Command::Open {
            id: Arc::clone(&id_shared),
            relative: relative.clone(),
            base,
            entry: writer::Entry::new("session.start", now, fields),
        })?;
        Ok(SessionRecord {
            path: self.inner.dir.join(relative),
            id,
            id_shared,
            recorder: self.clone(),
            started: std::time::Instant::now(),
        })
    }

    /// Queues a record for the journal, e.g. an alert.
    pub fn journal_event(&self, event: &str, fields: Value) -> Result<(), RecordError> {
        self.send(writer::Command::Journal {
            entry: writer::Entry::new(
                event.to_string(),
                self.now(),
                Fields::journal_from_value(fields),
            ),
        })
    }

    /// Runs a retention pass (compression, pruning) as of `now` in the writer, which writes
    /// the `pruned` journal record. The writer also runs one every hour on its own.
    pub fn run_retention(&self, now: SystemTime) -> Result<retention::Report, RecordError> {
        let (done, wait) = std::sync::mpsc::channel();
        self.send(writer::Command::Retention { now, done })?;
        wait.recv()
            .map_err(|_| RecordError::Stopped)?
            .map_err(|error| RecordError::Retention(Box::new(error)))
    }

    fn now(&self) -> SystemTime {
        (self.inner.clock)()
    }

    /// Waits until everything queued so far is written and synced to disk.
    pub fn flush(&self) -> Result<WriterStats, RecordError> {
        let (done, wait) = std::sync::mpsc::channel();
        self.send(writer::Command::Flush { done })?;
        wait.recv().map_err(|_| RecordError::Stopped)
    }

    /// Writes everything queued, a final journal checkpoint, and stops the writer thread.
    pub fn shutdown(&self) {
        let _ = self.inner.sender.send(writer::Command::Shutdown);
        if let Some(thread) = self.inner.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
    }

    fn check_available(&self) -> Result<(), RecordError> {
        if self.inner.fail_mode == FailMode::Closed && self.inner.health.is_failing() {
            return Err(RecordError::Unavailable {
                reason: self.inner.health.reason(),
            });
        }
        Ok(())
    }

    fn send(&self, command: writer::Command) -> Result<(), RecordError> {
        self.inner.health.queued.fetch_add(1, Ordering::Relaxed);
        self.inner.sender.send(command).map_err(|_| {
            self.inner.health.queued.fetch_sub(1, Ordering::Relaxed);
            RecordError::Stopped
        })
    }
}

impl SessionRecord {
    /// Path the session file has until it is compressed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues one event of the session (a statement, a request) with its own fields, a JSON
    /// object or [`Fields`]; either way every string in them is masked. Fails only when the
    /// store is failing with `recording.fail_mode: closed` (the session should end) or the
    /// writer has stopped.
    pub fn event(
        &mut self,
        event: &'static str,
        fields: impl Into<Fields>,
    ) -> Result<(), RecordError> {
        self.recorder.check_available()?;
        self.recorder.send(writer::Command::Event {
            id: Arc::clone(&self.id_shared),
            entry: writer::Entry::new(event, self.recorder.now(), fields.into()),
        })
    }

    /// Milliseconds since the session started, for stream frame offsets.
    pub fn offset_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Queues the `session.end` record and a final checkpoint, and closes the recording.
    pub fn finish(self, end: &SessionEnd) -> Result<PathBuf, RecordError> {
        let fields = Fields::from_value(json!({
            "outcome": end.outcome,
            "reason": end.reason,
            "bytes": {
                "from_client": end.bytes_from_client,
                "from_upstream": end.bytes_from_upstream,
            },
            "duration_ms": end.duration.as_millis() as u64,
        }));
        self.recorder.send(writer::Command::Close {
            id: Arc::clone(&self.id_shared),
            entry: writer::Entry::new("session.end", self.recorder.now(), fields),
        })?;
        Ok(self.path)
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut text = Vec::with_capacity(bytes.len() * 2);
    push_hex(&mut text, bytes);
    String::from_utf8(text).expect("hex digits are ASCII")
}

/// Appends the lowercase hex of `bytes` to `out`.
pub(crate) fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        out.push(DIGITS[usize::from(byte >> 4)]);
        out.push(DIGITS[usize::from(byte & 0xf)]);
    }
}

/// Parses 64 hex digits.
pub fn unhex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (index, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(bytes)
}
