//! Reading `AccessPolicy` files and keeping the daemon's policy current.
//!
//! A policy path is a file or a directory. In a directory every regular file ending in `.yaml`,
//! `.yml` or `.json` whose name does not start with `.` is read, in byte order of the file
//! names, so a mounted ConfigMap (whose `..data` entries start with `.`) reads cleanly. A file
//! contains one or more objects separated by `---`.
//!
//! [`PolicyStore`] polls the path and swaps in a new policy when it loads cleanly. When it
//! does not, the last good policy stays in force and the error is kept as an alert until a
//! later load succeeds.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use serde::Deserialize as _;
use tracing::{error, info};

use super::{eval::Policy, spec::AccessPolicySpec};
use crate::mask::MaskPolicy;

/// Largest policy file read. Policies are hand-written text; a file this large is a mistake
/// (a wrong path) rather than a policy.
const MAX_POLICY_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Errors while loading policies.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// A file or directory could not be read.
    #[error("failed to read policy {path}: {message}")]
    Read { path: PathBuf, message: String },
    /// A file does not hold valid `AccessPolicy` objects.
    #[error("invalid policy {path}{}: field `{field}`: {message}", location(*.line, *.column))]
    Invalid {
        path: PathBuf,
        /// 1-based line and column of the offending value, when the YAML parser reports it.
        line: Option<usize>,
        column: Option<usize>,
        field: String,
        message: String,
    },
    /// The objects are valid one by one but contradict each other.
    #[error("invalid policy set {path}: {message}")]
    Conflict { path: PathBuf, message: String },
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!(":{line}:{column}"),
        (Some(line), None) => format!(":{line}"),
        _ => String::new(),
    }
}

/// Loads every policy under `path` (a file or a directory) into one [`Policy`].
pub fn load_path(path: &Path) -> Result<Policy, PolicyError> {
    let read_error = |error: std::io::Error| PolicyError::Read {
        path: path.to_path_buf(),
        message: error.to_string(),
    };
    let metadata = fs::metadata(path).map_err(read_error)?;
    let files = if metadata.is_dir() {
        policy_files(path).map_err(read_error)?
    } else {
        vec![path.to_path_buf()]
    };

    let mut objects = Vec::new();
    for file in &files {
        objects.extend(load_file(file)?);
    }
    Policy::build(objects).map_err(|message| PolicyError::Conflict {
        path: path.to_path_buf(),
        message,
    })
}

/// Lists the policy files of a directory in load order.
fn policy_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let wanted = !name.starts_with('.')
            && [".yaml", ".yml", ".json"]
                .iter()
                .any(|suffix| name.ends_with(suffix));
        // `metadata` follows symlinks, as ConfigMap files are links into `..data`.
        if wanted && fs::metadata(entry.path())?.is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Reads the objects of one file, each with the file's name.
fn load_file(path: &Path) -> Result<Vec<(String, AccessPolicySpec)>, PolicyError> {
    let read_error = |message: String| PolicyError::Read {
        path: path.to_path_buf(),
        message,
    };
    let size = fs::metadata(path)
        .map_err(|error| read_error(error.to_string()))?
        .len();
    if size > MAX_POLICY_FILE_BYTES {
        return Err(read_error(format!(
            "file is {size} bytes, more than the {MAX_POLICY_FILE_BYTES} bytes a policy file may have"
        )));
    }
    let text = fs::read_to_string(path).map_err(|error| read_error(error.to_string()))?;
    parse_objects(path, &text)
}

/// Parses the `---`-separated objects of `text`; `path` names the source in errors.
pub fn parse_objects(
    path: &Path,
    text: &str,
) -> Result<Vec<(String, AccessPolicySpec)>, PolicyError> {
    let mut objects = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        // An empty document (a trailing `---`, or a file of comments) contains no object.
        let value = match serde_yaml::Value::deserialize(document) {
            Ok(value) => value,
            Err(error) => return Err(invalid(path, index, String::new(), error)),
        };
        if value.is_null() {
            continue;
        }
        // Parse the document a second time as an object, so that errors carry the location
        // the YAML parser tracks; a Value has lost it.
        let document = serde_yaml::Deserializer::from_str(text)
            .nth(index)
            .expect("the document was read once already");
        let object: AccessPolicySpec =
            serde_path_to_error::deserialize(document).map_err(|error| {
                let field = error.path().to_string();
                invalid(path, index, field, error.into_inner())
            })?;
        objects.push((path.display().to_string(), object));
    }
    Ok(objects)
}

fn invalid(path: &Path, document: usize, field: String, error: serde_yaml::Error) -> PolicyError {
    let location = error.location();
    let mut message = error.to_string();
    // serde_yaml appends the location and may prefix the path; both are reported separately.
    if let Some(at) = message.rfind(" at line ") {
        message.truncate(at);
    }
    if let Some((prefix, rest)) = message.split_once(": ")
        && !prefix.contains(' ')
        && field.starts_with(prefix)
    {
        message = rest.to_string();
    }
    let field = if field.is_empty() || field == "." {
        format!("(document {})", document + 1)
    } else {
        field
    };
    PolicyError::Invalid {
        path: path.to_path_buf(),
        line: location.as_ref().map(serde_yaml::Location::line),
        column: location.as_ref().map(serde_yaml::Location::column),
        field,
        message,
    }
}

/// Names, sizes and modification times of the files under a policy path.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn fingerprint(path: &Path) -> Fingerprint {
    let files = match fs::metadata(path) {
        Ok(metadata) if metadata.is_dir() => policy_files(path).unwrap_or_default(),
        _ => vec![path.to_path_buf()],
    };
    files
        .into_iter()
        .map(|file| {
            let metadata = fs::metadata(&file).ok();
            let size = metadata.as_ref().map_or(0, fs::Metadata::len);
            let modified = metadata.and_then(|metadata| metadata.modified().ok());
            (file, size, modified)
        })
        .collect()
}

/// State of the policy store, for status output and alert events.
#[derive(Clone, Debug, Default)]
pub struct PolicyStatus {
    /// Counts successful loads, starting at 1 for the first.
    pub generation: u64,
    /// The error of the latest load attempt, while the last good policy stays in force.
    pub alert: Option<PolicyError>,
}

/// The daemon's current policy, reloaded when its files change.
#[derive(Debug)]
pub struct PolicyStore {
    path: Option<PathBuf>,
    current: RwLock<Arc<Policy>>,
    status: RwLock<PolicyStatus>,
    /// The files as they were at the latest load attempt.
    loaded_files: std::sync::Mutex<Fingerprint>,
}

impl PolicyStore {
    /// A store with a fixed policy and no files behind it.
    pub fn fixed(policy: Policy) -> Self {
        Self {
            path: None,
            current: RwLock::new(Arc::new(policy)),
            status: RwLock::new(PolicyStatus {
                generation: 1,
                alert: None,
            }),
            loaded_files: Default::default(),
        }
    }

    /// Loads the policy under `path`; fails when the first load fails.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let files = fingerprint(path);
        let policy = load_path(path)?;
        Ok(Self {
            loaded_files: std::sync::Mutex::new(files),
            path: Some(path.to_path_buf()),
            current: RwLock::new(Arc::new(policy)),
            status: RwLock::new(PolicyStatus {
                generation: 1,
                alert: None,
            }),
        })
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<Policy> {
        Arc::clone(&self.current.read().expect("policy lock poisoned"))
    }

    pub fn status(&self) -> PolicyStatus {
        self.status
            .read()
            .expect("policy status lock poisoned")
            .clone()
    }

    /// Loads the files again. On success the new policy replaces the old one and the alert is
    /// cleared. On failure the old policy stays in force and the error becomes the alert.
    pub fn reload(&self) -> Result<(), PolicyError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        match load_path(path) {
            Ok(policy) => {
                let rules = policy.rule_count();
                *self.current.write().expect("policy lock poisoned") = Arc::new(policy);
                let mut status = self.status.write().expect("policy status lock poisoned");
                status.generation += 1;
                status.alert = None;
                info!(path = %path.display(), rules, generation = status.generation, "policy reloaded");
                Ok(())
            }
            Err(load_error) => {
                // The parser quotes the value it rejected, which may be a card number.
                let masked_error =
                    crate::mask::masked_text(load_error.to_string(), &MaskPolicy::default());
                error!(path = %path.display(), error = masked_error, "policy reload failed; keeping the last good policy");
                self.status
                    .write()
                    .expect("policy status lock poisoned")
                    .alert = Some(load_error.clone());
                Err(load_error)
            }
        }
    }

    /// Polls the files every `interval` and reloads when names, sizes or modification times
    /// change. Runs until the task is dropped or aborted.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let Some(path) = self.path.clone() else {
            return;
        };
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let scan_path = path.clone();
            let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&scan_path)).await else {
                continue;
            };
            {
                let mut loaded = self
                    .loaded_files
                    .lock()
                    .expect("policy files lock poisoned");
                if *loaded == now {
                    continue;
                }
                *loaded = now;
            }
            let store = Arc::clone(&self);
            // The result is logged and kept in the status by `reload`.
            let _ = tokio::task::spawn_blocking(move || store.reload()).await;
        }
    }
}
