//! Verification of the store: hash chains, signed checkpoints, and the journal's account of
//! every session file.
//!
//! A *failure* means the store was changed after it was written: an edited, removed, added or
//! reordered record, a cut or deleted file, a journal that does not match, or a checkpoint that
//! the trusted key did not sign. A *note* is something a crash or a running daemon explains: a
//! torn last line, a session still open, records not covered by a checkpoint yet.

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use super::{
    SCHEMA_VERSION, hex,
    journal::{self, JOURNAL_SCOPE},
    read::{self, ReadError, SessionFile},
    signing::PublicKey,
};

/// One finding of `verify`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Finding {
    /// File relative to the store.
    pub file: String,
    /// Line number (1-based) the finding is about, when it is about one line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    pub message: String,
}

/// Result of a verification.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub failures: Vec<Finding>,
    pub notes: Vec<Finding>,
    pub sessions: u64,
    pub records: u64,
    pub bytes: u64,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    fn fail(&mut self, file: &str, line: Option<u64>, message: String) {
        self.failures.push(Finding {
            file: file.to_string(),
            line,
            message,
        });
    }

    fn note(&mut self, file: &str, line: Option<u64>, message: String) {
        self.notes.push(Finding {
            file: file.to_string(),
            line,
            message,
        });
    }
}

/// Fields of a record that verification reads. The rest of the line is skipped without being
/// built into a value, which keeps `verify` fast on large stores.
#[derive(Debug, serde::Deserialize)]
struct LineView<'a> {
    v: Option<u64>,
    seq: Option<u64>,
    #[serde(borrow)]
    prev: Option<Cow<'a, str>>,
    #[serde(borrow)]
    time: Option<Cow<'a, str>>,
    #[serde(borrow)]
    event: Option<Cow<'a, str>>,
    #[serde(borrow)]
    session: Option<Cow<'a, str>>,
    #[serde(borrow)]
    key_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    signature: Option<Cow<'a, str>>,
}

/// End state of a file's chain.
#[derive(Debug)]
struct ChainEnd {
    records: u64,
    digest: [u8; 32],
    torn_bytes: u64,
    last_event: String,
    verified_checkpoints: u64,
    /// Records after the last checkpoint, other than the unsigned `access` and
    /// `journal.start` records `gatewayctl` appends.
    unsigned: u64,
    /// Whether checking stopped at a broken record, so the counts cover only the records
    /// before it.
    broken: bool,
}

/// Checks the chain and checkpoints of one file's bytes. `scope` is the session id, or
/// `journal`; `first` is the chain head the file must continue from.
fn check_chain(
    report: &mut Report,
    file: &str,
    bytes: &[u8],
    scope: &str,
    first: journal::ChainHead,
    key: &PublicKey,
) -> ChainEnd {
    let (lines, torn) = journal::split_lines(bytes);
    let mut expected = first;
    let mut end = ChainEnd {
        records: 0,
        digest: first.prev,
        torn_bytes: torn.len() as u64,
        last_event: String::new(),
        verified_checkpoints: 0,
        unsigned: 0,
        broken: false,
    };
    for (index, line) in lines.iter().enumerate() {
        let number = Some(index as u64 + 1);
        let record: LineView<'_> = match serde_json::from_slice(line) {
            Ok(record) => record,
            Err(error) => {
                report.fail(
                    file,
                    number,
                    format!("record is not valid JSON ({error}): the file was edited"),
                );
                end.broken = true;
                return end;
            }
        };
        if record.v != Some(u64::from(SCHEMA_VERSION)) {
            report.fail(
                file,
                number,
                format!("unknown record version {:?}", record.v),
            );
        }
        if record.seq != Some(expected.next_seq) {
            let seq = record
                .seq
                .map_or_else(|| "missing".to_string(), |seq| seq.to_string());
            report.fail(
                file,
                number,
                format!(
                    "seq is {seq} where {} was expected: a record was removed, inserted or moved",
                    expected.next_seq
                ),
            );
            end.broken = true;
            return end;
        }
        if record.prev.as_deref().and_then(super::unhex) != Some(expected.prev) {
            report.fail(
                file,
                number,
                "prev does not match the hash of the record before it: that record was changed, or records were swapped or removed"
                    .into(),
            );
            end.broken = true;
            return end;
        }
        if scope != JOURNAL_SCOPE && record.session.as_deref() != Some(scope) {
            report.fail(
                file,
                number,
                format!(
                    "record names session {} instead of {scope}",
                    record.session.as_deref().unwrap_or("none")
                ),
            );
        }
        let event = record.event.as_deref().unwrap_or_default();
        if event == "checkpoint" {
            check_checkpoint(report, file, number, &record, scope, key, &mut end);
        }
        expected = journal::ChainHead {
            next_seq: expected.next_seq + 1,
            prev: Sha256::digest(line).into(),
        };
        end.records += 1;
        end.digest = expected.prev;
        match event {
            "checkpoint" => end.unsigned = 0,
            "access" | "journal.start" => {}
            _ => end.unsigned += 1,
        }
        end.last_event = event.to_string();
        report.records += 1;
    }
    report.bytes += bytes.len() as u64;
    end
}

fn check_checkpoint(
    report: &mut Report,
    file: &str,
    line: Option<u64>,
    record: &LineView<'_>,
    scope: &str,
    key: &PublicKey,
    end: &mut ChainEnd,
) {
    let key_id = record.key_id.as_deref().unwrap_or_default();
    if key_id != key.id() {
        report.fail(
            file,
            line,
            format!(
                "checkpoint is signed by key {key_id}, not by the trusted key {}",
                key.id()
            ),
        );
        return;
    }
    let message = journal::checkpoint_message(
        scope,
        record.seq.unwrap_or_default(),
        record.prev.as_deref().unwrap_or_default(),
        record.time.as_deref().unwrap_or_default(),
    );
    if key.verify(&message, record.signature.as_deref().unwrap_or_default()) {
        end.verified_checkpoints += 1;
    } else {
        report.fail(
            file,
            line,
            "checkpoint signature is invalid: the checkpoint or the records before it were changed"
                .into(),
        );
    }
}

/// Journal account of one session.
#[derive(Debug, Default)]
struct JournalSession {
    file: String,
    /// `(records, digest, torn_bytes)` from `session.closed` or `session.abandoned`.
    end: Option<(u64, String, u64)>,
    abandoned: bool,
    /// Records the writer could not write (disk full with `fail_mode: open`).
    lost: u64,
}

/// Journal account of the store.
#[derive(Debug, Default)]
struct JournalView {
    sessions: HashMap<String, JournalSession>,
    /// Session directories (dates) and journal segments removed by retention.
    pruned_days: HashSet<String>,
    pruned_segments: HashSet<String>,
}

/// Checks the journal's segments and collects its account of the sessions.
fn check_journal(
    report: &mut Report,
    store: &Path,
    key: &PublicKey,
) -> Result<JournalView, ReadError> {
    let journal_dir = store.join(journal::JOURNAL_DIR);
    let segments = journal::segments(&journal_dir).map_err(|source| ReadError::Io {
        path: journal_dir.clone(),
        source,
    })?;
    let mut view = JournalView::default();
    if segments.is_empty() {
        report.fail(
            journal::JOURNAL_DIR,
            None,
            "the journal has no segments".into(),
        );
        return Ok(view);
    }

    // Pruning records first: they explain a missing first segment and missing session days.
    let mut contents = Vec::new();
    for path in &segments {
        let bytes = read::read_bytes(path)?;
        for record in read::parse_records(&bytes) {
            if record["event"] == "pruned" {
                collect_strings(&record["days"], &mut view.pruned_days);
                collect_strings(&record["segments"], &mut view.pruned_segments);
            }
        }
        contents.push(bytes);
    }

    let mut previous: Option<(String, ChainEnd)> = None;
    for (path, bytes) in segments.iter().zip(&contents) {
        let name = journal::file_name(path);
        let file = format!("{}/{name}", journal::JOURNAL_DIR);
        let records = read::parse_records(bytes);
        let Some(start) = records
            .first()
            .filter(|record| record["event"] == "journal.start")
        else {
            report.fail(
                &file,
                Some(1),
                "segment does not begin with journal.start".into(),
            );
            continue;
        };
        let declared = &start["previous"];
        let head = match &previous {
            Some((previous_name, end)) => {
                if declared["segment"].as_str() != Some(previous_name.as_str()) {
                    report.fail(
                        &file,
                        Some(1),
                        format!(
                            "segment continues {} but the segment before it is {previous_name}: a journal segment was deleted",
                            declared["segment"]
                        ),
                    );
                }
                if declared["torn_bytes"].as_u64() != Some(end.torn_bytes) {
                    report.fail(
                        &file,
                        Some(1),
                        format!(
                            "segment says {previous_name} ended with {} torn bytes, it ends with {}",
                            declared["torn_bytes"], end.torn_bytes
                        ),
                    );
                }
                journal::ChainHead {
                    next_seq: start["seq"].as_u64().unwrap_or_default(),
                    prev: end.digest,
                }
            }
            None => {
                let continues_pruned = declared["segment"]
                    .as_str()
                    .is_some_and(|segment| view.pruned_segments.contains(segment));
                if declared.is_null() {
                    journal::ChainHead::GENESIS
                } else if continues_pruned {
                    // The chain before this segment was pruned; start from what it declares.
                    journal::ChainHead {
                        next_seq: start["seq"].as_u64().unwrap_or_default(),
                        prev: super::unhex(declared["digest"].as_str().unwrap_or_default())
                            .unwrap_or_default(),
                    }
                } else {
                    report.fail(
                        &file,
                        Some(1),
                        format!(
                            "the oldest segment continues {} which is neither present nor recorded as pruned: journal segments were deleted",
                            declared["segment"]
                        ),
                    );
                    journal::ChainHead {
                        next_seq: start["seq"].as_u64().unwrap_or_default(),
                        prev: super::unhex(start["prev"].as_str().unwrap_or_default())
                            .unwrap_or_default(),
                    }
                }
            }
        };
        let end = check_chain(report, &file, bytes, JOURNAL_SCOPE, head, key);
        if let Some((previous_name, previous_end)) = &previous
            && previous_end.torn_bytes > 0
        {
            report.note(
                &format!("{}/{previous_name}", journal::JOURNAL_DIR),
                Some(previous_end.records + 1),
                format!(
                    "ends with {} bytes of an unfinished record: its writer stopped mid-write (the next segment accounts for them)",
                    previous_end.torn_bytes
                ),
            );
        }
        collect_sessions(&records, &mut view);
        previous = Some((name, end));
    }

    if let Some((name, end)) = &previous {
        let file = format!("{}/{name}", journal::JOURNAL_DIR);
        if end.torn_bytes > 0 {
            report.note(
                &file,
                Some(end.records + 1),
                format!(
                    "ends with {} bytes of an unfinished record: its writer stopped mid-write",
                    end.torn_bytes
                ),
            );
        }
        if end.unsigned > 0 {
            report.note(
                &file,
                None,
                format!(
                    "the newest {} journal records are not covered by a checkpoint yet",
                    end.unsigned
                ),
            );
        }
    }
    Ok(view)
}

fn collect_strings(value: &Value, into: &mut HashSet<String>) {
    if let Some(items) = value.as_array() {
        into.extend(
            items
                .iter()
                .filter_map(|item| item.as_str().map(String::from)),
        );
    }
}

fn collect_sessions(records: &[Value], view: &mut JournalView) {
    for record in records {
        let Some(id) = record["session"].as_str() else {
            continue;
        };
        let entry = view.sessions.entry(id.to_string()).or_default();
        match record["event"].as_str() {
            Some("session.opened") => {
                entry.file = record["file"].as_str().unwrap_or_default().to_string();
            }
            Some(event @ ("session.closed" | "session.abandoned")) => {
                entry.file = record["file"].as_str().unwrap_or_default().to_string();
                entry.end = Some((
                    record["records"].as_u64().unwrap_or_default(),
                    record["digest"].as_str().unwrap_or_default().to_string(),
                    record["torn_bytes"].as_u64().unwrap_or_default(),
                ));
                entry.abandoned = event == "session.abandoned";
                entry.lost = record["lost"].as_u64().unwrap_or_default();
            }
            _ => {}
        }
    }
}

/// Checks one session file against its own chain and the journal's account of it.
fn check_session(
    report: &mut Report,
    session: &SessionFile,
    journal: &JournalView,
    key: &PublicKey,
) -> Result<(), ReadError> {
    let file = &session.relative;
    let bytes = match read::read_bytes(&session.path) {
        Ok(bytes) => bytes,
        Err(error) => {
            // One unreadable file is a finding about that file, and the others are still
            // checked.
            report.sessions += 1;
            report.fail(file, None, format!("cannot be read: {error}"));
            return Ok(());
        }
    };
    let end = check_chain(
        report,
        file,
        &bytes,
        &session.id,
        journal::ChainHead::GENESIS,
        key,
    );
    report.sessions += 1;

    let Some(account) = journal.sessions.get(&session.id) else {
        report.fail(
            file,
            None,
            "session is not in the journal: the file was added, or journal records were removed"
                .into(),
        );
        return Ok(());
    };
    match &account.end {
        None => {
            report.note(
                file,
                None,
                "session is still open (the journal has no end for it yet)".into(),
            );
            if end.torn_bytes > 0 {
                report.note(
                    file,
                    Some(end.records + 1),
                    format!(
                        "ends with {} bytes of a record being written",
                        end.torn_bytes
                    ),
                );
            }
        }
        // A broken chain is already reported, and its counts stop at the break.
        Some(_) if end.broken => {}
        Some((records, digest, torn_bytes)) => {
            if end.records < *records {
                report.fail(
                    file,
                    None,
                    format!(
                        "file has {} records, the journal recorded {records}: the file was cut",
                        end.records
                    ),
                );
            } else if end.records > *records {
                report.fail(
                    file,
                    Some(records + 1),
                    format!("file has {} records, the journal recorded {records}: records were appended", end.records),
                );
            } else if hex(&end.digest) != *digest {
                report.fail(
                    file,
                    Some(end.records),
                    "last record does not match the digest in the journal".into(),
                );
            }
            if end.torn_bytes != *torn_bytes {
                report.fail(
                    file,
                    Some(end.records + 1),
                    if *torn_bytes == 0 {
                        format!(
                            "file ends with {} bytes after its last complete record, where the journal recorded none: the file was cut or written to",
                            end.torn_bytes
                        )
                    } else {
                        format!(
                            "file ends with {} bytes after its last complete record, where the journal recorded {torn_bytes}",
                            end.torn_bytes
                        )
                    },
                );
            } else if end.torn_bytes > 0 {
                report.note(
                    file,
                    Some(end.records + 1),
                    format!("ends with {torn_bytes} bytes of an unfinished record: the daemon stopped mid-write"),
                );
            }
            if account.lost > 0 {
                report.note(
                    file,
                    None,
                    format!(
                        "{} records were lost while the store could not be written",
                        account.lost
                    ),
                );
            }
            if account.abandoned {
                report.note(
                    file,
                    None,
                    "session was abandoned: the daemon stopped before it ended".into(),
                );
            } else if account.lost > 0 && end.last_event != "checkpoint" {
                // The records that would have ended the file are among the lost ones.
            } else if end.last_event != "checkpoint" && end.records == *records {
                report.fail(
                    file,
                    (end.records > 0).then_some(end.records),
                    "closed session does not end with a signed checkpoint".into(),
                );
            }
        }
    }
    Ok(())
}

/// Verifies the store: every session (or the one given), and the journal.
pub fn verify_store(
    store: &Path,
    only: Option<&SessionFile>,
    key: &PublicKey,
    mut progress: impl FnMut(u64, u64),
) -> Result<Report, ReadError> {
    let mut report = Report::default();
    let journal = check_journal(&mut report, store, key)?;
    let sessions = match only {
        Some(session) => vec![session.clone()],
        None => read::session_files(store, None, None)?,
    };
    let total = sessions.len() as u64;
    let present: HashSet<String> = sessions.iter().map(|session| session.id.clone()).collect();

    // Session files are independent: check them on every core, in contiguous chunks, and
    // merge the findings in file order.
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(sessions.len().max(1));
    let chunk = sessions.len().div_ceil(threads).max(1);
    let done = AtomicU64::new(0);
    let partial: Vec<Result<Report, ReadError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = sessions
            .chunks(chunk)
            .map(|files| {
                let (journal, done) = (&journal, &done);
                scope.spawn(move || {
                    let mut part = Report::default();
                    for session in files {
                        check_session(&mut part, session, journal, key)?;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(part)
                })
            })
            .collect();
        while !workers.iter().all(|worker| worker.is_finished()) {
            progress(done.load(Ordering::Relaxed), total);
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        workers
            .into_iter()
            .map(|worker| worker.join().expect("verify worker panicked"))
            .collect()
    });
    for part in partial {
        let part = part?;
        report.failures.extend(part.failures);
        report.notes.extend(part.notes);
        report.sessions += part.sessions;
        report.records += part.records;
        report.bytes += part.bytes;
    }
    progress(total, total);

    if only.is_none() {
        let mut missing: Vec<(&String, &JournalSession)> = journal
            .sessions
            .iter()
            .filter(|(id, _)| !present.contains(*id))
            .collect();
        missing.sort_by(|a, b| a.0.cmp(b.0));
        for (id, account) in missing {
            let day = account.file.split('/').nth(1).unwrap_or_default();
            if journal.pruned_days.contains(day) {
                continue;
            }
            // The journal's own chain states that nothing was written to the file.
            let never_written = account
                .end
                .as_ref()
                .is_some_and(|(records, _, _)| *records == 0);
            if never_written && account.abandoned {
                report.note(
                    &account.file,
                    None,
                    format!("session {id} was abandoned before its file was written"),
                );
                continue;
            }
            // Its records were lost (the file could not be created), so nothing was deleted.
            if never_written && account.lost > 0 {
                report.note(
                    &account.file,
                    None,
                    format!(
                        "session {id} has no file: its {} records were lost while the store could not be written",
                        account.lost
                    ),
                );
                continue;
            }
            report.fail(
                &account.file,
                None,
                format!(
                    "session {id} is in the journal but its file is missing: the file was deleted"
                ),
            );
        }
    }
    Ok(report)
}
