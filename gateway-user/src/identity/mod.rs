//! The subject behind a redirected connection: the cgroup, process and user the connect hook saw,
//! turned into a subject the recordings and (later) the policy can use.
//!
//! The cgroup id is mapped to its path by walking the pods cgroup. The pod UID and container
//! id are then read from the kubelet's layout of that path. Outside Kubernetes (and in tests),
//! a static identity file maps cgroup path patterns to a namespace, pod, service account and
//! labels. In a cluster, a watch of this node's pods (see [`cluster`]) maps the pod UID to the
//! Pod's namespace, name, service account and labels.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use gateway_common::OrigInfo;
use serde::{Deserialize, Serialize};

use crate::cgroup::{self, CgroupIndex};

pub mod cluster;

/// The subject of a session, as far as the node can tell.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Subject {
    /// cgroup path relative to the cgroup2 mount; `None` when the cgroup is already gone.
    pub cgroup: Option<String>,
    pub cgroup_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Process id of the connecting process, in the root PID namespace.
    pub pid: u32,
    /// The process's command name, when it is still running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    pub uid: u32,
    pub gid: u32,
    pub netns_cookie: u64,
    /// Pod namespace, pod name, service account and labels, when an identity source has the
    /// pod; otherwise the subject is `unknown` to policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Node the pod runs on, from the cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Source of the pod fields: `static` (the identity file) or `cluster` (the pod watch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_source: Option<&'static str>,
    /// Set when the pod fields come from a cache the API server has not confirmed lately.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub identity_stale: bool,
}

/// Resolves subjects from the connect hook's `OrigInfo`.
#[derive(Debug)]
pub struct Identity {
    index: Mutex<CgroupIndex>,
    static_subjects: Vec<StaticSubject>,
    /// The pod watch's cache and how long a connection waits for an unknown pod.
    cluster: Option<(std::sync::Arc<cluster::PodCache>, std::time::Duration)>,
}

/// Errors loading the static identity file.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("failed to read identity file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid identity file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The static identity file: cgroup path patterns and the subject each stands for, first
/// match wins.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StaticFile {
    subjects: Vec<StaticSubject>,
}

/// One entry of the static identity file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StaticSubject {
    /// Pattern on the cgroup path relative to the cgroup2 mount: `*` matches any run of
    /// characters, `/` included, and `?` one character.
    cgroup: String,
    namespace: String,
    #[serde(default)]
    pod: Option<String>,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Reads and checks a static identity file.
fn load_static_file(path: &Path) -> Result<Vec<StaticSubject>, IdentityError> {
    let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |message: String| IdentityError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let deserializer = serde_yaml::Deserializer::from_str(&text);
    let file: StaticFile = serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let field = error.path().to_string();
        invalid(format!("{field}: {}", error.into_inner()))
    })?;
    for (index, subject) in file.subjects.iter().enumerate() {
        if !subject.cgroup.starts_with('/') && !subject.cgroup.starts_with('*') {
            return Err(invalid(format!(
                "subjects[{index}].cgroup: {:?} must start with / or *, since cgroup paths are \
                 relative to the cgroup2 mount and start with /",
                subject.cgroup
            )));
        }
        if subject.namespace.is_empty() {
            return Err(invalid(format!(
                "subjects[{index}].namespace: must not be empty"
            )));
        }
    }
    Ok(file.subjects)
}

/// Matches `text` against a pattern where `*` is any run of characters and `?` one character.
fn glob_match(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    // Position of the last `*` and the text position it was tried at, for backtracking.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

impl Identity {
    /// Indexes the cgroups below `root`, the cgroup the programs are attached to.
    pub fn new(unified: PathBuf, root: PathBuf) -> Self {
        Self {
            index: Mutex::new(CgroupIndex::new(unified, root)),
            static_subjects: Vec::new(),
            cluster: None,
        }
    }

    /// Resolves pods through the pod watch's cache, waiting up to `wait` for a pod the cache
    /// does not have yet.
    pub fn set_cluster(
        &mut self,
        cache: std::sync::Arc<cluster::PodCache>,
        wait: std::time::Duration,
    ) {
        self.cluster = Some((cache, wait));
    }

    /// Fills in the pod fields of `subject` from the pod watch, when the static file did not
    /// name it. A pod the watch has not delivered within the wait stays unknown.
    pub async fn complete(&self, subject: &mut Subject) {
        if subject.identity_source.is_some() {
            return;
        }
        let (Some((cache, wait)), Some(uid)) = (&self.cluster, &subject.pod_uid) else {
            return;
        };
        let Some((pod, stale)) = cache.wait_for(uid, *wait).await else {
            tracing::debug!(pod_uid = %uid, "pod not known to the watch within the wait; subject is unknown");
            return;
        };
        subject.namespace = Some(pod.namespace);
        subject.pod = Some(pod.name);
        subject.service_account = pod.service_account;
        subject.labels = pod.labels;
        subject.node = pod.node;
        subject.identity_source = Some("cluster");
        subject.identity_stale = stale;
    }

    /// Creates an identity resolver like [`new`](Self::new), with subjects from a static
    /// identity file.
    pub fn with_static_file(
        unified: PathBuf,
        root: PathBuf,
        path: &Path,
    ) -> Result<Self, IdentityError> {
        let mut identity = Self::new(unified, root);
        identity.static_subjects = load_static_file(path)?;
        Ok(identity)
    }

    /// Checks a static identity file without using it, for `gatewayd check`.
    pub fn check_static_file(path: &Path) -> Result<usize, IdentityError> {
        load_static_file(path).map(|subjects| subjects.len())
    }

    pub fn resolve(&self, orig: &OrigInfo) -> Subject {
        let cgroup = self
            .index
            .lock()
            .expect("cgroup index lock poisoned")
            .lookup(orig.cgroup_id);
        let kubelet = cgroup
            .as_deref()
            .map(cgroup::parse_kubelet_path)
            .unwrap_or_default();
        let pid = (orig.pid_tgid >> 32) as u32;
        let known = cgroup.as_deref().and_then(|path| {
            self.static_subjects
                .iter()
                .find(|subject| glob_match(&subject.cgroup, path))
        });
        Subject {
            namespace: known.map(|subject| subject.namespace.clone()),
            pod: known.and_then(|subject| subject.pod.clone()),
            service_account: known.and_then(|subject| subject.service_account.clone()),
            labels: known
                .map(|subject| subject.labels.clone())
                .unwrap_or_default(),
            identity_source: known.map(|_| "static"),
            node: None,
            identity_stale: false,
            cgroup,
            cgroup_id: orig.cgroup_id,
            pod_uid: kubelet.pod_uid,
            container_id: kubelet.container_id,
            pid,
            comm: read_comm(pid),
            uid: orig.uid_gid as u32,
            gid: (orig.uid_gid >> 32) as u32,
            netns_cookie: orig.netns_cookie,
        }
    }
}

fn read_comm(pid: u32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_cgroup_paths() {
        let cases = [
            (
                "/kubepods.slice/*pod1234*",
                "/kubepods.slice/kubepods-pod1234.slice/cri-containerd-ab.scope",
                true,
            ),
            (
                "/kubepods.slice/*pod1234*",
                "/kubepods.slice/kubepods-pod9999.slice/x.scope",
                false,
            ),
            ("*/payments-?.scope", "/system.slice/payments-a.scope", true),
            (
                "*/payments-?.scope",
                "/system.slice/payments-ab.scope",
                false,
            ),
            ("/exact", "/exact", true),
            ("/exact", "/exact/child", false),
            ("*", "", true),
        ];
        for (pattern, path, expected) in cases {
            assert_eq!(glob_match(pattern, path), expected, "{pattern} vs {path}");
        }
    }

    #[test]
    fn static_file_errors_name_the_field() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("identities.yaml");
        std::fs::write(
            &path,
            "subjects:\n  - cgroup: /a/*\n    namespace: ns\n    podd: x\n",
        )
        .expect("write file");
        let error = load_static_file(&path).expect_err("unknown field");
        assert!(error.to_string().contains("subjects[0]"), "{error}");
        assert!(error.to_string().contains("podd"), "{error}");

        std::fs::write(&path, "subjects:\n  - cgroup: a/*\n    namespace: ns\n")
            .expect("write file");
        let error = load_static_file(&path).expect_err("relative pattern");
        assert!(error.to_string().contains("subjects[0].cgroup"), "{error}");
    }
}
