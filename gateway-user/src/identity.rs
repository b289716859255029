//! The subject behind a redirected connection: the cgroup, process and user the connect hook saw,
//! turned into a subject the recordings and (later) the policy can use.
//!
//! The cgroup id is mapped to its path by walking the pods cgroup. The pod UID and container
//! id are then read from the kubelet's layout of that path. Pod names, namespaces and service
//! accounts need the cluster's API and are not resolved here.

use std::{path::PathBuf, sync::Mutex};

use gateway_common::OrigInfo;
use serde::Serialize;

use crate::cgroup::{self, CgroupIndex};

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
}

/// Resolves subjects from the connect hook's `OrigInfo`.
#[derive(Debug)]
pub struct Identity {
    index: Mutex<CgroupIndex>,
}

impl Identity {
    /// Indexes the cgroups below `root`, the cgroup the programs are attached to.
    pub fn new(unified: PathBuf, root: PathBuf) -> Self {
        Self {
            index: Mutex::new(CgroupIndex::new(unified, root)),
        }
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
        Subject {
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
