//! Retention: compressing closed session files and pruning what is older than the retention.
//!
//! A session directory (`sessions/<UTC date>/`) is pruned whole once its date is more than
//! `retention_days` before today, and a journal segment once the segment after it started
//! before that cutoff, so every record in it is older. The newest journal segment is never
//! pruned. The caller writes the returned `pruned` record into the journal, which names what
//! went and where the chain continued, so `verify` can tell pruning from deletion.

use std::{
    collections::HashSet,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Map, Value, json};

use super::{SESSIONS_DIR, hex, journal};
use crate::config::RecordingConfig;

/// zstd level of compressed session files: zstd's default, a good speed and size balance.
const ZSTD_LEVEL: i32 = 3;

/// Errors of a retention pass.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to compress {path}")]
    Compress {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to remove {path}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Retention settings: how long files are kept and when they are compressed.
#[derive(Clone, Debug)]
pub struct Settings {
    pub retention_days: u32,
    pub compress_after: Duration,
}

impl Settings {
    pub fn from_config(config: &RecordingConfig) -> Self {
        Self {
            retention_days: config.retention_days,
            compress_after: config.compress_after,
        }
    }
}

/// Result of a retention pass.
#[derive(Debug, Default)]
pub struct Report {
    pub compressed: usize,
    pub sessions_pruned: usize,
    /// Session directories removed, by date.
    pub days_pruned: Vec<String>,
    /// Journal segments removed, by file name.
    pub segments_pruned: Vec<String>,
    /// Journal chain position at the end of the last removed segment.
    pub anchor: Option<Value>,
    /// Dates older than this were pruned.
    pub cutoff: String,
}

impl Report {
    /// Fields of the `pruned` journal record, when anything was pruned.
    pub fn journal_record(&self) -> Option<Map<String, Value>> {
        if self.days_pruned.is_empty() && self.segments_pruned.is_empty() {
            return None;
        }
        let mut fields = Map::new();
        fields.insert("before".into(), json!(self.cutoff));
        fields.insert("sessions".into(), json!(self.sessions_pruned));
        fields.insert("days".into(), json!(self.days_pruned));
        fields.insert("segments".into(), json!(self.segments_pruned));
        fields.insert("anchor".into(), self.anchor.clone().unwrap_or(Value::Null));
        Some(fields)
    }
}

/// Runs one retention pass at time `now`; sessions in `open` are never compressed.
pub fn run(
    store: &Path,
    now: SystemTime,
    settings: &Settings,
    open: &HashSet<String>,
) -> Result<Report, RetentionError> {
    let today = DateTime::<Utc>::from(now).date_naive();
    let cutoff = today - chrono::Days::new(u64::from(settings.retention_days));
    let mut report = Report {
        cutoff: cutoff.format("%Y-%m-%d").to_string(),
        ..Report::default()
    };

    let sessions = store.join(SESSIONS_DIR);
    for day in list_dir(&sessions)? {
        let Some(date) = day
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| NaiveDate::parse_from_str(name, "%Y-%m-%d").ok())
        else {
            continue;
        };
        if date < cutoff {
            let files = list_dir(&day)?;
            report.sessions_pruned += files
                .iter()
                .filter(|path| session_id_of(path).is_some())
                .count();
            fs::remove_dir_all(&day).map_err(|source| RetentionError::Remove {
                path: day.clone(),
                source,
            })?;
            report.days_pruned.push(date.format("%Y-%m-%d").to_string());
            continue;
        }
        for file in list_dir(&day)? {
            if file.extension().is_some_and(|ext| ext == "jsonl")
                && session_id_of(&file).is_some_and(|id| !open.contains(&id))
                && modified_before(&file, now, settings.compress_after)
            {
                compress(&file)?;
                report.compressed += 1;
            }
        }
    }

    prune_segments(store, cutoff, &mut report)?;
    Ok(report)
}

fn prune_segments(
    store: &Path,
    cutoff: NaiveDate,
    report: &mut Report,
) -> Result<(), RetentionError> {
    let journal_dir = store.join(journal::JOURNAL_DIR);
    let segments = journal::segments(&journal_dir).map_err(|source| RetentionError::Read {
        path: journal_dir.clone(),
        source,
    })?;
    let mut removable = Vec::new();
    for pair in segments.windows(2) {
        let next_started = journal::segment_date(&pair[1])
            .and_then(|date| NaiveDate::parse_from_str(&date, "%Y-%m-%d").ok());
        match next_started {
            Some(date) if date < cutoff => removable.push(pair[0].clone()),
            _ => break,
        }
    }
    let Some(last) = removable.last() else {
        return Ok(());
    };
    let end = journal::read_end(last).map_err(|source| RetentionError::Read {
        path: last.clone(),
        source,
    })?;
    let anchor = json!({
        "segment": journal::file_name(last),
        "seq": end.head.next_seq.checked_sub(1),
        "digest": hex(&end.head.prev),
        "torn_bytes": end.torn_bytes,
    });
    let anchor_path = journal_dir.join(journal::ANCHOR_FILE);
    fs::write(&anchor_path, anchor.to_string()).map_err(|source| RetentionError::Write {
        path: anchor_path,
        source,
    })?;
    for path in &removable {
        fs::remove_file(path).map_err(|source| RetentionError::Remove {
            path: path.clone(),
            source,
        })?;
        report.segments_pruned.push(journal::file_name(path));
    }
    report.anchor = Some(anchor);
    Ok(())
}

/// Returns the session id of a session file name (`<id>.jsonl` or `<id>.jsonl.zst`).
pub fn session_id_of(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let id = name
        .strip_suffix(".jsonl.zst")
        .or_else(|| name.strip_suffix(".jsonl"))?;
    uuid::Uuid::parse_str(id).ok()?;
    Some(id.to_string())
}

fn modified_before(path: &Path, now: SystemTime, age: Duration) -> bool {
    fs::metadata(path)
        .and_then(|meta| meta.modified())
        .is_ok_and(|modified| {
            now.duration_since(modified)
                .is_ok_and(|elapsed| elapsed >= age)
        })
}

/// Compresses `path` to `path.zst`, synced before the original is removed.
fn compress(path: &Path) -> Result<(), RetentionError> {
    let error = |source| RetentionError::Compress {
        path: path.to_path_buf(),
        source,
    };
    let data = fs::read(path).map_err(error)?;
    let compressed = zstd::bulk::compress(&data, ZSTD_LEVEL).map_err(error)?;
    let mut target = path.as_os_str().to_owned();
    target.push(".zst");
    let target = PathBuf::from(target);
    let mut temporary = target.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut file = super::store_file_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temporary)
        .map_err(error)?;
    file.write_all(&compressed).map_err(error)?;
    file.sync_all().map_err(error)?;
    fs::rename(&temporary, &target).map_err(error)?;
    fs::remove_file(path).map_err(|source| RetentionError::Remove {
        path: path.to_path_buf(),
        source,
    })
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, RetentionError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(RetentionError::Read {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
    paths.sort();
    Ok(paths)
}
