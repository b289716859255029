//! Types shared by the eBPF programs and the user-space daemon: map names, keys, values and
//! the constants both sides must agree on.
//!
//! Every type is `#[repr(C)]` with fixed-width fields and explicit padding, and its size is
//! checked at compile time, because the kernel and user space read the same bytes. Byte order
//! is stated per field: addresses stay in network byte order as the kernel hands them over,
//! ports are kept in host byte order so both sides compare plain numbers.
//!
//! IPv4 addresses are stored in the IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) in a `[u32; 4]`,
//! so one key type serves both families and an IPv6 socket dialing a mapped address matches
//! the same entry as an IPv4 socket.
#![no_std]

/// Name of the hash map from destination to target class (`TargetKey` -> `TargetValue`).
pub const MAP_TARGETS: &str = "TARGETS";
/// Name of the one-entry array map holding the `RedirectConfig`.
pub const MAP_CONFIG: &str = "CONFIG";
/// Name of the LRU map from socket cookie to the `OrigInfo` of a redirected connect.
pub const MAP_ORIG: &str = "ORIG";
/// Name of the LRU map from the client-side 4-tuple (`ConnKey`) to `OrigInfo`.
pub const MAP_CONN: &str = "CONN";
/// Name of the hash map of cgroup ids whose connects are never redirected.
pub const MAP_EXCLUDED_CGROUPS: &str = "EXCLUDED_CGROUPS";
/// Name of the per-CPU array of verdict counters, indexed by `Verdict`.
pub const MAP_STATS: &str = "STATS";

/// Program names, as the eBPF object exports them and as their links are pinned.
pub const PROG_CONNECT4: &str = "connect4";
pub const PROG_CONNECT6: &str = "connect6";
pub const PROG_SOCK_OPS: &str = "sock_ops";
pub const PROG_GETPEERNAME4: &str = "getpeername4";
pub const PROG_GETPEERNAME6: &str = "getpeername6";

/// Capacity of `TARGETS`: API server and database addresses of one cluster, with their
/// endpoints, stay far below this.
pub const TARGETS_MAX_ENTRIES: u32 = 4096;
/// Capacity of `ORIG` and `CONN`: the number of redirected connections that can be open on a
/// node at once before the LRU starts evicting the oldest entries.
pub const CONN_MAX_ENTRIES: u32 = 65536;
/// Capacity of `EXCLUDED_CGROUPS`.
pub const EXCLUDED_CGROUPS_MAX_ENTRIES: u32 = 1024;
/// How many ancestors of the calling cgroup the connect hook checks against
/// `EXCLUDED_CGROUPS`, so excluding a pod's cgroup also excludes its containers.
pub const EXCLUDED_ANCESTOR_LEVELS: u32 = 12;

/// Address families as the kernel numbers them (`AF_INET`, `AF_INET6`).
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// `CONFIG` flag: redirection is on. When clear every connect passes unchanged.
pub const CONFIG_ENABLED: u32 = 1 << 0;
/// `CONFIG` flag: fail closed. When the heartbeat is stale, connects keep being redirected to
/// the (absent) proxy and so fail; when clear, they go direct.
pub const CONFIG_FAIL_CLOSED: u32 = 1 << 1;
/// `CONFIG` flag: `proxy_addr4` is set.
pub const CONFIG_HAS_V4: u32 = 1 << 2;
/// `CONFIG` flag: `proxy_addr6` is set.
pub const CONFIG_HAS_V6: u32 = 1 << 3;

/// Protocol class of a target, deciding which handler the proxy hands the connection to.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetClass {
    Tcp = 0,
    KubeApi = 1,
    Postgres = 2,
    Mysql = 3,
}

impl TryFrom<u8> for TargetClass {
    type Error = u8;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        match value {
            0 => Ok(Self::Tcp),
            1 => Ok(Self::KubeApi),
            2 => Ok(Self::Postgres),
            3 => Ok(Self::Mysql),
            other => Err(other),
        }
    }
}

/// Key of `TARGETS`: one destination address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TargetKey {
    /// Destination address, network byte order, IPv4 in mapped form.
    pub addr: [u32; 4],
    /// Destination port, host byte order.
    pub port: u16,
    /// `AF_INET` for IPv4 and mapped IPv4, `AF_INET6` otherwise.
    pub family: u16,
}

/// Value of `TARGETS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetValue {
    /// A `TargetClass` discriminant.
    pub class: u8,
    pub _pad: [u8; 3],
    /// Index of the target in the daemon's configuration, for naming it in recordings.
    pub target_id: u32,
}

/// The single entry of `CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectConfig {
    /// `CONFIG_*` flags.
    pub flags: u32,
    /// Proxy IPv4 address, network byte order.
    pub proxy_addr4: u32,
    /// Proxy IPv6 address, network byte order per word.
    pub proxy_addr6: [u32; 4],
    /// Proxy port for IPv4 (and mapped IPv4) connects, host byte order.
    pub proxy_port4: u16,
    /// Proxy port for IPv6 connects, host byte order.
    pub proxy_port6: u16,
    /// `SO_MARK` the proxy sets on its upstream sockets; connects carrying it pass unchanged.
    pub mark: u32,
    /// Cookie of the host network namespace; connects made from it pass unchanged.
    pub host_netns_cookie: u64,
    /// `CLOCK_MONOTONIC` time of the daemon's last heartbeat, in nanoseconds.
    pub heartbeat_ns: u64,
    /// Age after which the heartbeat counts as stale and the fail mode applies, in nanoseconds.
    pub stale_after_ns: u64,
}

/// Original destination and caller of a redirected connect, as the connect hook stored them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigInfo {
    /// Original destination address, network byte order, IPv4 in mapped form.
    pub orig_addr: [u32; 4],
    /// Original destination port, host byte order.
    pub orig_port: u16,
    /// `AF_INET` when the destination is IPv4 (also when dialed as mapped IPv6).
    pub family: u16,
    /// `TargetValue::target_id` of the matched target.
    pub target_id: u32,
    /// `TargetValue::class` of the matched target.
    pub class: u8,
    pub _pad: [u8; 7],
    /// cgroup v2 id (the directory's inode number) of the connecting process.
    pub cgroup_id: u64,
    /// Cookie of the connecting socket's network namespace.
    pub netns_cookie: u64,
    /// `bpf_get_current_pid_tgid()`: thread group id in the upper 32 bits.
    pub pid_tgid: u64,
    /// `bpf_get_current_uid_gid()`: gid in the upper 32 bits, uid in the lower.
    pub uid_gid: u64,
}

/// Key of `CONN`: a redirected connection's 4-tuple from the client's side, which is also the
/// peer and local address of the proxy's accepted socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Client address, network byte order, IPv4 in mapped form.
    pub client_addr: [u32; 4],
    /// Proxy address the client is connected to, network byte order, IPv4 in mapped form.
    pub proxy_addr: [u32; 4],
    /// Client port, host byte order.
    pub client_port: u16,
    /// Proxy port, host byte order.
    pub proxy_port: u16,
}

/// Index into `STATS`: one counter per connect-hook verdict.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Redirected = 0,
    PassDisabled = 1,
    PassStaleHeartbeat = 2,
    PassHostNetns = 3,
    PassMarked = 4,
    PassExcludedCgroup = 5,
    PassNotTarget = 6,
    PassAlreadyProxy = 7,
    PassNotTcp = 8,
    /// Redirected although the heartbeat is stale, because the fail mode is closed.
    RedirectedStale = 9,
}

/// Number of `Verdict` values, the length of `STATS`.
pub const VERDICT_COUNT: u32 = 10;

/// Builds the mapped IPv6 form of an IPv4 address given in network byte order.
#[inline(always)]
pub const fn mapped_v4(addr_be: u32) -> [u32; 4] {
    [0, 0, u32::from_be(0x0000_ffff), addr_be]
}

/// Tells whether a network-byte-order IPv6 address is an IPv4-mapped one.
#[inline(always)]
pub const fn is_mapped_v4(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_be(0x0000_ffff)
}

const _: () = assert!(core::mem::size_of::<TargetKey>() == 20);
const _: () = assert!(core::mem::size_of::<TargetValue>() == 8);
const _: () = assert!(core::mem::size_of::<RedirectConfig>() == 56);
const _: () = assert!(core::mem::size_of::<OrigInfo>() == 64);
const _: () = assert!(core::mem::size_of::<ConnKey>() == 36);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and byte arrays with
    // explicit padding fields, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::TargetKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TargetValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RedirectConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnKey {}
}
