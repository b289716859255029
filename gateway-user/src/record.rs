//! Session recordings: one JSON-lines file per proxied connection, written under
//! `<dir>/<UTC date>/<session id>.jsonl`.
//!
//! Each line is one event with a sequence number and `prev`, the SHA-256 of the previous line
//! (the first line's `prev` is all zeros), so a removed, edited or reordered line breaks the
//! chain. Everything that writes recordings goes through `SessionRecorder`.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::identity::Subject;

/// Errors while writing a recording.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("failed to write session recording {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Creates session recordings under one directory.
#[derive(Clone, Debug)]
pub struct Recorder {
    dir: PathBuf,
    node: String,
}

/// Target of a session.
#[derive(Clone, Debug, Serialize)]
pub struct TargetInfo {
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

/// An open session recording.
#[derive(Debug)]
pub struct SessionRecord {
    pub id: String,
    path: PathBuf,
    file: File,
    seq: u64,
    prev: [u8; 32],
    base: Value,
}

impl Recorder {
    pub fn new(dir: PathBuf, node: String) -> Self {
        Self { dir, node }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens a new recording and writes its `session.start` event.
    pub fn start(
        &self,
        subject: &Subject,
        client: SocketAddr,
        target: &TargetInfo,
    ) -> Result<SessionRecord, RecordError> {
        let now = SystemTime::now();
        let id = uuid::Uuid::now_v7().to_string();
        let date = DateTime::<Utc>::from(now).format("%Y-%m-%d").to_string();
        let day_dir = self.dir.join(date);
        let path = day_dir.join(format!("{id}.jsonl"));
        let write_error = |source| RecordError::Write {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(&day_dir).map_err(write_error)?;
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(write_error)?;

        let base = json!({
            "session": id,
            "node": self.node,
            "protocol": target.class,
        });
        let mut record = SessionRecord {
            id,
            path,
            file,
            seq: 0,
            prev: [0; 32],
            base,
        };
        record.write_event(
            "session.start",
            now,
            json!({
                "subject": subject,
                "origin": { "addr": client },
                "target": target,
            }),
        )?;
        Ok(record)
    }
}

impl SessionRecord {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one event of the session (a statement, a request) with its own fields.
    pub fn event(&mut self, event: &str, fields: Value) -> Result<(), RecordError> {
        self.write_event(event, SystemTime::now(), fields)
    }

    /// Writes the `session.end` event and closes the recording.
    pub fn finish(mut self, end: &SessionEnd) -> Result<PathBuf, RecordError> {
        self.write_event(
            "session.end",
            SystemTime::now(),
            json!({
                "outcome": end.outcome,
                "reason": end.reason,
                "bytes": {
                    "from_client": end.bytes_from_client,
                    "from_upstream": end.bytes_from_upstream,
                },
                "duration_ms": end.duration.as_millis() as u64,
            }),
        )?;
        self.file.sync_data().map_err(|source| RecordError::Write {
            path: self.path.clone(),
            source,
        })?;
        Ok(self.path)
    }

    fn write_event(
        &mut self,
        event: &str,
        time: SystemTime,
        fields: Value,
    ) -> Result<(), RecordError> {
        let mut object = self.base.clone();
        let map = object.as_object_mut().expect("base is an object");
        map.insert("seq".into(), json!(self.seq));
        map.insert("prev".into(), json!(hex(&self.prev)));
        map.insert("event".into(), json!(event));
        map.insert(
            "time".into(),
            json!(DateTime::<Utc>::from(time).to_rfc3339_opts(SecondsFormat::Micros, true)),
        );
        if let Value::Object(extra) = fields {
            map.extend(extra);
        }
        let mut line = serde_json::to_vec(&object).expect("JSON values always serialize");
        line.push(b'\n');

        self.file
            .write_all(&line)
            .map_err(|source| RecordError::Write {
                path: self.path.clone(),
                source,
            })?;
        self.prev = Sha256::digest(&line).into();
        self.seq += 1;
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_chains_lines() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let recorder = Recorder::new(dir.path().to_path_buf(), "node-a".into());
        let subject = Subject {
            cgroup: Some("/kubepods/pod1/c1".into()),
            pid: 42,
            ..Subject::default()
        };
        let target = TargetInfo {
            name: "db".into(),
            class: "tcp".into(),
            addr: "10.0.0.2:5432".parse().expect("valid address"),
        };
        let record = recorder
            .start(
                &subject,
                "10.1.0.2:40000".parse().expect("valid address"),
                &target,
            )
            .expect("start recording");
        let path = record
            .finish(&SessionEnd {
                outcome: Outcome::Closed,
                reason: None,
                bytes_from_client: 5,
                bytes_from_upstream: 7,
                duration: Duration::from_millis(3),
            })
            .expect("finish recording");

        let text = fs::read_to_string(&path).expect("read recording");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let start: Value = serde_json::from_str(lines[0]).expect("JSON line");
        let end: Value = serde_json::from_str(lines[1]).expect("JSON line");
        assert_eq!(start["event"], "session.start");
        assert_eq!(start["seq"], 0);
        assert_eq!(start["prev"], "0".repeat(64));
        assert_eq!(start["subject"]["cgroup"], "/kubepods/pod1/c1");
        assert_eq!(end["event"], "session.end");
        assert_eq!(end["seq"], 1);
        assert_eq!(end["outcome"], "closed");
        assert_eq!(end["bytes"]["from_upstream"], 7);
        let expected_prev = hex(&Sha256::digest(format!("{}\n", lines[0]).as_bytes()));
        assert_eq!(end["prev"], expected_prev);
    }
}
