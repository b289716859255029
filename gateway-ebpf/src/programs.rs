//! The programs themselves; see the crate documentation for what each one does.

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};
use gateway_common::{
    AF_INET, AF_INET6, CONFIG_ENABLED, CONFIG_FAIL_CLOSED, CONFIG_HAS_V4, CONFIG_HAS_V6,
    CONN_MAX_ENTRIES, ConnKey, EXCLUDED_ANCESTOR_LEVELS, EXCLUDED_CGROUPS_MAX_ENTRIES, OrigInfo,
    RedirectConfig, TARGETS_MAX_ENTRIES, TargetKey, TargetValue, VERDICT_COUNT, Verdict,
    is_mapped_v4, mapped_v4,
};

/// `cgroup/connect*` and `getpeername*` return value that lets the call go on, with whatever
/// address the program wrote.
const ALLOW: i32 = 1;
/// Return value that fails the call with `EPERM`; used only in the closed fail mode.
const REJECT: i32 = 0;
const IPPROTO_TCP: u32 = 6;

#[map(name = "TARGETS")]
static TARGETS: HashMap<TargetKey, TargetValue> = HashMap::pinned(TARGETS_MAX_ENTRIES, 0);

#[map(name = "CONFIG")]
static CONFIG: Array<RedirectConfig> = Array::pinned(1, 0);

#[map(name = "ORIG")]
static ORIG: LruHashMap<u64, OrigInfo> = LruHashMap::pinned(CONN_MAX_ENTRIES, 0);

#[map(name = "CONN")]
static CONN: LruHashMap<ConnKey, OrigInfo> = LruHashMap::pinned(CONN_MAX_ENTRIES, 0);

#[map(name = "EXCLUDED_CGROUPS")]
static EXCLUDED_CGROUPS: HashMap<u64, u8> = HashMap::pinned(EXCLUDED_CGROUPS_MAX_ENTRIES, 0);

#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(VERDICT_COUNT, 0);

/// New destination of a redirected connect.
enum Rewrite {
    /// An IPv4 socket: write `user_ip4`.
    V4 { addr: u32, port: u16 },
    /// An IPv6 socket: write `user_ip6`, either the proxy's IPv6 address or, for a mapped IPv4
    /// destination, the proxy's IPv4 address in mapped form.
    V6 { addr: [u32; 4], port: u16 },
}

/// Outcome of the connect decision.
enum Decision {
    Pass(Verdict),
    Redirect(Verdict, Rewrite),
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr` for the whole call.
    let (protocol, addr, port) = unsafe { ((*sa).protocol, (*sa).user_ip4, (*sa).user_port) };
    if protocol != IPPROTO_TCP {
        count(Verdict::PassNotTcp);
        return ALLOW;
    }

    let key = TargetKey {
        addr: mapped_v4(addr),
        // `user_port` carries the port in network byte order in its low 16 bits.
        port: u16::from_be(port as u16),
        family: AF_INET,
    };
    apply_decision(&ctx, decide(&ctx, &key, false), write_v4)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr` for the whole call. Each
    // word gets its own volatile load, because the verifier only accepts context reads at
    // constant offsets and a copied array could become a loop.
    let (protocol, addr, port) = unsafe {
        (
            (*sa).protocol,
            [
                read_volatile(&raw const (*sa).user_ip6[0]),
                read_volatile(&raw const (*sa).user_ip6[1]),
                read_volatile(&raw const (*sa).user_ip6[2]),
                read_volatile(&raw const (*sa).user_ip6[3]),
            ],
            (*sa).user_port,
        )
    };
    if protocol != IPPROTO_TCP {
        count(Verdict::PassNotTcp);
        return ALLOW;
    }

    // A dual-stack socket dialing `::ffff:a.b.c.d` reaches an IPv4 peer, so it is matched
    // against the IPv4 targets.
    let mapped = is_mapped_v4(&addr);
    let key = TargetKey {
        addr,
        port: u16::from_be(port as u16),
        family: if mapped { AF_INET } else { AF_INET6 },
    };
    apply_decision(&ctx, decide(&ctx, &key, true), write_v6)
}

/// Writes the rewritten destination, or leaves the connect alone, and counts the verdict.
///
/// `write` stores the new destination. connect4 and connect6 each pass their own, because the
/// verifier rejects a store to a field the hook does not own (`user_ip6` in connect4) even on
/// a path that cannot run.
#[inline(always)]
fn apply_decision(
    ctx: &SockAddrContext,
    decision: Result<Decision, ()>,
    write: fn(&SockAddrContext, &Rewrite) -> bool,
) -> i32 {
    match decision {
        Ok(Decision::Pass(verdict)) => {
            // Not ours to touch: the connect goes where the application asked.
            count(verdict);
            ALLOW
        }
        Ok(Decision::Redirect(verdict, rewrite)) if write(ctx, &rewrite) => {
            count(verdict);
            ALLOW
        }
        Ok(Decision::Redirect(..)) | Err(()) => {
            // The connect is a target but could not be redirected (no configuration, no proxy
            // address of the family, or the original destination could not be stored). Open:
            // let it go direct. Closed: fail it, since letting it bypass the proxy would defeat
            // the gateway.
            match config() {
                Some(cfg) if cfg.flags & CONFIG_FAIL_CLOSED != 0 => REJECT,
                _ => ALLOW,
            }
        }
    }
}

#[inline(always)]
fn write_v4(ctx: &SockAddrContext, rewrite: &Rewrite) -> bool {
    let sa = ctx.sock_addr;
    match *rewrite {
        Rewrite::V4 { addr, port } => {
            // SAFETY: the kernel hands the program a valid `bpf_sock_addr`; the verifier allows
            // 4-byte writes to these fields in connect4.
            unsafe {
                (*sa).user_ip4 = addr;
                (*sa).user_port = u32::from(port.to_be());
            }
            true
        }
        Rewrite::V6 { .. } => false,
    }
}

#[inline(always)]
fn write_v6(ctx: &SockAddrContext, rewrite: &Rewrite) -> bool {
    let sa = ctx.sock_addr;
    match *rewrite {
        Rewrite::V6 { addr, port } => {
            // SAFETY: as in `write_v4`; each word of `user_ip6` gets its own 4-byte store.
            unsafe {
                (*sa).user_ip6[0] = addr[0];
                (*sa).user_ip6[1] = addr[1];
                (*sa).user_ip6[2] = addr[2];
                (*sa).user_ip6[3] = addr[3];
                (*sa).user_port = u32::from(port.to_be());
            }
            true
        }
        Rewrite::V4 { .. } => false,
    }
}

/// Decides whether a TCP connect to `key` is redirected, and to where.
#[inline(always)]
fn decide(ctx: &SockAddrContext, key: &TargetKey, socket_is_v6: bool) -> Result<Decision, ()> {
    let Some(cfg) = config() else {
        // No configuration yet: the daemon has not finished starting.
        return Ok(Decision::Pass(Verdict::PassDisabled));
    };
    if cfg.flags & CONFIG_ENABLED == 0 {
        // Redirection is switched off.
        return Ok(Decision::Pass(Verdict::PassDisabled));
    }
    if is_proxy(&cfg, key) {
        // Already aimed at the proxy; redirecting again would loop.
        return Ok(Decision::Pass(Verdict::PassAlreadyProxy));
    }

    // SAFETY: lookup of a plain-data value; the entry is only read.
    let Some(target) = (unsafe { TARGETS.get(key) }) else {
        // Not an address the gateway guards: the common case, kept cheap.
        return Ok(Decision::Pass(Verdict::PassNotTarget));
    };
    let target = *target;

    // SAFETY: `sk` is always set for connect programs and points at the connecting socket.
    let mark = unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).mark };
    if cfg.mark != 0 && mark == cfg.mark {
        // The proxy's own upstream connection, wherever it runs.
        return Ok(Decision::Pass(Verdict::PassMarked));
    }

    // SAFETY: the helper takes the program context it was called with.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns_cookie == cfg.host_netns_cookie {
        // Host-network pods and node daemons (the proxy included) are not redirected.
        return Ok(Decision::Pass(Verdict::PassHostNetns));
    }

    // SAFETY: the helper reads the current task's cgroup and has no preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if is_excluded(cgroup_id) {
        // The operator exempted this cgroup or one of its ancestors.
        return Ok(Decision::Pass(Verdict::PassExcludedCgroup));
    }

    let mut verdict = Verdict::Redirected;
    // SAFETY: the helper reads a clock and has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(cfg.heartbeat_ns) > cfg.stale_after_ns {
        if cfg.flags & CONFIG_FAIL_CLOSED == 0 {
            // The daemon looks dead and the fail mode is open: go direct rather than into a
            // proxy that may not be listening.
            return Ok(Decision::Pass(Verdict::PassStaleHeartbeat));
        }
        // Fail closed: keep redirecting, so the connect fails unless the proxy is back.
        verdict = Verdict::RedirectedStale;
    }

    let rewrite = if key.family == AF_INET {
        if cfg.flags & CONFIG_HAS_V4 == 0 {
            return Err(());
        }
        if socket_is_v6 {
            Rewrite::V6 {
                addr: mapped_v4(cfg.proxy_addr4),
                port: cfg.proxy_port4,
            }
        } else {
            Rewrite::V4 {
                addr: cfg.proxy_addr4,
                port: cfg.proxy_port4,
            }
        }
    } else {
        if cfg.flags & CONFIG_HAS_V6 == 0 {
            return Err(());
        }
        Rewrite::V6 {
            addr: cfg.proxy_addr6,
            port: cfg.proxy_port6,
        }
    };

    // SAFETY: the helpers read the current task and the program context; no preconditions.
    let (cookie, pid_tgid, uid_gid) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_current_pid_tgid(),
            bpf_get_current_uid_gid(),
        )
    };
    let orig = OrigInfo {
        orig_addr: key.addr,
        orig_port: key.port,
        family: key.family,
        target_id: target.target_id,
        class: target.class,
        _pad: [0; 7],
        cgroup_id,
        netns_cookie,
        pid_tgid,
        uid_gid,
    };
    ORIG.insert(cookie, orig, 0).map_err(|_| ())?;

    Ok(Decision::Redirect(verdict, rewrite))
}

#[inline(always)]
fn is_proxy(cfg: &RedirectConfig, key: &TargetKey) -> bool {
    if key.family == AF_INET {
        cfg.flags & CONFIG_HAS_V4 != 0
            && key.addr[3] == cfg.proxy_addr4
            && key.port == cfg.proxy_port4
    } else {
        cfg.flags & CONFIG_HAS_V6 != 0
            && key.addr[0] == cfg.proxy_addr6[0]
            && key.addr[1] == cfg.proxy_addr6[1]
            && key.addr[2] == cfg.proxy_addr6[2]
            && key.addr[3] == cfg.proxy_addr6[3]
            && key.port == cfg.proxy_port6
    }
}

/// Checks the calling cgroup and its ancestors against `EXCLUDED_CGROUPS`.
#[inline(always)]
fn is_excluded(cgroup_id: u64) -> bool {
    // SAFETY: lookup of a plain-data value; the entry is only read.
    if unsafe { EXCLUDED_CGROUPS.get(cgroup_id) }.is_some() {
        return true;
    }
    let mut level = 0;
    while level < EXCLUDED_ANCESTOR_LEVELS {
        // SAFETY: the helper returns 0 for a level deeper than the current cgroup.
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if ancestor == 0 {
            return false;
        }
        // SAFETY: as above.
        if unsafe { EXCLUDED_CGROUPS.get(ancestor) }.is_some() {
            return true;
        }
        level += 1;
    }
    false
}

#[inline(always)]
fn config() -> Option<RedirectConfig> {
    CONFIG.get(0).copied()
}

#[inline(always)]
fn count(verdict: Verdict) {
    if let Some(counter) = STATS.get_ptr_mut(verdict as u32) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array, which no other program
        // run writes concurrently.
        unsafe { *counter += 1 };
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the helper takes the program context it was called with.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: lookup of a plain-data value; the entry is only read.
    if let Some(orig) = unsafe { ORIG.get(cookie) } {
        // A redirected socket: show the peer the application dialed, not the proxy.
        // SAFETY: the kernel hands the program a valid `bpf_sock_addr`; these 4-byte writes
        // are allowed in getpeername programs.
        unsafe {
            (*sa).user_ip4 = orig.orig_addr[3];
            (*sa).user_port = u32::from(orig.orig_port.to_be());
        }
    }
    // getpeername must always succeed.
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the helper takes the program context it was called with.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: lookup of a plain-data value; the entry is only read.
    if let Some(orig) = unsafe { ORIG.get(cookie) } {
        // `orig_addr` is already in mapped form for an IPv4 peer, which is what an IPv6
        // socket reports for one.
        // SAFETY: as in `getpeername4`.
        unsafe {
            (*sa).user_ip6[0] = orig.orig_addr[0];
            (*sa).user_ip6[1] = orig.orig_addr[1];
            (*sa).user_ip6[2] = orig.orig_addr[2];
            (*sa).user_ip6[3] = orig.orig_addr[3];
            (*sa).user_port = u32::from(orig.orig_port.to_be());
        }
    }
    // getpeername must always succeed.
    ALLOW
}

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    try_sock_ops(&ctx);
    // The return value of sock_ops only matters for ops that ask for a reply; none here do.
    1
}

#[inline(always)]
fn try_sock_ops(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return;
    }

    if op != BPF_SOCK_OPS_STATE_CB && !dials_proxy_port(ctx) {
        // Connections that are not redirected are the common case, and a port comparison
        // spares them the cookie and hash lookups below. State callbacks only fire on sockets this
        // program flagged, which are all redirected.
        return;
    }

    // SAFETY: the helper takes the program context it was called with.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: lookup of a plain-data value; it is copied out at once.
    let Some(orig) = (unsafe { ORIG.get(cookie) }).copied() else {
        // Not a redirected socket.
        return;
    };

    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // Ask for state changes on this socket so its entries are removed when it closes,
        // including when the connect itself fails.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        return;
    }

    let key = conn_key(ctx);
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // This runs before the final ACK of the handshake is sent, so the entry is in place
        // before the proxy can accept the connection.
        let _ = CONN.insert(key, orig, 0);
        return;
    }

    // BPF_SOCK_OPS_STATE_CB: argument 1 is the new state.
    if ctx.arg(1) == BPF_TCP_CLOSE {
        let _ = CONN.remove(key);
        let _ = ORIG.remove(cookie);
    }
}

/// Tells whether the socket's remote port is one of the proxy's, as it is for every redirected
/// connect.
#[inline(always)]
fn dials_proxy_port(ctx: &SockOpsContext) -> bool {
    let Some(cfg) = config() else {
        return false;
    };
    // See `conn_key` for the byte order of `remote_port`.
    let port = u32::from_be(ctx.remote_port()) as u16;
    port == cfg.proxy_port4 || port == cfg.proxy_port6
}

/// Builds the `CONN` key from the socket's own view: local is the client, remote the proxy.
#[inline(always)]
fn conn_key(ctx: &SockOpsContext) -> ConnKey {
    let ops = ctx.ops;
    let (client_addr, proxy_addr) = if ctx.family() == u32::from(AF_INET) {
        (mapped_v4(ctx.local_ip4()), mapped_v4(ctx.remote_ip4()))
    } else {
        // SAFETY: `ops` is the valid context of this call. The words are read one by one with
        // volatile loads, so each access has the constant offset the verifier requires.
        unsafe {
            (
                [
                    read_volatile(&raw const (*ops).local_ip6[0]),
                    read_volatile(&raw const (*ops).local_ip6[1]),
                    read_volatile(&raw const (*ops).local_ip6[2]),
                    read_volatile(&raw const (*ops).local_ip6[3]),
                ],
                [
                    read_volatile(&raw const (*ops).remote_ip6[0]),
                    read_volatile(&raw const (*ops).remote_ip6[1]),
                    read_volatile(&raw const (*ops).remote_ip6[2]),
                    read_volatile(&raw const (*ops).remote_ip6[3]),
                ],
            )
        }
    };
    ConnKey {
        client_addr,
        proxy_addr,
        // `local_port` is in host byte order.
        client_port: ctx.local_port() as u16,
        // On little-endian hosts `remote_port` carries the network-byte-order port in the upper
        // half of the word, so reading the word as big-endian yields the port.
        proxy_port: u32::from_be(ctx.remote_port()) as u16,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach a panic, so this never runs.
    loop {}
}
