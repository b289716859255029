//! The writer thread: the only code that writes session files and the daemon's journal.
//!
//! Sessions queue records through a bounded channel, their strings masked already (see
//! [`Fields`]). The thread takes what is queued, chains and writes each session's records with
//! one `write` per file and batch, and calls `fdatasync` on the files it wrote at most
//! `recording.group_commit` later (group commit). A killed daemon loses nothing it handed to
//! `write`; a power loss can lose the records of the last group-commit window.
//!
//! A failed write is cut back to the last whole line, so files always end on a record. The
//! records that could not be written are counted, and the session's next successful write starts
//! with a `records.lost` record stating how many. Free space is checked every second. Below
//! `recording.min_free_mib`, or after a failed write, the store counts as failing: an `alert`
//! goes to the journal (retried until it fits) and `recording.fail_mode` applies.

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
    fs::{self, File},
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::Ordering,
        mpsc::{Receiver, RecvTimeoutError, SyncSender},
    },
    time::{Duration, Instant, SystemTime},
};

use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};
use tracing::{error, info, warn};

use super::{
    Fields, Health, hex,
    journal::{self, ChainHead, Journal, Writer as JournalWriter},
    retention,
    signing::SigningKey,
};
use crate::{config::RecordingConfig, operations::metrics::ErrorKind};

/// Commands queued before senders block. At a few hundred bytes each this bounds the queue's
/// memory to some tens of MiB; a full queue slows sessions down rather than dropping records.
const QUEUE_CAPACITY: usize = 65_536;
/// Commands taken from the queue per write batch.
const BATCH_LIMIT: usize = 8192;
/// Closed sessions kept open while their last records cannot be written, so they can still end
/// with a `records.lost` record and a checkpoint once space returns. Each keeps a file
/// descriptor.
const MAX_SESSIONS_WAITING_TO_CLOSE: usize = 1024;
/// Time the writer waits for more records before writing a batch: short next to the group
/// commit window, long enough to gather the records of a busy node into one write per file.
/// At 1 ms the writer woke a thousand times a second, which cost a busy session several
/// microseconds of CPU per statement on a two-core node (measured with pgbench).
const COALESCE_WINDOW: Duration = Duration::from_millis(10);
/// Interval of the free-space check.
const DISK_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Interval of the retention pass (compression and pruning).
const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

/// One record as a handler queued it.
#[derive(Debug)]
pub(super) struct Entry {
    event: Cow<'static, str>,
    time: SystemTime,
    fields: Fields,
    /// When the entry was queued, for the writer's lag.
    queued: Instant,
}

impl Entry {
    pub(super) fn new(
        event: impl Into<Cow<'static, str>>,
        time: SystemTime,
        fields: Fields,
    ) -> Self {
        Self {
            event: event.into(),
            time,
            fields,
            queued: Instant::now(),
        }
    }
}

#[derive(Debug)]
pub(super) enum Command {
    Open {
        id: Arc<str>,
        relative: String,
        base: Fields,
        entry: Entry,
    },
    Event {
        id: Arc<str>,
        entry: Entry,
    },
    Close {
        id: Arc<str>,
        entry: Entry,
    },
    Journal {
        entry: Entry,
    },
    Flush {
        done: std::sync::mpsc::Sender<WriterStats>,
    },
    Retention {
        now: SystemTime,
        done: std::sync::mpsc::Sender<Result<retention::Report, retention::RetentionError>>,
    },
    Shutdown,
}

/// Counters of the writer, returned by `Recorder::flush`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Records written to session files and the journal.
    pub records: u64,
    /// Records that could not be written.
    pub lost: u64,
    /// Sessions open now.
    pub open_sessions: usize,
    /// `fdatasync` calls on session files so far: at most one per file and group-commit window.
    pub session_syncs: u64,
}

#[derive(Debug)]
enum Pending {
    Record(Entry),
    Checkpoint,
}

#[derive(Debug)]
struct Session {
    id: Arc<str>,
    relative: String,
    path: PathBuf,
    file: Option<File>,
    len: u64,
    head: ChainHead,
    base: Fields,
    queue: Vec<Pending>,
    lost: u64,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    closing: bool,
}

struct Writer {
    store: PathBuf,
    config: RecordingConfig,
    key: SigningKey,
    health: Arc<Health>,
    sessions: HashMap<Arc<str>, Session>,
    /// Session files written since the last sync, one handle each, by session id. A handle
    /// outlives its session's close, so a closed session's last records are synced too.
    dirty: HashMap<Arc<str>, File>,
    journal: Journal,
    journal_queue: Vec<(Cow<'static, str>, Fields)>,
    journal_dirty: bool,
    journal_since_checkpoint: u64,
    journal_last_checkpoint: Instant,
    last_sync: Instant,
    last_disk_check: Instant,
    last_retention: Option<Instant>,
    /// The last failure to create or write a session file, until one is written again.
    write_error: Option<String>,
    /// The last failure to write the journal, until it is written again. Kept apart, so that
    /// journal writes that succeed do not hide session files that cannot be created.
    journal_error: Option<String>,
    /// When session file creation was last tried on its own while `write_error` is set.
    last_probe: Instant,
    /// Directory of the session file that failed last, where the probe tries.
    probe_dir: Option<PathBuf>,
    low_disk: Option<String>,
    stats: WriterStats,
    /// Queue time of the oldest entry taken since the last batch was written.
    oldest_taken: Option<Instant>,
}

/// Starts the writer thread after recovering sessions an earlier run left open.
pub(super) fn spawn(
    config: &RecordingConfig,
    node: String,
    key: SigningKey,
    health: Arc<Health>,
) -> std::io::Result<(SyncSender<Command>, std::thread::JoinHandle<()>)> {
    let store = config.dir.clone();
    let mut journal = Journal::open(&store, &node, JournalWriter::Daemon)?;
    let abandoned = recover_open_sessions(&journal)?;
    let mut start_records: Vec<(&str, Fields)> = abandoned
        .iter()
        .map(|fields| {
            let fields = Fields::from_map_verbatim(fields, Fields::journal());
            ("session.abandoned", fields)
        })
        .collect();
    start_records.push(("checkpoint", Fields::journal()));
    journal.append(&start_records, Some(&key))?;
    journal.sync()?;
    if !abandoned.is_empty() {
        warn!(
            sessions = abandoned.len(),
            "sessions left open by an earlier run are marked abandoned in the journal"
        );
    }

    let (sender, receiver) = std::sync::mpsc::sync_channel(QUEUE_CAPACITY);
    let mut writer = Writer {
        store,
        config: config.clone(),
        key,
        health,
        sessions: HashMap::new(),
        dirty: HashMap::new(),
        journal,
        journal_queue: Vec::new(),
        journal_dirty: false,
        journal_since_checkpoint: 0,
        journal_last_checkpoint: Instant::now(),
        last_sync: Instant::now(),
        last_disk_check: Instant::now() - DISK_CHECK_INTERVAL,
        last_retention: Some(Instant::now()),
        write_error: None,
        journal_error: None,
        last_probe: Instant::now(),
        probe_dir: None,
        low_disk: None,
        stats: WriterStats::default(),
        oldest_taken: None,
    };
    let thread = std::thread::Builder::new()
        .name("recorder".into())
        .spawn(move || {
            // The writer's batches are not urgent: they must not preempt the proxy's workers
            // in the middle of a request.
            if let Err(error) = crate::sys::batch_scheduling() {
                warn!(%error, "the recorder thread keeps the default scheduling policy");
            }
            writer.run(&receiver)
        })?;
    Ok((sender, thread))
}

impl Writer {
    fn run(&mut self, receiver: &Receiver<Command>) {
        let mut stopping = false;
        while !stopping {
            let mut flushes = Vec::new();
            match receiver.recv_timeout(self.next_wakeup()) {
                Ok(command) => stopping |= self.take(command, &mut flushes),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stopping = true,
            }
            // Gather more for COALESCE_WINDOW, so that a busy node pays one `write` per session
            // per batch instead of one per record. The writer sleeps through the window rather
            // than waiting on the queue: a sender then only queues its record, where a waiting
            // receiver would cost it a wake-up call and the node a thread switch per record.
            if !stopping && flushes.is_empty() && !self.sessions.is_empty() {
                std::thread::sleep(COALESCE_WINDOW);
            }
            for _ in 0..BATCH_LIMIT {
                if stopping {
                    break;
                }
                let Ok(command) = receiver.try_recv() else {
                    break;
                };
                stopping |= self.take(command, &mut flushes);
            }

            self.check_disk();
            self.probe_session_files();
            self.queue_due_checkpoints();
            // The journal's `session.opened` goes to disk before the session's file is
            // created, so a crash never leaves a file the journal does not know.
            self.write_journal();
            self.write_sessions();
            self.write_journal();
            if !flushes.is_empty()
                || stopping
                || self.last_sync.elapsed() >= self.config.group_commit
            {
                self.sync();
            }
            let lag = self
                .oldest_taken
                .take()
                .map_or(Duration::ZERO, |queued| queued.elapsed());
            self.health
                .lag_us
                .store(lag.as_micros() as u64, Ordering::Relaxed);
            self.run_retention();
            self.stats.open_sessions = self.sessions.len();
            for done in flushes {
                let _ = done.send(self.stats.clone());
            }
        }

        // Sessions still open at shutdown end in the journal as abandoned, like after a crash,
        // but with every record written.
        let open: Vec<Arc<str>> = self.sessions.keys().cloned().collect();
        for id in open {
            if let Some(session) = self.sessions.remove(&id) {
                let mut fields = Map::new();
                fields.insert("session".into(), json!(&*session.id));
                fields.insert("file".into(), json!(session.relative));
                fields.insert("records".into(), json!(session.head.next_seq));
                fields.insert("digest".into(), json!(hex(&session.head.prev)));
                fields.insert("torn_bytes".into(), json!(0));
                fields.insert("reason".into(), json!("daemon stopped"));
                self.queue_journal("session.abandoned", &fields);
            }
        }
        self.journal_queue
            .push(("checkpoint".into(), Fields::journal()));
        self.write_journal();
        self.sync();
        info!(
            records = self.stats.records,
            lost = self.stats.lost,
            "recorder stopped"
        );
    }

    fn next_wakeup(&self) -> Duration {
        let mut wakeup = DISK_CHECK_INTERVAL.saturating_sub(self.last_disk_check.elapsed());
        if !self.dirty.is_empty() || self.journal_dirty {
            wakeup = wakeup.min(
                self.config
                    .group_commit
                    .saturating_sub(self.last_sync.elapsed()),
            );
        }
        wakeup.max(Duration::from_millis(1))
    }

    /// Takes one command; returns true on shutdown.
    fn take(
        &mut self,
        command: Command,
        flushes: &mut Vec<std::sync::mpsc::Sender<WriterStats>>,
    ) -> bool {
        if !matches!(
            command,
            Command::Flush { .. } | Command::Retention { .. } | Command::Shutdown
        ) {
            self.health.queued.fetch_sub(1, Ordering::Relaxed);
        }
        let queued = match &command {
            Command::Open { entry, .. }
            | Command::Event { entry, .. }
            | Command::Close { entry, .. }
            | Command::Journal { entry } => Some(entry.queued),
            _ => None,
        };
        if let Some(queued) = queued {
            self.oldest_taken = Some(
                self.oldest_taken
                    .map_or(queued, |oldest| oldest.min(queued)),
            );
        }
        match command {
            Command::Open {
                id,
                relative,
                base,
                entry,
            } => {
                let path = self.store.join(&relative);
                let mut opened = Map::new();
                opened.insert("session".into(), json!(&*id));
                opened.insert("file".into(), json!(relative));
                self.queue_journal("session.opened", &opened);
                self.sessions.insert(
                    Arc::clone(&id),
                    Session {
                        id,
                        relative,
                        path,
                        file: None,
                        len: 0,
                        head: ChainHead::GENESIS,
                        base,
                        queue: vec![Pending::Record(entry)],
                        lost: 0,
                        since_checkpoint: 0,
                        last_checkpoint: Instant::now(),
                        closing: false,
                    },
                );
            }
            Command::Event { id, entry } => match self.sessions.get_mut(&id) {
                Some(session) => session.queue.push(Pending::Record(entry)),
                None => {
                    warn!(session = %id, event = %entry.event, "record for an unknown session dropped")
                }
            },
            Command::Close { id, entry } => match self.sessions.get_mut(&id) {
                Some(session) => {
                    session.queue.push(Pending::Record(entry));
                    session.queue.push(Pending::Checkpoint);
                    session.closing = true;
                }
                None => warn!(session = %id, "end of an unknown session dropped"),
            },
            Command::Journal { entry } => self.journal_queue.push((entry.event, entry.fields)),
            Command::Flush { done } => flushes.push(done),
            Command::Retention { now, done } => {
                // Earlier records first, so the pass knows of every session they closed.
                self.write_sessions();
                self.write_journal();
                let _ = done.send(self.retention_pass(now));
            }
            Command::Shutdown => return true,
        }
        false
    }

    fn create_session_file(&mut self, path: &std::path::Path) -> Option<File> {
        let result = path
            .parent()
            .map_or(Ok(()), super::create_store_dir)
            .and_then(|()| {
                super::store_file_options()
                    .create_new(true)
                    .append(true)
                    .open(path)
            });
        match result {
            Ok(file) => Some(file),
            Err(error) => {
                self.probe_dir = path.parent().map(Path::to_path_buf);
                self.write_failed(&format!("create {}: {error}", path.display()));
                None
            }
        }
    }

    fn queue_due_checkpoints(&mut self) {
        let interval = self.config.checkpoint_interval;
        for session in self.sessions.values_mut() {
            if session.since_checkpoint > 0
                && session.last_checkpoint.elapsed() >= interval
                && !session.closing
            {
                session.queue.push(Pending::Checkpoint);
                session.last_checkpoint = Instant::now();
            }
        }
        let queued = self
            .journal_queue
            .last()
            .is_some_and(|(event, _)| event == "checkpoint");
        if self.journal_since_checkpoint > 0
            && self.journal_last_checkpoint.elapsed() >= interval
            && !queued
        {
            self.journal_queue
                .push(("checkpoint".into(), Fields::journal()));
        }
    }

    fn write_sessions(&mut self) {
        let ids: Vec<Arc<str>> = self
            .sessions
            .iter()
            .filter(|(_, session)| !session.queue.is_empty())
            .map(|(id, _)| Arc::clone(id))
            .collect();
        let mut waiting = self
            .sessions
            .values()
            .filter(|session| session.closing)
            .count();
        for id in ids {
            let Some(mut session) = self.sessions.remove(&id) else {
                continue;
            };
            self.write_session(&mut session);
            if !session.closing {
                self.sessions.insert(id, session);
                continue;
            }
            // A closing session whose last records were lost waits for space, so that its
            // file still ends with `records.lost` and a checkpoint. Past a bound it is closed
            // as it is, and the journal records how many records it lost.
            if session.lost > 0 && waiting <= MAX_SESSIONS_WAITING_TO_CLOSE {
                session.queue.push(Pending::Checkpoint);
                self.sessions.insert(id, session);
                continue;
            }
            waiting -= 1;
            let mut closed = Map::new();
            closed.insert("session".into(), json!(&*session.id));
            closed.insert("file".into(), json!(session.relative));
            closed.insert("records".into(), json!(session.head.next_seq));
            closed.insert("digest".into(), json!(hex(&session.head.prev)));
            if session.lost > 0 {
                closed.insert("lost".into(), json!(session.lost));
            }
            self.queue_journal("session.closed", &closed);
        }
    }

    fn write_session(&mut self, session: &mut Session) {
        if session.file.is_none() {
            session.file = self.create_session_file(&session.path);
        }
        let queue = std::mem::take(&mut session.queue);
        let count = queue
            .iter()
            .filter(|pending| matches!(pending, Pending::Record(_)))
            .count() as u64;
        let Some(file) = &mut session.file else {
            session.lost += count;
            self.stats.lost += count;
            return;
        };

        let mut head = session.head;
        let mut since_checkpoint = session.since_checkpoint;
        let mut checkpointed = false;
        let mut written = 0;
        let mut bytes = Vec::with_capacity(queue.len() * 256);
        if session.lost > 0 {
            let mut fields = Map::new();
            fields.insert("count".into(), json!(session.lost));
            let reason = self
                .write_error
                .clone()
                .or_else(|| self.low_disk.clone())
                .unwrap_or_else(|| "the store was failing".into());
            fields.insert("reason".into(), json!(reason));
            let time = SystemTime::now();
            append_line(
                &mut head,
                &session.base,
                "records.lost",
                time,
                &Fields::from_map_verbatim(&fields, Fields::new()),
                &mut bytes,
            );
            written += 1;
        }
        for pending in queue {
            let checkpoint_now = match pending {
                Pending::Record(entry) => {
                    append_line(
                        &mut head,
                        &session.base,
                        &entry.event,
                        entry.time,
                        &entry.fields,
                        &mut bytes,
                    );
                    since_checkpoint += 1;
                    written += 1;
                    since_checkpoint >= self.config.checkpoint_records
                }
                Pending::Checkpoint => true,
            };
            if checkpoint_now {
                let time = SystemTime::now();
                let fields = journal::checkpoint_fields(&self.key, &session.id, head, time);
                append_line(
                    &mut head,
                    &session.base,
                    "checkpoint",
                    time,
                    &fields,
                    &mut bytes,
                );
                since_checkpoint = 0;
                checkpointed = true;
                written += 1;
            }
        }

        match file.write_all(&bytes) {
            Ok(()) => {
                session.len += bytes.len() as u64;
                session.head = head;
                session.since_checkpoint = since_checkpoint;
                if checkpointed {
                    session.last_checkpoint = Instant::now();
                }
                session.lost = 0;
                self.stats.records += written;
                if !self.dirty.contains_key(&session.id)
                    && let Ok(clone) = file.try_clone()
                {
                    self.dirty.insert(Arc::clone(&session.id), clone);
                }
                self.write_succeeded();
            }
            Err(error) => {
                // Keep the file ending on a whole record.
                let _ = file.set_len(session.len);
                session.lost += count;
                self.stats.lost += count;
                self.probe_dir = session.path.parent().map(Path::to_path_buf);
                let message = format!("write {}: {error}", session.path.display());
                self.write_failed(&message);
            }
        }
    }

    fn write_journal(&mut self) {
        if self.journal_queue.is_empty() {
            return;
        }
        let mut records: Vec<(&str, Fields)> = Vec::new();
        let mut since = self.journal_since_checkpoint;
        let mut checkpoint_written = false;
        for (event, fields) in &self.journal_queue {
            records.push((event, fields.clone()));
            if event == "checkpoint" {
                since = 0;
                checkpoint_written = true;
            } else {
                since += 1;
                if since >= self.config.checkpoint_records {
                    records.push(("checkpoint", Fields::journal()));
                    since = 0;
                    checkpoint_written = true;
                }
            }
        }
        match self.journal.append(&records, Some(&self.key)) {
            Ok(_) => {
                self.stats.records += records.len() as u64;
                self.journal_queue.clear();
                self.journal_dirty = true;
                self.journal_since_checkpoint = since;
                if checkpoint_written {
                    self.journal_last_checkpoint = Instant::now();
                }
                if self.journal_error.take().is_some() {
                    info!("journal writes succeed again");
                }
                self.update_health();
            }
            Err(error) => {
                let message = format!("write journal in {}: {error}", self.journal.dir().display());
                crate::operations::metrics::metrics().error(ErrorKind::RecordingWrite);
                if self.journal_error.replace(message.clone()).is_none() {
                    error!(error = message, fail_mode = ?self.config.fail_mode, "recording write failed");
                    self.raise_alert("recording_failed", &message);
                }
                self.update_health();
            }
        }
    }

    fn sync(&mut self) {
        for (_, file) in self.dirty.drain() {
            self.stats.session_syncs += 1;
            self.health.syncs.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = file.sync_data() {
                error!(%error, "fdatasync of a session file failed");
            }
        }
        if self.journal_dirty {
            self.health.syncs.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = self.journal.sync() {
                error!(%error, "fdatasync of the journal failed");
            }
            self.journal_dirty = false;
        }
        self.last_sync = Instant::now();
    }

    fn write_failed(&mut self, message: &str) {
        crate::operations::metrics::metrics().error(ErrorKind::RecordingWrite);
        let first = self.write_error.is_none();
        self.write_error = Some(message.to_string());
        if first {
            error!(error = message, fail_mode = ?self.config.fail_mode, "recording write failed");
            self.raise_alert("recording_failed", message);
        }
    }

    fn write_succeeded(&mut self) {
        if self.write_error.take().is_some() {
            info!("recording writes succeed again");
        }
        self.update_health();
    }

    /// Queues a journal record the writer itself makes.
    fn queue_journal(&mut self, event: &'static str, fields: &Map<String, Value>) {
        self.journal_queue.push((
            event.into(),
            Fields::from_map_verbatim(fields, Fields::journal()),
        ));
    }

    fn raise_alert(&mut self, kind: &str, detail: &str) {
        let mut fields = Map::new();
        fields.insert("kind".into(), json!(kind));
        fields.insert("detail".into(), json!(detail));
        fields.insert(
            "fail_mode".into(),
            json!(format!("{:?}", self.config.fail_mode).to_lowercase()),
        );
        self.queue_journal("alert", &fields);
        self.update_health();
    }

    fn update_health(&mut self) {
        let reason = self
            .write_error
            .clone()
            .or_else(|| self.journal_error.clone())
            .or_else(|| self.low_disk.clone());
        match reason {
            Some(reason) => {
                self.health.set_failing(reason);
            }
            None => {
                if self.health.set_healthy() {
                    info!("recording store is healthy again");
                    let mut fields = Map::new();
                    fields.insert("kind".into(), json!("recording_resumed"));
                    self.queue_journal("alert", &fields);
                }
            }
        }
    }

    /// Tries once a second, while session files fail, to create a file where the last one
    /// failed. The store is then healthy again once files can be created, even when no
    /// session is left to try, as with `fail_mode: closed`, which refuses new sessions.
    fn probe_session_files(&mut self) {
        if self.write_error.is_none() || self.last_probe.elapsed() < DISK_CHECK_INTERVAL {
            return;
        }
        self.last_probe = Instant::now();
        let Some(dir) = self.probe_dir.clone() else {
            return;
        };
        let probe = dir.join(".probe");
        let created = super::create_store_dir(&dir).and_then(|()| {
            super::store_file_options()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&probe)
        });
        if created.is_ok() {
            let _ = std::fs::remove_file(&probe);
            self.write_succeeded();
        }
    }

    fn check_disk(&mut self) {
        if self.last_disk_check.elapsed() < DISK_CHECK_INTERVAL {
            return;
        }
        self.last_disk_check = Instant::now();
        let minimum = self.config.min_free_mib.saturating_mul(1024 * 1024);
        match crate::sys::available_bytes(&self.store) {
            Ok(available) if available < minimum => {
                if self.low_disk.is_none() {
                    let message = format!(
                        "low disk space: {} MiB free in {}, recording.min_free_mib is {}",
                        available / (1024 * 1024),
                        self.store.display(),
                        self.config.min_free_mib
                    );
                    warn!(%message, "recording store is low on space");
                    self.low_disk = Some(message.clone());
                    self.raise_alert("disk_low", &message);
                }
            }
            Ok(_) => {
                if self.low_disk.take().is_some() {
                    self.update_health();
                }
            }
            Err(error) => warn!(%error, store = %self.store.display(), "free space check failed"),
        }
    }

    fn run_retention(&mut self) {
        if self
            .last_retention
            .is_some_and(|last| last.elapsed() < RETENTION_INTERVAL)
        {
            return;
        }
        self.last_retention = Some(Instant::now());
        if let Err(error) = self.retention_pass(SystemTime::now()) {
            error!(error = %crate::error_chain(&error), "retention pass failed");
        }
    }

    fn retention_pass(
        &mut self,
        now: SystemTime,
    ) -> Result<retention::Report, retention::RetentionError> {
        let open: HashSet<String> = self.sessions.keys().map(|id| id.to_string()).collect();
        let settings = retention::Settings::from_config(&self.config);
        let report = retention::run(&self.store, now, &settings, &open)?;
        if let Some(fields) = report.journal_record() {
            self.queue_journal("pruned", &fields);
            self.write_journal();
        }
        if report.compressed > 0 || report.sessions_pruned > 0 {
            info!(
                compressed = report.compressed,
                pruned = report.sessions_pruned,
                "retention pass done"
            );
        }
        Ok(report)
    }
}

/// Serializes one record after `head`, appends it to `bytes` and advances `head`.
fn append_line(
    head: &mut ChainHead,
    base: &Fields,
    event: &str,
    time: SystemTime,
    fields: &Fields,
    bytes: &mut Vec<u8>,
) {
    let line = journal::chained_line(*head, event, time, base, fields);
    *head = ChainHead {
        next_seq: head.next_seq + 1,
        prev: Sha256::digest(&line).into(),
    };
    bytes.extend_from_slice(&line);
}

/// Finds sessions the previous daemon run opened and never closed, and describes how their
/// files end, as `session.abandoned` fields.
fn recover_open_sessions(journal: &Journal) -> std::io::Result<Vec<Map<String, Value>>> {
    let segments = journal::segments(journal.dir())?;
    // Only the segments since the last daemon start can hold sessions still open.
    let mut open: Vec<(String, String)> = Vec::new();
    let mut ended: HashSet<String> = HashSet::new();
    for path in segments.iter().rev() {
        let bytes = fs::read(path)?;
        let (lines, _) = journal::split_lines(&bytes);
        let mut daemon_start = false;
        for line in lines.iter().rev() {
            let Ok(record) = serde_json::from_slice::<Value>(line) else {
                continue;
            };
            let session = record["session"].as_str().unwrap_or_default().to_string();
            match record["event"].as_str() {
                Some("session.closed" | "session.abandoned") => {
                    ended.insert(session);
                }
                Some("session.opened") if !ended.contains(&session) => {
                    open.push((
                        session,
                        record["file"].as_str().unwrap_or_default().to_string(),
                    ));
                }
                Some("journal.start") => {
                    daemon_start |=
                        record["writer"] == "gatewayd" && record["reason"] == "daemon_start";
                }
                _ => {}
            }
        }
        if daemon_start {
            break;
        }
    }

    let store = journal
        .dir()
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let mut abandoned = Vec::new();
    for (session, file) in open.into_iter().rev() {
        let mut fields = Map::new();
        fields.insert("session".into(), json!(session));
        fields.insert("file".into(), json!(file));
        match journal::read_end(&store.join(&file)) {
            Ok(end) => {
                fields.insert("records".into(), json!(end.lines));
                fields.insert("digest".into(), json!(hex(&end.head.prev)));
                fields.insert("torn_bytes".into(), json!(end.torn_bytes));
            }
            Err(error) => {
                fields.insert("records".into(), json!(0));
                fields.insert("missing".into(), json!(error.to_string()));
            }
        }
        fields.insert(
            "reason".into(),
            json!("the daemon stopped before the session ended"),
        );
        abandoned.push(fields);
    }
    Ok(abandoned)
}
