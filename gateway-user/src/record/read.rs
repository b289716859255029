//! Reading the store: finding session files, decoding them, and summarizing sessions.

use std::{
    fs,
    path::{Path, PathBuf},
};

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use serde_json::Value;

use super::{SESSIONS_DIR, journal, retention::session_id_of};

/// Errors while reading the store.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("failed to read {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no session matches {0:?}; `gatewayctl sessions list` shows the ids")]
    NotFound(String),
    #[error("session id prefix {prefix:?} matches {count} sessions; give more characters")]
    Ambiguous { prefix: String, count: usize },
}

/// A session file in the store.
#[derive(Clone, Debug)]
pub struct SessionFile {
    pub id: String,
    pub path: PathBuf,
    /// UTC date directory the file is in.
    pub date: NaiveDate,
    /// Path relative to the store, as the journal names it (without `.zst`).
    pub relative: String,
}

/// Lists session files with a date directory within `[from, to]` (inclusive, either open),
/// ordered by session id, which orders them by start time.
pub fn session_files(
    store: &Path,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
) -> Result<Vec<SessionFile>, ReadError> {
    let sessions = store.join(SESSIONS_DIR);
    let mut files = Vec::new();
    for day in read_dir_sorted(&sessions)? {
        let Some(date) = day
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| NaiveDate::parse_from_str(name, "%Y-%m-%d").ok())
        else {
            continue;
        };
        if from.is_some_and(|from| date < from) || to.is_some_and(|to| date > to) {
            continue;
        }
        for path in read_dir_sorted(&day)? {
            let Some(id) = session_id_of(&path) else {
                continue;
            };
            // A plain file and its compressed copy exist together only for a moment during
            // compression; list the session once.
            if files.last().is_some_and(|last: &SessionFile| last.id == id) {
                continue;
            }
            files.push(SessionFile {
                relative: format!("{SESSIONS_DIR}/{}/{id}.jsonl", date.format("%Y-%m-%d")),
                id,
                path,
                date,
            });
        }
    }
    files.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(files)
}

/// Finds a session by its id or a unique prefix of it.
pub fn find_session(store: &Path, id: &str) -> Result<SessionFile, ReadError> {
    // An empty prefix would pick any lone session; a user who typed nothing meant none.
    if id.trim().is_empty() {
        return Err(ReadError::NotFound(id.to_string()));
    }
    let matches: Vec<SessionFile> = session_files(store, None, None)?
        .into_iter()
        .filter(|file| file.id.starts_with(id))
        .collect();
    match matches.len() {
        0 => Err(ReadError::NotFound(id.to_string())),
        1 => Ok(matches.into_iter().next().expect("one match")),
        count => match matches.iter().find(|file| file.id == id) {
            Some(exact) => Ok(exact.clone()),
            None => Err(ReadError::Ambiguous {
                prefix: id.to_string(),
                count,
            }),
        },
    }
}

/// Reads a session or journal file, decompressing `.zst` files.
pub fn read_bytes(path: &Path) -> Result<Vec<u8>, ReadError> {
    let io = |source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = fs::read(path).map_err(io)?;
    if path.extension().is_some_and(|ext| ext == "zst") {
        zstd::stream::decode_all(&bytes[..]).map_err(io)
    } else {
        Ok(bytes)
    }
}

/// Parses the complete lines of a file; unparsable lines and a torn end are skipped (use
/// `verify` to learn about them).
pub fn parse_records(bytes: &[u8]) -> Vec<Value> {
    parse_records_counted(bytes).0
}

/// Parses the complete lines of a file like [`parse_records`], and also returns how many
/// complete lines could not be parsed.
pub fn parse_records_counted(bytes: &[u8]) -> (Vec<Value>, usize) {
    let (lines, _) = journal::split_lines(bytes);
    let records: Vec<Value> = lines
        .iter()
        .filter_map(|line| serde_json::from_slice(line).ok())
        .collect();
    let skipped = lines.len() - records.len();
    (records, skipped)
}

/// One row of `gatewayctl sessions list`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub id: String,
    pub start: String,
    pub duration_ms: Option<u64>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub service_account: Option<String>,
    pub target_class: String,
    pub target: String,
    pub requests: u64,
    pub denied: u64,
    /// Session outcome, `open` while no `session.end` is recorded.
    pub outcome: String,
    /// Lines of the file that could not be parsed, or a missing `session.start`: the file
    /// was damaged, and `verify` reports how.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub damaged: bool,
}

/// Events that stand for one request of the client: a statement or an API request.
const REQUESTS: &[&str] = &["sql.statement", "kube.request"];

/// Summarizes a session's records.
pub fn summarize(id: &str, records: &[Value]) -> Summary {
    let mut summary = Summary {
        id: id.to_string(),
        outcome: "open".into(),
        ..Summary::default()
    };
    for record in records {
        let event = record["event"].as_str().unwrap_or_default();
        match event {
            "session.start" => {
                summary.start = record["time"].as_str().unwrap_or_default().to_string();
                let subject = &record["subject"];
                summary.namespace = subject["namespace"].as_str().map(String::from);
                summary.pod = subject["pod"]
                    .as_str()
                    .or_else(|| subject["pod_uid"].as_str())
                    .or_else(|| subject["cgroup"].as_str())
                    .map(String::from);
                summary.service_account = subject["service_account"].as_str().map(String::from);
                let target = &record["target"];
                summary.target_class = target["class"].as_str().unwrap_or_default().to_string();
                summary.target = target["name"].as_str().unwrap_or_default().to_string();
            }
            "session.end" => {
                summary.outcome = record["outcome"].as_str().unwrap_or("unknown").to_string();
                summary.duration_ms = record["duration_ms"].as_u64();
            }
            _ if REQUESTS.contains(&event) => {
                summary.requests += 1;
                if record["decision"] == "deny" || record["outcome"] == "denied" {
                    summary.denied += 1;
                }
            }
            _ => {}
        }
    }
    summary
}

/// Parses the start time of a summary.
pub fn start_time(summary: &Summary) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(&summary.start)
        .ok()
        .map(|time| time.with_timezone(&Utc))
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, ReadError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ReadError::Io {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
    paths.sort();
    Ok(paths)
}
