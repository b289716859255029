//! The node journal: a hash chain over session openings and closings, checkpoints, alerts,
//! pruning and reads of the store.
//!
//! The journal is a series of segment files under `<store>/journal/`, named by their UTC start
//! time so that names sort in write order. A segment's first record, `journal.start`, continues
//! the chain of the segment before it and states how many bytes of a torn last line that segment
//! ended with. A crash mid-write is then distinguished from tampering. The daemon starts a segment
//! when it starts and at each UTC midnight; `gatewayctl` appends to the newest segment when its
//! end is clean. Every writer appends under an exclusive lock on `journal/.lock`.

use std::{
    fs::{self, File, OpenOptions},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
    time::SystemTime,
};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};

use super::{Fields, SCHEMA_VERSION, hex, push_hex, signing::SigningKey};

/// Name of the journal directory inside the store.
pub const JOURNAL_DIR: &str = "journal";
const LOCK_FILE: &str = ".lock";
/// Scope named in the signed message of journal checkpoints; sessions use their id.
pub const JOURNAL_SCOPE: &str = "journal";
/// Bytes read from a segment's end to find its last line; a longer last line is read whole.
const TAIL_WINDOW: u64 = 256 * 1024;

/// The end of a chain: the next record's `seq` and `prev`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainHead {
    pub next_seq: u64,
    pub prev: [u8; 32],
}

impl ChainHead {
    pub const GENESIS: Self = Self {
        next_seq: 0,
        prev: [0; 32],
    };
}

/// End state of a file: the chain head after its last complete line, and the bytes after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEnd {
    pub head: ChainHead,
    /// Complete lines in the file.
    pub lines: u64,
    /// Bytes after the last newline: a line the writer did not finish.
    pub torn_bytes: u64,
}

/// Splits `bytes` into complete lines (each with its newline) and the torn rest.
pub fn split_lines(bytes: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut lines = Vec::new();
    let mut start = 0;
    for (index, byte) in bytes.iter().enumerate() {
        if *byte == b'\n' {
            lines.push(&bytes[start..=index]);
            start = index + 1;
        }
    }
    (lines, &bytes[start..])
}

/// Serializes one chained record: the chain fields, then `base`, then `fields`. Returns the
/// line with its newline.
///
/// Both field sets arrive as JSON text, masked, so a line costs one buffer and no key sorting.
/// The writer's throughput depends on this.
pub fn chained_line(
    head: ChainHead,
    event: &str,
    time: SystemTime,
    base: &Fields,
    fields: &Fields,
) -> Vec<u8> {
    use std::io::Write as _;

    let mut line =
        Vec::with_capacity(160 + event.len() + base.as_bytes().len() + fields.as_bytes().len());
    let _ = write!(
        line,
        "{{\"v\":{SCHEMA_VERSION},\"seq\":{},\"prev\":\"",
        head.next_seq
    );
    push_hex(&mut line, &head.prev);
    let _ = write!(line, "\",\"time\":\"{}\",\"event\":", format_time(time));
    serde_json::to_writer(&mut line, event).expect("a string serializes");
    line.extend_from_slice(base.as_bytes());
    line.extend_from_slice(fields.as_bytes());
    line.extend_from_slice(b"}\n");
    line
}

/// Formats a time as RFC 3339 UTC with microseconds, the form every record uses.
pub fn format_time(time: SystemTime) -> String {
    DateTime::<Utc>::from(time).to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Builds the bytes a checkpoint signature covers. `prev` is the hash of the line before the
/// checkpoint, so the signature covers every earlier line of the chain.
pub fn checkpoint_message(scope: &str, seq: u64, prev: &str, time: &str) -> Vec<u8> {
    format!("gateway-checkpoint/1\n{scope}\n{seq}\n{prev}\n{time}\n").into_bytes()
}

/// Builds the fields of a checkpoint record that follows `head`.
pub fn checkpoint_fields(
    key: &SigningKey,
    scope: &str,
    head: ChainHead,
    time: SystemTime,
) -> Fields {
    let message = checkpoint_message(scope, head.next_seq, &hex(&head.prev), &format_time(time));
    let mut fields = Fields::journal();
    fields
        .str_verbatim("key_id", &key.public().id())
        .str_verbatim("signature", &key.sign(&message));
    fields
}

/// Reads how the file at `path` ends.
pub fn read_end(path: &Path) -> std::io::Result<FileEnd> {
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut start = size.saturating_sub(TAIL_WINDOW);
    loop {
        file.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail)?;
        let last_newline = tail.iter().rposition(|byte| *byte == b'\n');
        let before_last =
            last_newline.and_then(|end| tail[..end].iter().rposition(|b| *b == b'\n'));
        // The window must hold the whole last line: a newline before it, or the file's start.
        if start > 0 && before_last.is_none() {
            start = start.saturating_sub(TAIL_WINDOW * 4);
            continue;
        }
        let Some(end) = last_newline else {
            return Ok(FileEnd {
                head: ChainHead::GENESIS,
                lines: 0,
                torn_bytes: tail.len() as u64,
            });
        };
        let line_start = before_last.map_or(0, |index| index + 1);
        let line = &tail[line_start..=end];
        let seq = serde_json::from_slice::<Value>(line)
            .ok()
            .and_then(|value| value["seq"].as_u64())
            .unwrap_or(0);
        return Ok(FileEnd {
            head: ChainHead {
                next_seq: seq + 1,
                prev: Sha256::digest(line).into(),
            },
            lines: seq + 1,
            torn_bytes: (tail.len() - end - 1) as u64,
        });
    }
}

/// Program appending to the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    Daemon,
    Cli,
}

impl Writer {
    fn as_str(self) -> &'static str {
        match self {
            Self::Daemon => "gatewayd",
            Self::Cli => "gatewayctl",
        }
    }
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    file: File,
    len: u64,
    head: ChainHead,
    /// UTC date the segment was started on.
    date: String,
}

/// Appends records to the journal.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    node: String,
    writer: Writer,
    lock: File,
    segment: Option<Segment>,
    /// Reason the next segment starts, written into its `journal.start`.
    next_reason: &'static str,
}

impl Journal {
    /// Opens the journal under `store` for appending; creates the directory when missing.
    pub fn open(store: &Path, node: &str, writer: Writer) -> std::io::Result<Self> {
        let dir = store.join(JOURNAL_DIR);
        super::create_store_dir(&dir)?;
        let lock = super::store_file_options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))?;
        Ok(Self {
            dir,
            node: node.to_string(),
            writer,
            lock,
            segment: None,
            next_reason: match writer {
                Writer::Daemon => "daemon_start",
                Writer::Cli => "cli",
            },
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends records, each `(event, fields)`, in one write, and returns the chain head after
    /// them. Takes the journal lock for the call.
    pub fn append(
        &mut self,
        records: &[(&str, Fields)],
        key: Option<&SigningKey>,
    ) -> std::io::Result<ChainHead> {
        self.lock.lock()?;
        let result = self.append_locked(records, key);
        let _ = self.lock.unlock();
        result
    }

    fn append_locked(
        &mut self,
        records: &[(&str, Fields)],
        key: Option<&SigningKey>,
    ) -> std::io::Result<ChainHead> {
        let now = SystemTime::now();
        let today = DateTime::<Utc>::from(now).format("%Y-%m-%d").to_string();
        self.refresh_segment(&today, now, key)?;
        let mut segment = self.segment.take().expect("refresh_segment sets a segment");

        let base = self.base();
        let mut head = segment.head;
        let mut bytes = Vec::new();
        for (event, fields) in records {
            let checkpoint;
            let fields = match key {
                Some(key) if *event == "checkpoint" => {
                    checkpoint = checkpoint_fields(key, JOURNAL_SCOPE, head, now);
                    &checkpoint
                }
                _ => fields,
            };
            let line = chained_line(head, event, now, &base, fields);
            head = ChainHead {
                next_seq: head.next_seq + 1,
                prev: Sha256::digest(&line).into(),
            };
            bytes.extend_from_slice(&line);
        }
        match segment.file.write_all(&bytes) {
            Ok(()) => {
                segment.len += bytes.len() as u64;
                segment.head = head;
                self.segment = Some(segment);
                Ok(head)
            }
            Err(error) => {
                // Cut a partial write off, so the segment still ends on a whole line.
                let _ = segment.file.set_len(segment.len);
                self.segment = Some(segment);
                Err(error)
            }
        }
    }

    /// Flushes appended records to the disk.
    pub fn sync(&self) -> std::io::Result<()> {
        match &self.segment {
            Some(segment) => segment.file.sync_data(),
            None => Ok(()),
        }
    }

    fn base(&self) -> Fields {
        let mut base = Fields::base();
        base.str_verbatim("node", &self.node);
        base
    }

    /// Makes sure `self.segment` is the segment to append to, with a current chain head. It
    /// keeps our segment when nobody else wrote to it and re-reads its end when somebody did.
    /// It starts a new segment on a new day, after a torn end, or when there is none yet.
    fn refresh_segment(
        &mut self,
        today: &str,
        now: SystemTime,
        key: Option<&SigningKey>,
    ) -> std::io::Result<()> {
        if let Some(segment) = &mut self.segment {
            let size = segment.file.metadata()?.len();
            if size != segment.len {
                let end = read_end(&segment.path)?;
                segment.len = size;
                segment.head = end.head;
                if end.torn_bytes > 0 {
                    self.next_reason = "torn_end";
                    self.segment = None;
                }
            }
            if let Some(segment) = &self.segment
                && segment.date != today
            {
                self.next_reason = "new_day";
                self.segment = None;
            }
        }
        if self.segment.is_some() {
            return Ok(());
        }

        let newest = newest_segment(&self.dir)?;
        let previous = match &newest {
            Some(path) => Some((path.clone(), read_end(path)?)),
            None => None,
        };
        // The CLI appends to the newest segment when it ends cleanly. The daemon always starts
        // its own, so each daemon run is visible in the journal.
        if self.writer == Writer::Cli
            && let Some((path, end)) = &previous
            && end.torn_bytes == 0
        {
            let file = OpenOptions::new().append(true).open(path)?;
            let len = file.metadata()?.len();
            let date = segment_date(path).unwrap_or_default();
            if date == today {
                self.segment = Some(Segment {
                    path: path.clone(),
                    file,
                    len,
                    head: end.head,
                    date,
                });
                return Ok(());
            }
        }
        self.start_segment(previous, now, key)
    }

    fn start_segment(
        &mut self,
        previous: Option<(PathBuf, FileEnd)>,
        now: SystemTime,
        key: Option<&SigningKey>,
    ) -> std::io::Result<()> {
        let mut name = DateTime::<Utc>::from(now)
            .format("%Y%m%dT%H%M%S%.6fZ")
            .to_string();
        name.push_str(".jsonl");
        let path = self.dir.join(&name);
        let file = super::store_file_options()
            .create_new(true)
            .append(true)
            .open(&path)?;

        let (head, previous_fields) = match &previous {
            Some((previous_path, end)) => (
                end.head,
                json!({
                    "segment": file_name(previous_path),
                    "seq": end.head.next_seq.checked_sub(1),
                    "digest": hex(&end.head.prev),
                    "torn_bytes": end.torn_bytes,
                }),
            ),
            None => match latest_anchor(&self.dir) {
                Some((head, anchor)) => (head, anchor),
                None => (ChainHead::GENESIS, Value::Null),
            },
        };
        let mut fields = Map::new();
        fields.insert("segment".into(), json!(name));
        fields.insert("reason".into(), json!(self.next_reason));
        fields.insert("writer".into(), json!(self.writer.as_str()));
        fields.insert("pid".into(), json!(std::process::id()));
        fields.insert("previous".into(), previous_fields);
        if let Some(key) = key {
            fields.insert(
                "key".into(),
                json!({ "id": key.public().id(), "public": key.public().to_base64() }),
            );
        }
        let date = DateTime::<Utc>::from(now).format("%Y-%m-%d").to_string();
        let mut segment = Segment {
            path,
            file,
            len: 0,
            head,
            date,
        };
        let fields = Fields::from_map_verbatim(&fields, Fields::journal());
        let line = chained_line(head, "journal.start", now, &self.base(), &fields);
        segment.file.write_all(&line)?;
        segment.len = line.len() as u64;
        segment.head = ChainHead {
            next_seq: head.next_seq + 1,
            prev: Sha256::digest(&line).into(),
        };
        self.segment = Some(segment);
        self.next_reason = match self.writer {
            Writer::Daemon => "daemon_start",
            Writer::Cli => "cli",
        };
        Ok(())
    }

    /// Returns the chain head of the current segment, when one is open.
    pub fn head(&self) -> Option<ChainHead> {
        self.segment.as_ref().map(|segment| segment.head)
    }
}

/// Lists the journal's segment files, oldest first.
pub fn segments(journal_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    let entries = match fs::read_dir(journal_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(paths),
        Err(error) => return Err(error),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "jsonl") {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

fn newest_segment(journal_dir: &Path) -> std::io::Result<Option<PathBuf>> {
    Ok(segments(journal_dir)?.pop())
}

/// Returns the UTC date (`YYYY-MM-DD`) a segment was started on, from its name.
pub fn segment_date(path: &Path) -> Option<String> {
    let name = file_name(path);
    let digits = name.get(..8)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(format!(
        "{}-{}-{}",
        &digits[..4],
        &digits[4..6],
        &digits[6..8]
    ))
}

pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The file that remembers where the chain stood when pruning removed every segment: the next
/// segment then continues from it.
pub const ANCHOR_FILE: &str = "anchor.json";

/// Reads the anchor left by pruning, as a chain head and the `previous` field of the next
/// `journal.start`.
fn latest_anchor(journal_dir: &Path) -> Option<(ChainHead, Value)> {
    let text = fs::read(journal_dir.join(ANCHOR_FILE)).ok()?;
    let anchor: Value = serde_json::from_slice(&text).ok()?;
    let seq = anchor["seq"].as_u64()?;
    let digest = super::unhex(anchor["digest"].as_str()?)?;
    Some((
        ChainHead {
            next_seq: seq + 1,
            prev: digest,
        },
        json!({
            "segment": anchor["segment"],
            "seq": seq,
            "digest": anchor["digest"],
            "torn_bytes": anchor["torn_bytes"],
            "pruned": true,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_appends_to_daemon_segment() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut daemon = Journal::open(dir.path(), "n1", Writer::Daemon).expect("open journal");
        daemon
            .append(&[("alert", Fields::journal())], None)
            .expect("daemon append");
        let mut cli = Journal::open(dir.path(), "n1", Writer::Cli).expect("open journal");
        cli.append(&[("access", Fields::journal())], None)
            .expect("cli append");
        let head = daemon
            .append(&[("alert", Fields::journal())], None)
            .expect("daemon append after the CLI");

        let paths = segments(&dir.path().join(JOURNAL_DIR)).expect("list segments");
        assert_eq!(paths.len(), 1);
        let bytes = fs::read(&paths[0]).expect("read segment");
        let (lines, torn) = split_lines(&bytes);
        assert!(torn.is_empty());
        assert_eq!(lines.len(), 4);
        let events: Vec<String> = lines
            .iter()
            .map(|line| {
                let value: Value = serde_json::from_slice(line).expect("JSON line");
                value["event"].as_str().expect("event").to_string()
            })
            .collect();
        assert_eq!(events, ["journal.start", "alert", "access", "alert"]);
        assert_eq!(head.next_seq, 4);
        assert_eq!(head.prev, <[u8; 32]>::from(Sha256::digest(lines[3])));
    }

    #[test]
    fn torn_end_starts_new_segment() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut daemon = Journal::open(dir.path(), "n1", Writer::Daemon).expect("open journal");
        daemon
            .append(&[("alert", Fields::journal())], None)
            .expect("append");
        let first = segments(&dir.path().join(JOURNAL_DIR)).expect("list")[0].clone();
        let mut file = OpenOptions::new()
            .append(true)
            .open(&first)
            .expect("open segment");
        file.write_all(b"{\"v\":1,\"se").expect("write torn line");

        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut cli = Journal::open(dir.path(), "n1", Writer::Cli).expect("open journal");
        cli.append(&[("access", Fields::journal())], None)
            .expect("append after torn end");
        let paths = segments(&dir.path().join(JOURNAL_DIR)).expect("list");
        assert_eq!(paths.len(), 2);
        let second = fs::read(&paths[1]).expect("read");
        let start: Value =
            serde_json::from_slice(split_lines(&second).0[0]).expect("journal.start");
        assert_eq!(start["previous"]["torn_bytes"], 10);
        assert_eq!(start["reason"], "cli");
        assert_eq!(start["seq"], 2);
    }
}
