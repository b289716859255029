//! The cgroup v2 hierarchy from the daemon's point of view: where it is mounted (read from
//! `/proc/self/mountinfo`, never assumed), whether cgroup v1 controllers are mounted beside it,
//! which directory holds the pods, and the mapping from a cgroup id back to its path.
//!
//! A cgroup v2 id is the inode number of the cgroup's directory, which is what
//! `bpf_get_current_cgroup_id()` returns in the kernel.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Errors while locating cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `/proc/self/mountinfo` could not be read.
    #[error("failed to read {path}")]
    Mountinfo {
        path: PathBuf,
        source: std::io::Error,
    },
    /// No cgroup2 filesystem is mounted in this mount namespace.
    #[error(
        "no cgroup2 filesystem is mounted (checked {path}); the gateway needs the unified \
         cgroup hierarchy: boot with systemd.unified_cgroup_hierarchy=1 or mount one with \
         `mount -t cgroup2 none /sys/fs/cgroup`. Under `ip netns exec`, which mounts a new \
         /sys without the host's cgroup mounts, enter the namespace with \
         `nsenter --net=/run/netns/NAME` instead"
    )]
    NoCgroup2 { path: PathBuf },
    /// The configured or detected pods cgroup does not exist.
    #[error("cgroup {path} not found")]
    NotFound {
        path: PathBuf,
        source: std::io::Error,
    },
    /// No kubelet pods cgroup was found under the cgroup2 mount.
    #[error(
        "no kubelet pods cgroup found under {root} (looked for kubepods.slice and kubepods); \
         set redirect.cgroup to the cgroup that holds the pods"
    )]
    NoKubepods { root: PathBuf },
    /// A path is not inside the cgroup2 mount.
    #[error("{path} is not inside the cgroup2 mount at {root}")]
    OutsideHierarchy { path: PathBuf, root: PathBuf },
}

/// One mounted cgroup filesystem from mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupMounts {
    /// Mount point of the cgroup2 filesystem.
    pub unified: PathBuf,
    /// Mount points of cgroup v1 hierarchies; non-empty on a hybrid host.
    pub v1: Vec<PathBuf>,
}

/// Reads the cgroup mounts of this mount namespace from `mountinfo`.
pub fn find_mounts(mountinfo: &Path) -> Result<CgroupMounts, CgroupError> {
    let text = fs::read_to_string(mountinfo).map_err(|source| CgroupError::Mountinfo {
        path: mountinfo.to_path_buf(),
        source,
    })?;
    parse_mountinfo(&text).ok_or_else(|| CgroupError::NoCgroup2 {
        path: mountinfo.to_path_buf(),
    })
}

/// Parses mountinfo text; `None` when no cgroup2 mount is listed.
///
/// Each line is `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE
/// SUPEROPTIONS` (proc(5)); the mount point escapes space, tab, newline and backslash as
/// octal `\NNN`.
pub fn parse_mountinfo(text: &str) -> Option<CgroupMounts> {
    let mut unified = None;
    let mut v1 = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(separator) = fields.iter().position(|field| *field == "-") else {
            continue;
        };
        let (Some(mount_point), Some(fstype)) = (fields.get(4), fields.get(separator + 1)) else {
            continue;
        };
        let mount_point = PathBuf::from(unescape_octal(mount_point));
        match *fstype {
            // The first cgroup2 mount wins, as it does for the kernel's own tools.
            "cgroup2" if unified.is_none() => unified = Some(mount_point),
            "cgroup" => v1.push(mount_point),
            _ => {}
        }
    }
    unified.map(|unified| CgroupMounts { unified, v1 })
}

fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && bytes.len() >= i + 4
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Finds the kubelet's pods cgroup: `kubepods.slice` with the systemd cgroup driver,
/// `kubepods` with the cgroupfs driver.
pub fn detect_kubepods(unified: &Path) -> Result<PathBuf, CgroupError> {
    for name in ["kubepods.slice", "kubepods"] {
        let candidate = unified.join(name);
        if candidate.is_dir() {
            return Ok(candidate);
        }
    }
    Err(CgroupError::NoKubepods {
        root: unified.to_path_buf(),
    })
}

/// Resolves a configured cgroup: absolute paths inside the mount are taken as they are,
/// anything else is relative to the cgroup2 mount.
pub fn resolve(unified: &Path, configured: &Path) -> Result<PathBuf, CgroupError> {
    let path = if configured.is_absolute() && configured.starts_with(unified) {
        configured.to_path_buf()
    } else {
        let relative = configured.strip_prefix("/").unwrap_or(configured);
        unified.join(relative)
    };
    fs::metadata(&path).map_err(|source| CgroupError::NotFound {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Returns the cgroup id (inode number) of a cgroup directory.
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    fs::metadata(path)
        .map(|meta| meta.ino())
        .map_err(|source| CgroupError::NotFound {
            path: path.to_path_buf(),
            source,
        })
}

/// Returns the path of `path` relative to the cgroup2 mount, with a leading `/`, as cgroup
/// paths are written in `/proc/PID/cgroup`.
pub fn display_path(unified: &Path, path: &Path) -> String {
    match path.strip_prefix(unified) {
        Ok(relative) => format!("/{}", relative.display()),
        Err(_) => path.display().to_string(),
    }
}

/// Deepest level walked below the root when indexing cgroups. The kubelet layout is at most
/// five levels deep (`kubepods/qos/pod/container`, plus a runtime's sandbox level).
const MAX_WALK_DEPTH: usize = 8;

/// Maps cgroup ids below one root to their paths; rebuilt on a miss, since pods come and go.
#[derive(Debug)]
pub struct CgroupIndex {
    unified: PathBuf,
    root: PathBuf,
    by_id: HashMap<u64, PathBuf>,
}

impl CgroupIndex {
    pub fn new(unified: PathBuf, root: PathBuf) -> Self {
        let mut index = Self {
            unified,
            root,
            by_id: HashMap::new(),
        };
        index.rescan();
        index
    }

    /// Returns the path of cgroup `id` relative to the cgroup2 mount, rescanning once when
    /// the id is unknown.
    pub fn lookup(&mut self, id: u64) -> Option<String> {
        if !self.by_id.contains_key(&id) {
            self.rescan();
        }
        self.by_id
            .get(&id)
            .map(|path| display_path(&self.unified, path))
    }

    fn rescan(&mut self) {
        self.by_id.clear();
        let mut pending = vec![(self.root.clone(), 0usize)];
        while let Some((dir, depth)) = pending.pop() {
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            self.by_id.insert(meta.ino(), dir.clone());
            if depth >= MAX_WALK_DEPTH {
                continue;
            }
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                    pending.push((entry.path(), depth + 1));
                }
            }
        }
    }
}

/// Pod UID and container id read from a kubelet-style cgroup path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeletPath {
    pub pod_uid: Option<String>,
    pub container_id: Option<String>,
}

/// Reads the pod UID and container id from a cgroup path laid out by the kubelet, with
/// either cgroup driver:
///
/// - systemd: `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<UID with
///   underscores>.slice/cri-containerd-<ID>.scope`
/// - cgroupfs: `/kubepods/besteffort/pod<UID>/<ID>`
pub fn parse_kubelet_path(path: &str) -> KubeletPath {
    let mut result = KubeletPath::default();
    let mut after_pod = false;
    for component in path.split('/').filter(|c| !c.is_empty()) {
        if after_pod {
            result.container_id = Some(container_id_of(component));
            break;
        }
        let name = component.strip_suffix(".slice").unwrap_or(component);
        // cgroupfs names the directory `pod<UID>`; systemd `kubepods-<qos>-pod<UID>`.
        let uid = name
            .strip_prefix("pod")
            .or_else(|| name.rsplit_once("-pod").map(|(_, uid)| uid));
        if let Some(uid) = uid.filter(|uid| !uid.is_empty()) {
            result.pod_uid = Some(uid.replace('_', "-"));
            after_pod = true;
        }
    }
    result
}

/// Strips the runtime prefix and `.scope` suffix: `cri-containerd-<ID>.scope` or
/// `crio-<ID>.scope` or `docker-<ID>.scope` become `<ID>`.
fn container_id_of(component: &str) -> String {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    name.rsplit('-').next().unwrap_or(name).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
22 1 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw
30 22 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
33 30 0:29 / /sys/fs/cgroup/cpu rw,nosuid shared:12 - cgroup cgroup rw,cpu
";

    #[test]
    fn mountinfo_hybrid_host() {
        let mounts = parse_mountinfo(HYBRID).expect("cgroup2 is listed");
        assert_eq!(mounts.unified, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(mounts.v1.len(), 2);
    }

    #[test]
    fn mountinfo_without_cgroup2() {
        let text = "30 22 0:26 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_mountinfo(text), None);
    }

    #[test]
    fn mountinfo_escaped_mount_point() {
        let text = "31 30 0:27 / /mnt/my\\040cgroup rw shared:1 - cgroup2 cgroup2 rw\n";
        let mounts = parse_mountinfo(text).expect("cgroup2 is listed");
        assert_eq!(mounts.unified, PathBuf::from("/mnt/my cgroup"));
        assert!(mounts.v1.is_empty());
    }

    #[test]
    fn kubelet_path_systemd_driver() {
        let path = "/kubepods.slice/kubepods-burstable.slice/\
                    kubepods-burstable-pod0f5e_11aa_4b2c_9d3e_123456789abc.slice/\
                    cri-containerd-4b1f9c.scope";
        let parsed = parse_kubelet_path(path);
        assert_eq!(
            parsed.pod_uid.as_deref(),
            Some("0f5e-11aa-4b2c-9d3e-123456789abc")
        );
        assert_eq!(parsed.container_id.as_deref(), Some("4b1f9c"));
    }

    #[test]
    fn kubelet_path_cgroupfs_driver() {
        let parsed = parse_kubelet_path("/kubepods/besteffort/pod1234-abcd/8a7b6c");
        assert_eq!(parsed.pod_uid.as_deref(), Some("1234-abcd"));
        assert_eq!(parsed.container_id.as_deref(), Some("8a7b6c"));
    }

    #[test]
    fn kubelet_path_outside_pods() {
        assert_eq!(
            parse_kubelet_path("/system.slice/kubelet.service"),
            KubeletPath::default()
        );
    }
}
