//! Loading, attaching, pinning and adopting the eBPF programs, and the maps the daemon keeps
//! filled: `TARGETS`, `CONFIG` (with the heartbeat), `EXCLUDED_CGROUPS`, and `CONN`, which the
//! proxy reads on every accept.
//!
//! Links and maps are pinned under the configured bpffs directory (`maps/` and `links/`), so
//! they outlive the daemon. A restarted daemon loads the embedded programs against the pinned
//! maps and swaps each pinned link over to its new program with `BPF_LINK_UPDATE`, which the
//! kernel does atomically: at no point is a hook left empty. `uninstall` removes the pins,
//! which detaches the programs and frees the maps.

use std::{
    collections::BTreeMap,
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, ProgramType, SockOps, links::FdLink,
    },
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};
use gateway_common::{
    AF_INET, AF_INET6, CONFIG_ENABLED, CONFIG_FAIL_CLOSED, CONFIG_HAS_V4, CONFIG_HAS_V6, ConnKey,
    MAP_CONFIG, MAP_CONN, MAP_EXCLUDED_CGROUPS, MAP_STATS, MAP_TARGETS, OrigInfo, PROG_CONNECT4,
    PROG_CONNECT6, PROG_GETPEERNAME4, PROG_GETPEERNAME6, PROG_SOCK_OPS, RedirectConfig, TargetKey,
    TargetValue, VERDICT_COUNT, mapped_v4,
};
use tracing::{info, warn};

use crate::{
    cgroup::{self, CgroupError, CgroupMounts},
    config::{Config, FailMode},
    sys::{self, AttachType, BPF_F_ALLOW_MULTI, BPF_F_ALLOW_OVERRIDE},
};

/// The eBPF object built from `gateway-ebpf` by `build.rs`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway-ebpf"));

/// Mount table the cgroup2 mount is read from.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// The conventional bpffs mount point, which the daemon mounts when nothing is there.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// The programs and the hooks they go on, in attach order: `sock_ops` and `getpeername` first,
/// so every redirected connect is already followed up when `connect` starts redirecting.
const PROGRAMS: [(&str, AttachType); 5] = [
    (PROG_SOCK_OPS, AttachType::SockOps),
    (PROG_GETPEERNAME4, AttachType::Inet4Getpeername),
    (PROG_GETPEERNAME6, AttachType::Inet6Getpeername),
    (PROG_CONNECT4, AttachType::Inet4Connect),
    (PROG_CONNECT6, AttachType::Inet6Connect),
];

/// Errors of the redirect data path.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The cgroup named by `redirect.cgroup` does not exist.
    #[error(
        "redirect.cgroup {configured} is invalid (set it to the cgroup that holds the pods, \
         absolute or relative to the cgroup2 mount)"
    )]
    ConfiguredCgroup {
        configured: PathBuf,
        source: CgroupError,
    },
    /// The kernel lacks a program type, map type or helper the programs need.
    #[error(
        "this kernel cannot run the gateway's eBPF programs: missing {}; the gateway needs \
         Linux 5.15 or later with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF",
        missing.join(", ")
    )]
    KernelProbe { missing: Vec<String> },
    /// Probing itself failed (typically: no permission to use `bpf()`).
    #[error(
        "failed to probe the kernel for {feature}: {message}; run gatewayd as root or with \
         CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON. \"Operation not permitted\" in a container that \
         has these capabilities means the runtime's seccomp profile blocks bpf(): podman's and \
         CRI-O's default profile allows it only with CAP_SYS_ADMIN (docs/operating.md)"
    )]
    ProbeFailed { feature: String, message: String },
    /// The pin directory is not on a bpffs and none could be mounted.
    #[error(
        "{path} is not on a bpf filesystem: {message}; mount one with `mount -t bpf bpf /sys/fs/bpf`"
    )]
    NotBpffs { path: PathBuf, message: String },
    /// An ancestor of the pods cgroup has an exclusive attachment, so the kernel rejects ours.
    #[error(
        "cgroup {cgroup} has an exclusive {hook:?} program attached (attached without \
         BPF_F_ALLOW_MULTI or BPF_F_ALLOW_OVERRIDE), so the kernel rejects programs on the cgroups \
         below it; find it with `bpftool cgroup show {cgroup}` and reattach it with multi mode"
    )]
    ExclusiveAncestor { cgroup: PathBuf, hook: AttachType },
    /// The embedded object could not be parsed or a map could not be created or reused.
    #[error("failed to load the eBPF object")]
    Object {
        #[source]
        source: aya::EbpfError,
    },
    /// The verifier rejected a program.
    #[error("the kernel rejected eBPF program {program}")]
    Load {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    /// Attaching a program to the cgroup failed.
    #[error("failed to attach {program} to cgroup {cgroup}")]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        #[source]
        source: ProgramError,
    },
    /// A map or link pin operation failed.
    #[error("failed to {action} {path}")]
    Pin {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A map the object should contain is missing or has the wrong type.
    #[error("eBPF map {name}: {message}")]
    Map { name: &'static str, message: String },
    /// Reading or writing a map failed.
    #[error("failed to update eBPF map {name}")]
    MapUpdate {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// The daemon's own network namespace cookie could not be read.
    #[error(
        "failed to read this network namespace's cookie (SO_NETNS_COOKIE needs Linux 5.14 or later)"
    )]
    NetnsCookie {
        #[source]
        source: io::Error,
    },
}

/// Paths of the pinned objects under the bpffs directory.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.links().join(program)
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }
}

/// Kind of start the redirect made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartKind {
    /// Nothing was pinned: the programs were attached fresh.
    Installed,
    /// Pinned links were found and switched to the newly loaded programs.
    Adopted,
}

/// The attached data path: the map handles the daemon writes and reads while it runs.
pub struct Redirect {
    pub mounts: CgroupMounts,
    /// The cgroup the programs are attached to.
    pub cgroup: PathBuf,
    pub start_kind: StartKind,
    pins: PinLayout,
    base_config: RedirectConfig,
    config_map: Mutex<Array<MapData, RedirectConfig>>,
    conn_map: Mutex<BpfHashMap<MapData, ConnKey, OrigInfo>>,
    targets: Mutex<Targets>,
    /// The loaded programs, kept so that a link detached from outside can be made again.
    ebpf: Mutex<Ebpf>,
}

/// `TARGETS` and what it should hold: the configured addresses, and the addresses of each
/// Service target as last seen in the cluster.
struct Targets {
    map: BpfHashMap<MapData, TargetKey, TargetValue>,
    fixed: Vec<(TargetKey, TargetValue)>,
    from_cluster: BTreeMap<u32, Vec<(TargetKey, TargetValue)>>,
}

impl Targets {
    /// Writes every wanted entry, then removes the others, so an entry wanted before and after
    /// never disappears in between.
    fn sync(&mut self) -> Result<(), RedirectError> {
        let wanted: Vec<(TargetKey, TargetValue)> = self
            .fixed
            .iter()
            .chain(self.from_cluster.values().flatten())
            .copied()
            .collect();
        for (key, value) in &wanted {
            self.map
                .insert(key, value, 0)
                .map_err(|source| RedirectError::MapUpdate {
                    name: MAP_TARGETS,
                    source,
                })?;
        }
        let keys: Vec<TargetKey> = wanted.iter().map(|(key, _)| *key).collect();
        remove_unwanted(&mut self.map, &keys);
        Ok(())
    }
}

impl std::fmt::Debug for Redirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirect")
            .field("cgroup", &self.cgroup)
            .field("start_kind", &self.start_kind)
            .field("pins", &self.pins)
            .finish_non_exhaustive()
    }
}

impl Redirect {
    /// Probes the kernel, loads the programs, fills the maps and attaches (or adopts) the
    /// links. On return connects towards the configured targets are being redirected.
    pub fn start(config: &Config) -> Result<Self, RedirectError> {
        let mounts = cgroup::find_mounts(Path::new(MOUNTINFO))?;
        if !mounts.v1.is_empty() {
            warn!(
                cgroup2 = %mounts.unified.display(),
                v1_mounts = mounts.v1.len(),
                "hybrid cgroup host: cgroup v1 controllers are mounted beside cgroup2; pods whose \
                 processes are not placed in the cgroup2 hierarchy will not be redirected"
            );
        }
        let cgroup = configured_cgroup(&mounts, config)?;

        probe_kernel()?;
        let pins = PinLayout::new(&config.redirect.bpffs);
        ensure_bpffs(&pins.root)?;
        for dir in [pins.maps(), pins.links()] {
            fs::create_dir_all(&dir).map_err(|source| RedirectError::Pin {
                action: "create directory",
                path: dir.clone(),
                source,
            })?;
        }

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pins.maps())
            .load(EBPF_OBJECT)
            .map_err(|source| RedirectError::Object { source })?;

        let base_config = kernel_config(config)?;
        let mut config_map: Array<MapData, RedirectConfig> = take_map(&mut ebpf, MAP_CONFIG)?;
        write_config(&mut config_map, &base_config, sys::monotonic_ns())?;
        let mut targets = Targets {
            map: take_map(&mut ebpf, MAP_TARGETS)?,
            fixed: fixed_targets(config),
            from_cluster: BTreeMap::new(),
        };
        targets.sync()?;
        let mut excluded: BpfHashMap<MapData, u64, u8> = take_map(&mut ebpf, MAP_EXCLUDED_CGROUPS)?;
        sync_excluded(&mut excluded, &mounts, config)?;
        let conn_map: BpfHashMap<MapData, ConnKey, OrigInfo> = take_map(&mut ebpf, MAP_CONN)?;

        let start_kind = attach_all(&mut ebpf, &pins, &cgroup)?;
        info!(
            cgroup = %cgroup.display(),
            bpffs = %pins.root.display(),
            adopted = start_kind == StartKind::Adopted,
            "redirect programs attached"
        );

        Ok(Self {
            mounts,
            cgroup,
            start_kind,
            pins,
            base_config,
            config_map: Mutex::new(config_map),
            conn_map: Mutex::new(conn_map),
            targets: Mutex::new(targets),
            ebpf: Mutex::new(ebpf),
        })
    }

    /// Makes `addresses` the redirected addresses of the Service target `target_id` (its index
    /// in the configuration), replacing the ones set before.
    pub fn set_service_addresses(
        &self,
        target_id: u32,
        class: crate::config::TargetClass,
        addresses: &[SocketAddr],
    ) -> Result<(), RedirectError> {
        let entries = addresses
            .iter()
            .map(|addr| target_entry(*addr, class, target_id))
            .collect();
        let mut targets = self.targets.lock().expect("targets map lock poisoned");
        targets.from_cluster.insert(target_id, entries);
        targets.sync()
    }

    /// Returns the addresses in `TARGETS` for target `target_id`, sorted.
    pub fn target_addresses(&self, target_id: u32) -> Vec<SocketAddr> {
        let targets = self.targets.lock().expect("targets map lock poisoned");
        let mut addresses: Vec<SocketAddr> = targets
            .fixed
            .iter()
            .chain(targets.from_cluster.values().flatten())
            .filter(|(_, value)| value.target_id == target_id)
            .map(|(key, _)| socket_addr_of(key.addr, key.port))
            .collect();
        addresses.sort();
        addresses
    }

    /// Checks every program's pinned link against the kernel's view of the attach cgroup.
    pub fn attachments(&self) -> Vec<ProgramAttachment> {
        check_attachments(&self.pins, Some(&self.cgroup))
    }

    /// Attaches `program` to the cgroup with a new link and pins it in place of the old pin.
    /// For a program whose link was detached or unpinned from outside the daemon.
    pub fn reattach(&self, program: &str) -> Result<(), RedirectError> {
        let Some(&(name, hook)) = PROGRAMS.iter().find(|(name, _)| *name == program) else {
            return Err(RedirectError::Map {
                name: "programs",
                message: format!("{program} is not one of the gateway's programs"),
            });
        };
        let cgroup_dir = fs::File::open(&self.cgroup).map_err(|source| CgroupError::NotFound {
            path: self.cgroup.clone(),
            source,
        })?;
        let mut ebpf = self.ebpf.lock().expect("eBPF object lock poisoned");
        let loaded = gateway_program(&mut ebpf, name)?;
        let link_path = self.pins.link(name);
        let attach_error = |source| RedirectError::Attach {
            program: name,
            cgroup: self.cgroup.clone(),
            source,
        };
        let link_error = |error: aya::programs::links::LinkError| RedirectError::Pin {
            action: "take the link of",
            path: link_path.clone(),
            source: io::Error::other(error.to_string()),
        };
        let new_link = if hook == AttachType::SockOps {
            let loaded: &mut SockOps = loaded.try_into().map_err(attach_error)?;
            let id = loaded
                .attach(&cgroup_dir, CgroupAttachMode::Single)
                .map_err(attach_error)?;
            FdLink::try_from(loaded.take_link(id).map_err(attach_error)?).map_err(link_error)?
        } else {
            let loaded: &mut CgroupSockAddr = loaded.try_into().map_err(attach_error)?;
            let id = loaded
                .attach(&cgroup_dir, CgroupAttachMode::Single)
                .map_err(attach_error)?;
            FdLink::try_from(loaded.take_link(id).map_err(attach_error)?).map_err(link_error)?
        };

        // The old pin, if any, refers to a link that no longer redirects anything.
        fs::create_dir_all(self.pins.links()).map_err(|source| RedirectError::Pin {
            action: "create directory",
            path: self.pins.links(),
            source,
        })?;
        if link_path.exists() {
            remove_pin(&link_path)?;
        }
        new_link
            .pin(&link_path)
            .map_err(|error| RedirectError::Pin {
                action: "pin link at",
                path: link_path.clone(),
                source: io::Error::other(error.to_string()),
            })?;
        Ok(())
    }

    /// Returns the age of the heartbeat in `CONFIG`, as the connect hook computes it, or `None`
    /// when the heartbeat was expired on purpose (a graceful stop in the open fail mode).
    pub fn heartbeat_age(&self) -> Result<Option<std::time::Duration>, RedirectError> {
        let map = self.config_map.lock().expect("config map lock poisoned");
        let value = map.get(&0, 0).map_err(|source| RedirectError::MapUpdate {
            name: MAP_CONFIG,
            source,
        })?;
        if value.heartbeat_ns == 0 {
            return Ok(None);
        }
        let age_ns = sys::monotonic_ns().saturating_sub(value.heartbeat_ns);
        Ok(Some(std::time::Duration::from_nanos(age_ns)))
    }

    /// Refreshes the heartbeat in `CONFIG`.
    pub fn heartbeat(&self) -> Result<(), RedirectError> {
        let mut map = self.config_map.lock().expect("config map lock poisoned");
        write_config(&mut map, &self.base_config, sys::monotonic_ns())
    }

    /// Marks the heartbeat stale at once, so that in the open fail mode new connects go direct
    /// without waiting for the timeout. Used on a graceful stop.
    pub fn expire_heartbeat(&self) -> Result<(), RedirectError> {
        let mut map = self.config_map.lock().expect("config map lock poisoned");
        write_config(&mut map, &self.base_config, 0)
    }

    /// Takes the original-destination entry of an accepted connection out of `CONN`.
    pub fn take_original(&self, client: SocketAddr, proxy: SocketAddr) -> Option<OrigInfo> {
        let key = conn_key(client, proxy);
        let mut map = self.conn_map.lock().expect("conn map lock poisoned");
        let info = map.get(&key, 0).ok()?;
        // The entry is single-use; sock_ops would also remove it when the client closes.
        let _ = map.remove(&key);
        Some(info)
    }

    pub fn pins(&self) -> &PinLayout {
        &self.pins
    }
}

/// Resolves the cgroup to attach to: `redirect.cgroup` when set, else the kubelet's pods
/// cgroup.
pub fn configured_cgroup(mounts: &CgroupMounts, config: &Config) -> Result<PathBuf, RedirectError> {
    match &config.redirect.cgroup {
        Some(configured) => cgroup::resolve(&mounts.unified, configured).map_err(|error| {
            RedirectError::ConfiguredCgroup {
                configured: configured.clone(),
                source: error,
            }
        }),
        None => Ok(cgroup::detect_kubepods(&mounts.unified)?),
    }
}

/// Builds the `CONN` key for an accepted connection: the peer is the client, the local
/// address the proxy.
pub fn conn_key(client: SocketAddr, proxy: SocketAddr) -> ConnKey {
    ConnKey {
        client_addr: kernel_addr(client.ip()),
        proxy_addr: kernel_addr(proxy.ip()),
        client_port: client.port(),
        proxy_port: proxy.port(),
    }
}

/// Converts an address to the kernel form used in keys: network byte order words, IPv4 in
/// mapped form.
pub fn kernel_addr(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => mapped_v4(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let octets = v6.octets();
            let mut words = [0u32; 4];
            for (i, word) in words.iter_mut().enumerate() {
                *word = u32::from_ne_bytes(octets[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
            }
            words
        }
    }
}

/// Converts a kernel-form address back; mapped IPv4 comes back as IPv4.
pub fn socket_addr_of(addr: [u32; 4], port: u16) -> SocketAddr {
    let mut octets = [0u8; 16];
    for (i, word) in addr.iter().enumerate() {
        octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(octets);
    match v6.to_ipv4_mapped() {
        Some(v4) => SocketAddr::new(IpAddr::V4(v4), port),
        None => SocketAddr::new(IpAddr::V6(v6), port),
    }
}

fn kernel_config(config: &Config) -> Result<RedirectConfig, RedirectError> {
    let mut flags = 0;
    if config.redirect.enabled {
        flags |= CONFIG_ENABLED;
    }
    if config.redirect.fail_mode == FailMode::Closed {
        flags |= CONFIG_FAIL_CLOSED;
    }
    let (proxy_addr4, proxy_port4) = match config.proxy.listen_v4 {
        Some(addr) => {
            flags |= CONFIG_HAS_V4;
            (u32::from_ne_bytes(addr.ip().octets()), addr.port())
        }
        None => (0, 0),
    };
    let (proxy_addr6, proxy_port6) = match config.proxy.listen_v6 {
        Some(addr) => {
            flags |= CONFIG_HAS_V6;
            (kernel_addr(IpAddr::V6(*addr.ip())), addr.port())
        }
        None => ([0; 4], 0),
    };

    // The daemon runs in the host network namespace (hostNetwork: true), so its own cookie is
    // the one to exempt.
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|source| RedirectError::NetnsCookie { source })?;
    let host_netns_cookie =
        sys::netns_cookie(probe.as_fd()).map_err(|source| RedirectError::NetnsCookie { source })?;

    Ok(RedirectConfig {
        flags,
        proxy_addr4,
        proxy_addr6,
        proxy_port4,
        proxy_port6,
        mark: config.redirect.mark,
        host_netns_cookie,
        heartbeat_ns: 0,
        stale_after_ns: config.redirect.heartbeat_timeout.as_nanos() as u64,
    })
}

fn write_config(
    map: &mut Array<MapData, RedirectConfig>,
    base: &RedirectConfig,
    heartbeat_ns: u64,
) -> Result<(), RedirectError> {
    let value = RedirectConfig {
        heartbeat_ns,
        ..*base
    };
    map.set(0, value, 0)
        .map_err(|source| RedirectError::MapUpdate {
            name: MAP_CONFIG,
            source,
        })
}

/// Returns the `TARGETS` entries of the targets configured by address; Service targets get
/// theirs from the cluster.
fn fixed_targets(config: &Config) -> Vec<(TargetKey, TargetValue)> {
    config
        .targets
        .iter()
        .enumerate()
        .filter_map(|(index, target)| {
            let addr = target.socket_addr()?;
            Some(target_entry(addr, target.class, index as u32))
        })
        .collect()
}

/// Builds the `TARGETS` entry that sends connects to `addr` to the handler of `class`.
fn target_entry(
    addr: SocketAddr,
    class: crate::config::TargetClass,
    target_id: u32,
) -> (TargetKey, TargetValue) {
    let family = match addr.ip() {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    };
    let key = TargetKey {
        addr: kernel_addr(addr.ip()),
        port: addr.port(),
        family,
    };
    let value = TargetValue {
        class: class.to_kernel() as u8,
        _pad: [0; 3],
        target_id,
    };
    (key, value)
}

fn sync_excluded(
    map: &mut BpfHashMap<MapData, u64, u8>,
    mounts: &CgroupMounts,
    config: &Config,
) -> Result<(), RedirectError> {
    let mut wanted = Vec::new();
    for configured in &config.redirect.exclude_cgroups {
        let path = cgroup::resolve(&mounts.unified, configured)?;
        let id = cgroup::cgroup_id(&path)?;
        map.insert(id, 1, 0)
            .map_err(|source| RedirectError::MapUpdate {
                name: MAP_EXCLUDED_CGROUPS,
                source,
            })?;
        wanted.push(id);
    }
    remove_unwanted(map, &wanted);
    Ok(())
}

/// Removes every key of `map` that is not in `wanted`, after the wanted ones were inserted, so
/// an entry present before and after a reconcile never disappears in between.
fn remove_unwanted<K: aya::Pod + PartialEq, V: aya::Pod>(
    map: &mut BpfHashMap<MapData, K, V>,
    wanted: &[K],
) {
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|key| !wanted.contains(key))
        .collect();
    for key in stale {
        let _ = map.remove(&key);
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, RedirectError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| RedirectError::Map {
        name,
        message: "not found in the eBPF object".into(),
    })?;
    T::try_from(map).map_err(|error| RedirectError::Map {
        name,
        message: format!(
            "{error}; a pinned map from an incompatible version may be in the way: run \
             `gatewayd uninstall` and start again"
        ),
    })
}

/// Checks that the kernel has every program type, map type and helper the programs use, and
/// names all that are missing at once.
pub fn probe_kernel() -> Result<(), RedirectError> {
    // The chain keeps the OS error ("Operation not permitted"), which aya's top-level message
    // ("`bpf_prog_load` failed") leaves out.
    let failed = |feature: &str, error: &dyn std::error::Error| RedirectError::ProbeFailed {
        feature: feature.to_string(),
        message: crate::error_chain(error),
    };
    let mut missing = Vec::new();

    for (program_type, name) in [
        (ProgramType::CgroupSockAddr, "program type cgroup_sock_addr"),
        (ProgramType::SockOps, "program type sock_ops"),
    ] {
        match is_program_supported(program_type) {
            Ok(true) => {}
            Ok(false) => missing.push(name.to_string()),
            Err(error) => return Err(failed(name, &error)),
        }
    }
    for (map_type, name) in [
        (aya::maps::MapType::LruHash, "map type lru_hash"),
        (aya::maps::MapType::PerCpuArray, "map type percpu_array"),
    ] {
        match is_map_supported(map_type) {
            Ok(true) => {}
            Ok(false) => missing.push(name.to_string()),
            Err(error) => return Err(failed(name, &error)),
        }
    }
    if !missing.is_empty() {
        return Err(RedirectError::KernelProbe { missing });
    }

    let helpers = [
        (
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_netns_cookie,
            "bpf_get_netns_cookie in cgroup_sock_addr (Linux 5.7)",
        ),
        (
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_socket_cookie,
            "bpf_get_socket_cookie in cgroup_sock_addr",
        ),
        (
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_current_cgroup_id,
            "bpf_get_current_cgroup_id in cgroup_sock_addr",
        ),
        (
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id,
            "bpf_get_current_ancestor_cgroup_id in cgroup_sock_addr",
        ),
        (
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_current_pid_tgid,
            "bpf_get_current_pid_tgid in cgroup_sock_addr",
        ),
        (
            ProgramType::SockOps,
            BpfHelper::BPF_FUNC_get_socket_cookie,
            "bpf_get_socket_cookie in sock_ops",
        ),
        (
            ProgramType::SockOps,
            BpfHelper::BPF_FUNC_sock_ops_cb_flags_set,
            "bpf_sock_ops_cb_flags_set in sock_ops",
        ),
    ];
    for (program_type, helper, name) in helpers {
        match is_helper_supported(program_type, helper) {
            Ok(true) => {}
            Ok(false) => missing.push(name.to_string()),
            Err(error) => return Err(failed(name, &error)),
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(RedirectError::KernelProbe { missing })
    }
}

/// Makes sure `dir` lives on a bpffs, mounting one at `/sys/fs/bpf` when that is where `dir`
/// is meant to be and nothing is mounted there yet.
fn ensure_bpffs(dir: &Path) -> Result<(), RedirectError> {
    let not_bpffs = |message: String| RedirectError::NotBpffs {
        path: dir.to_path_buf(),
        message,
    };
    let existing = nearest_existing(dir);
    let on_bpffs = sys::filesystem_type(&existing)
        .map_err(|error| not_bpffs(format!("statfs {} failed: {error}", existing.display())))?
        == sys::BPF_FS_MAGIC;
    if on_bpffs {
        return Ok(());
    }

    let mount_point = Path::new(BPFFS_MOUNT);
    if !dir.starts_with(mount_point) {
        return Err(not_bpffs(format!(
            "{} is on another filesystem",
            existing.display()
        )));
    }
    fs::create_dir_all(mount_point).map_err(|error| {
        not_bpffs(format!(
            "failed to create {}: {error}",
            mount_point.display()
        ))
    })?;
    sys::mount_bpffs(mount_point).map_err(|error| {
        not_bpffs(format!(
            "mounting bpffs at {} failed: {error}",
            mount_point.display()
        ))
    })?;
    info!(path = BPFFS_MOUNT, "mounted bpffs");
    Ok(())
}

fn nearest_existing(path: &Path) -> PathBuf {
    let mut current = path.to_path_buf();
    while !current.exists() {
        match current.parent() {
            Some(parent) => current = parent.to_path_buf(),
            None => break,
        }
    }
    current
}

/// Looks up program `name` in the eBPF object.
fn gateway_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::Program, RedirectError> {
    ebpf.program_mut(name).ok_or_else(|| RedirectError::Map {
        name,
        message: "program not found in the eBPF object".into(),
    })
}

/// Loads each program and puts it on its hook. A pinned link on the same cgroup is switched to
/// the new program in place, and otherwise a new link is created and pinned.
fn attach_all(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
    cgroup: &Path,
) -> Result<StartKind, RedirectError> {
    let cgroup_dir = fs::File::open(cgroup).map_err(|source| CgroupError::NotFound {
        path: cgroup.to_path_buf(),
        source,
    })?;
    let cgroup_id = cgroup::cgroup_id(cgroup)?;
    let mut adopted_all = true;

    // Every program is loaded, and so verified, before any is attached: a program the verifier
    // rejects (connect4 without CAP_PERFMON) leaves the cgroup's hooks as they were.
    for (name, hook) in PROGRAMS {
        let program = gateway_program(ebpf, name)?;
        let load = |source| RedirectError::Load {
            program: name,
            source,
        };
        if hook == AttachType::SockOps {
            let program: &mut SockOps = program.try_into().map_err(load)?;
            program.load().map_err(load)?;
        } else {
            let program: &mut CgroupSockAddr = program.try_into().map_err(load)?;
            program.load().map_err(load)?;
        }
    }

    for (name, hook) in PROGRAMS {
        let program = gateway_program(ebpf, name)?;
        let load = |source| RedirectError::Load {
            program: name,
            source,
        };

        let link_path = pins.link(name);
        let pinned = open_pinned_link(&link_path, cgroup_id)?;
        if pinned.is_none() {
            adopted_all = false;
            check_ancestors(cgroup, hook)?;
        }

        let attach_error = |source| RedirectError::Attach {
            program: name,
            cgroup: cgroup.to_path_buf(),
            source,
        };
        // SockOps and CgroupSockAddr share these steps but no trait, so a macro spells them once.
        macro_rules! load_and_attach {
            ($program_type:ty) => {{
                let program: &mut $program_type = program.try_into().map_err(load)?;
                if let Some(link) = &pinned {
                    update_link(link, program.fd().map_err(load)?.as_fd(), &link_path)?;
                    continue;
                }
                let id = program
                    .attach(&cgroup_dir, CgroupAttachMode::Single)
                    .map_err(attach_error)?;
                let link = program.take_link(id).map_err(attach_error)?;
                FdLink::try_from(link).map_err(|error| RedirectError::Pin {
                    action: "take the link of",
                    path: link_path.clone(),
                    source: io::Error::other(error.to_string()),
                })?
            }};
        }
        let new_link: FdLink = if hook == AttachType::SockOps {
            load_and_attach!(SockOps)
        } else {
            load_and_attach!(CgroupSockAddr)
        };

        // A stale pin (link on another cgroup, or one whose cgroup is gone) is replaced only
        // after the new link is in place.
        if link_path.exists() {
            remove_pin(&link_path)?;
        }
        new_link
            .pin(&link_path)
            .map_err(|error| RedirectError::Pin {
                action: "pin link at",
                path: link_path.clone(),
                source: io::Error::other(error.to_string()),
            })?;
    }
    Ok(if adopted_all {
        StartKind::Adopted
    } else {
        StartKind::Installed
    })
}

/// Opens the link pinned at `path` if it is attached to cgroup `cgroup_id`. Returns `None`
/// when nothing is pinned or the pin belongs to another or a removed cgroup.
fn open_pinned_link(path: &Path, cgroup_id: u64) -> Result<Option<OwnedFd>, RedirectError> {
    if !path.exists() {
        return Ok(None);
    }
    let fd = sys::bpf_obj_get(path).map_err(|source| RedirectError::Pin {
        action: "open pinned link",
        path: path.to_path_buf(),
        source,
    })?;
    let info = sys::bpf_cgroup_link_info(fd.as_fd()).map_err(|source| RedirectError::Pin {
        action: "read pinned link",
        path: path.to_path_buf(),
        source,
    })?;
    if info.cgroup_id == cgroup_id {
        Ok(Some(fd))
    } else {
        warn!(
            link = %path.display(),
            pinned_cgroup_id = info.cgroup_id,
            configured_cgroup_id = cgroup_id,
            "pinned link is attached to another cgroup; attaching anew and replacing it"
        );
        Ok(None)
    }
}

fn update_link(
    link: &OwnedFd,
    program: std::os::fd::BorrowedFd<'_>,
    path: &Path,
) -> Result<(), RedirectError> {
    sys::bpf_link_update(link.as_fd(), program).map_err(|source| RedirectError::Pin {
        action: "switch pinned link to the new program at",
        path: path.to_path_buf(),
        source,
    })
}

/// Detaches a pinned link from its cgroup before its pin goes. Removing the pin alone
/// releases the link only when the kernel drops its last reference, which it may do later,
/// from a work queue; after an explicit detach the programs are off the cgroup when
/// `uninstall` returns.
fn detach_link(path: &Path) {
    match sys::bpf_obj_get(path).and_then(|link| sys::bpf_link_detach(link.as_fd())) {
        Ok(()) => {}
        Err(error) => {
            tracing::warn!(%error, pin = %path.display(), "failed to detach link; removing its pin anyway")
        }
    }
}

fn remove_pin(path: &Path) -> Result<(), RedirectError> {
    fs::remove_file(path).map_err(|source| RedirectError::Pin {
        action: "remove pin",
        path: path.to_path_buf(),
        source,
    })
}

/// Refuses to attach below a cgroup whose attachment for `hook` is exclusive, with a message
/// naming it, instead of the kernel's bare `EPERM`.
fn check_ancestors(cgroup: &Path, hook: AttachType) -> Result<(), RedirectError> {
    let mut current = cgroup.parent();
    while let Some(dir) = current {
        // Stop at the top of the cgroup2 mount.
        if sys::filesystem_type(dir).ok() != Some(sys::CGROUP2_SUPER_MAGIC) {
            break;
        }
        let Ok(file) = fs::File::open(dir) else {
            break;
        };
        if let Ok(attachments) = sys::bpf_prog_query(file.as_fd(), hook) {
            // The kernel decides at the nearest ancestor that has programs for the hook.
            if attachments.attach_flags & BPF_F_ALLOW_MULTI != 0 {
                return Ok(());
            }
            if attachments.program_count > 0 {
                if attachments.attach_flags & BPF_F_ALLOW_OVERRIDE != 0 {
                    return Ok(());
                }
                return Err(RedirectError::ExclusiveAncestor {
                    cgroup: dir.to_path_buf(),
                    hook,
                });
            }
        }
        current = dir.parent();
    }
    Ok(())
}

/// Pins removed by `uninstall`.
#[derive(Debug, Default)]
pub struct Uninstalled {
    pub links: Vec<PathBuf>,
    pub maps: Vec<PathBuf>,
}

/// Removes every pinned link (detaching its program) and map under `bpffs_dir`, then the
/// directories themselves. Running it again finds nothing and succeeds.
pub fn uninstall(bpffs_dir: &Path) -> Result<Uninstalled, RedirectError> {
    let pins = PinLayout::new(bpffs_dir);
    let mut removed = Uninstalled::default();
    for (dir, list) in [
        (pins.links(), &mut removed.links),
        (pins.maps(), &mut removed.maps),
    ] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if dir == pins.links() {
                detach_link(&path);
            }
            remove_pin(&path)?;
            list.push(path);
        }
        fs::remove_dir(&dir).map_err(|source| RedirectError::Pin {
            action: "remove directory",
            path: dir.clone(),
            source,
        })?;
    }
    if pins.root.exists() {
        fs::remove_dir(&pins.root).map_err(|source| RedirectError::Pin {
            action: "remove directory",
            path: pins.root.clone(),
            source,
        })?;
    }
    Ok(removed)
}

/// Attachment of one program, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProgramAttachment {
    pub program: String,
    /// Hook name as bpftool prints it (`connect4`, `sock_ops`, ...).
    pub hook: String,
    pub attached: bool,
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
    /// Id of the cgroup the link is attached to, 0 once the link is detached.
    pub cgroup_id: Option<u64>,
    /// Reason the program does not count as attached.
    pub problem: Option<String>,
}

/// Checks each program's pinned link in the kernel. A program counts as attached when its link
/// pin opens, the link is still attached to a cgroup, and, when `cgroup` is given, that cgroup
/// is `cgroup` and lists the link's program for the hook. A link detached with
/// `BPF_LINK_DETACH` (`bpftool link detach`) reports cgroup id 0, and an unpinned link is gone.
pub fn check_attachments(pins: &PinLayout, cgroup: Option<&Path>) -> Vec<ProgramAttachment> {
    PROGRAMS
        .iter()
        .map(|&(name, hook)| check_attachment(pins, cgroup, name, hook))
        .collect()
}

fn check_attachment(
    pins: &PinLayout,
    cgroup: Option<&Path>,
    name: &str,
    hook: AttachType,
) -> ProgramAttachment {
    let mut attachment = ProgramAttachment {
        program: name.to_string(),
        hook: hook.as_str().to_string(),
        attached: false,
        link_id: None,
        program_id: None,
        cgroup_id: None,
        problem: None,
    };
    let path = pins.link(name);
    let link = match sys::bpf_obj_get(&path) {
        Ok(link) => link,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            attachment.problem = Some(format!("link pin {} is missing", path.display()));
            return attachment;
        }
        Err(error) => {
            attachment.problem = Some(format!("failed to open {}: {error}", path.display()));
            return attachment;
        }
    };
    let info = match sys::bpf_cgroup_link_info(link.as_fd()) {
        Ok(info) => info,
        Err(error) => {
            attachment.problem = Some(format!("failed to read link {}: {error}", path.display()));
            return attachment;
        }
    };
    attachment.link_id = Some(info.link_id);
    attachment.program_id = Some(info.program_id);
    attachment.cgroup_id = Some(info.cgroup_id);
    if info.cgroup_id == 0 {
        attachment.problem = Some(format!("link {} is detached", info.link_id));
        return attachment;
    }

    if let Some(cgroup) = cgroup {
        let listed =
            fs::File::open(cgroup).and_then(|dir| sys::bpf_prog_query_ids(dir.as_fd(), hook));
        match listed {
            Ok(ids) if ids.contains(&info.program_id) => {}
            Ok(_) => {
                attachment.problem = Some(format!(
                    "program {} is not among the {} programs of {}",
                    info.program_id,
                    hook.as_str(),
                    cgroup.display()
                ));
                return attachment;
            }
            Err(error) => {
                attachment.problem = Some(format!(
                    "failed to query the {} programs of {}: {error}",
                    hook.as_str(),
                    cgroup.display()
                ));
                return attachment;
            }
        }
    }
    attachment.attached = true;
    attachment
}

/// Entries and capacity of a pinned map.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapFill {
    pub name: String,
    pub pin: PathBuf,
    pub entries: Option<u64>,
    /// `max_entries` of the map.
    pub capacity: Option<u32>,
    /// Reason the map could not be read.
    pub error: Option<String>,
}

/// Reads the fill of the maps that can run full: `CONN` (LRU, so a full map evicts the oldest
/// entries) and `TARGETS`.
///
/// NOTE: counting walks the keys with one `bpf()` call per entry, so each `/metrics` scrape of
/// a busy node makes up to `max_entries` of `CONN` (65536) system calls.
pub fn read_map_fills(bpffs_dir: &Path) -> Vec<MapFill> {
    let pins = PinLayout::new(bpffs_dir);
    [MAP_CONN, MAP_TARGETS]
        .into_iter()
        .map(|name| {
            let pin = pins.map(name);
            let mut fill = MapFill {
                name: name.to_string(),
                pin: pin.clone(),
                entries: None,
                capacity: None,
                error: None,
            };
            match count_map_entries(&pin, name) {
                Ok((entries, capacity)) => {
                    fill.entries = Some(entries);
                    fill.capacity = Some(capacity);
                }
                Err(error) => fill.error = Some(error),
            }
            fill
        })
        .collect()
}

/// Returns (entries, capacity) of the pinned hash map `name`.
fn count_map_entries(pin: &Path, name: &str) -> Result<(u64, u32), String> {
    let data = MapData::from_pin(pin)
        .map_err(|error| format!("failed to open {}: {error}", pin.display()))?;
    let capacity = data
        .info()
        .map_err(|error| format!("failed to read the map info of {}: {error}", pin.display()))?
        .max_entries();
    // A key removed while the keys are walked makes the kernel start over, so the walk is
    // bounded by the capacity.
    let limit = capacity as usize;
    let entries = if name == MAP_CONN {
        let map: BpfHashMap<MapData, ConnKey, OrigInfo> =
            BpfHashMap::try_from(aya::maps::Map::LruHashMap(data))
                .map_err(|error| error.to_string())?;
        map.keys().take(limit).filter(Result::is_ok).count()
    } else {
        let map: BpfHashMap<MapData, TargetKey, TargetValue> =
            BpfHashMap::try_from(aya::maps::Map::HashMap(data))
                .map_err(|error| error.to_string())?;
        map.keys().take(limit).filter(Result::is_ok).count()
    };
    Ok((entries as u64, capacity))
}

/// Connect-hook verdict counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Indexed by `gateway_common::Verdict`.
    pub verdicts: Vec<u64>,
}

impl Stats {
    pub fn get(&self, verdict: gateway_common::Verdict) -> u64 {
        self.verdicts.get(verdict as usize).copied().unwrap_or(0)
    }
}

/// Reads the verdict counters from the pinned `STATS` map.
pub fn read_stats(bpffs_dir: &Path) -> Result<Stats, RedirectError> {
    let path = PinLayout::new(bpffs_dir).map(MAP_STATS);
    if !path.exists() {
        return Err(RedirectError::Map {
            name: MAP_STATS,
            message: format!(
                "{} not found: gatewayd has not installed its programs here, or the pin \
                 directory is not {} (give another one with --bpffs)",
                path.display(),
                bpffs_dir.display()
            ),
        });
    }
    let data = MapData::from_pin(&path).map_err(|error| RedirectError::Map {
        name: MAP_STATS,
        message: format!("failed to open {}: {error}", path.display()),
    })?;
    let map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
        .map_err(|error| RedirectError::Map {
        name: MAP_STATS,
        message: error.to_string(),
    })?;
    let mut verdicts = Vec::with_capacity(VERDICT_COUNT as usize);
    for index in 0..VERDICT_COUNT {
        let per_cpu = map
            .get(&index, 0)
            .map_err(|source| RedirectError::MapUpdate {
                name: MAP_STATS,
                source,
            })?;
        verdicts.push(per_cpu.iter().sum());
    }
    Ok(Stats { verdicts })
}

/// Counts the programs attached directly to `cgroup` for `hook` (links included).
pub fn attached_program_count(cgroup: &Path, hook: AttachType) -> io::Result<u32> {
    let file = fs::File::open(cgroup)?;
    Ok(sys::bpf_prog_query(file.as_fd(), hook)?.program_count)
}

/// Formats an IPv4 address held in network byte order, for messages.
pub fn ipv4_of(addr_be: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr_be.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_addr_round_trip() {
        for text in ["10.1.2.3:80", "[fd00::1:2]:5432", "[::ffff:10.9.8.7]:443"] {
            let addr: SocketAddr = text.parse().expect("valid address");
            let back = socket_addr_of(kernel_addr(addr.ip()), addr.port());
            let expected = match addr {
                SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                    Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
                    None => addr,
                },
                SocketAddr::V4(_) => addr,
            };
            assert_eq!(back, expected, "{text}");
        }
    }

    #[test]
    fn kernel_addr_ipv4_is_mapped_network_order() {
        let words = kernel_addr("10.1.2.3".parse().expect("valid address"));
        assert_eq!(words[0], 0);
        assert_eq!(words[1], 0);
        assert_eq!(words[2].to_ne_bytes(), [0, 0, 0xff, 0xff]);
        assert_eq!(words[3].to_ne_bytes(), [10, 1, 2, 3]);
    }
}
