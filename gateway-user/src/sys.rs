//! The crate's only unsafe code: the few system calls that neither the standard library,
//! socket2 nor aya wrap. Each function checks its arguments and returns `io::Result`, so
//! callers stay safe code.
//!
//! The `bpf(2)` commands here use a zeroed attribute buffer with the fields written at the
//! offsets of `union bpf_attr` in `include/uapi/linux/bpf.h`. The kernel accepts a buffer
//! longer than the command needs as long as the tail is zero.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use std::os::unix::ffi::OsStrExt as _;

const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `enum bpf_attach_type` values of the hooks the gateway uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum AttachType {
    SockOps = 3,
    Inet4Connect = 10,
    Inet6Connect = 11,
    Inet4Getpeername = 29,
    Inet6Getpeername = 30,
}

impl AttachType {
    /// Returns the hook's name as bpftool prints it (`cgroup_inet4_connect` is `connect4`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SockOps => "sock_ops",
            Self::Inet4Connect => "connect4",
            Self::Inet6Connect => "connect6",
            Self::Inet4Getpeername => "getpeername4",
            Self::Inet6Getpeername => "getpeername6",
        }
    }
}

/// `BPF_F_ALLOW_OVERRIDE` and `BPF_F_ALLOW_MULTI`: a cgroup attachment with neither is
/// exclusive and keeps descendants from attaching programs of the same type.
pub const BPF_F_ALLOW_OVERRIDE: u32 = 1;
pub const BPF_F_ALLOW_MULTI: u32 = 2;

/// Size of the attribute buffer, larger than any command here needs.
const ATTR_WORDS: usize = 16;

struct Attr([u64; ATTR_WORDS]);

impl Attr {
    fn new() -> Self {
        Self([0; ATTR_WORDS])
    }

    fn put_u32(&mut self, offset: usize, value: u32) {
        let bytes = self.bytes_mut();
        bytes[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
    }

    fn put_u64(&mut self, offset: usize, value: u64) {
        let bytes = self.bytes_mut();
        bytes[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
    }

    fn get_u32(&self, offset: usize) -> u32 {
        let bytes = self.bytes();
        u32::from_ne_bytes(bytes[offset..offset + 4].try_into().expect("4-byte slice"))
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: a `[u64; N]` is `8 * N` initialized bytes with no padding.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), ATTR_WORDS * 8) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and every bit pattern is a valid `u64`.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), ATTR_WORDS * 8) }
    }
}

fn bpf(command: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, writable buffer of the size passed, laid out as
    // `union bpf_attr` for `command`; pointers inside it point at live buffers owned by the
    // caller for the duration of the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn path_cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Opens a pinned BPF object (map, program or link) and returns its file descriptor.
pub fn bpf_obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = path_cstring(path)?;
    let mut attr = Attr::new();
    attr.put_u64(0, path.as_ptr() as u64);
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: on success BPF_OBJ_GET returns a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Replaces the program of a BPF link in place, atomically for the hook.
pub fn bpf_link_update(link: BorrowedFd<'_>, new_program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, new_program.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// Detaches a BPF link from its hook now, whoever else still holds the link open.
pub fn bpf_link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32);
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// Attachment of a cgroup link, as `BPF_OBJ_GET_INFO_BY_FD` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub link_id: u32,
    pub program_id: u32,
    /// Id of the cgroup the link is attached to; 0 once the cgroup is gone.
    pub cgroup_id: u64,
    pub attach_type: u32,
}

/// Reads the attachment of a cgroup link.
pub fn bpf_cgroup_link_info(link: BorrowedFd<'_>) -> io::Result<CgroupLinkInfo> {
    // `struct bpf_link_info`: type, id, prog_id (u32 each), then at offset 16 the union whose
    // cgroup member is { u64 cgroup_id; u32 attach_type; }.
    let mut info = [0u8; 128];
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, info.len() as u32);
    attr.put_u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;

    let u32_at =
        |offset: usize| u32::from_ne_bytes(info[offset..offset + 4].try_into().expect("4 bytes"));
    let u64_at =
        |offset: usize| u64::from_ne_bytes(info[offset..offset + 8].try_into().expect("8 bytes"));
    Ok(CgroupLinkInfo {
        link_id: u32_at(4),
        program_id: u32_at(8),
        cgroup_id: u64_at(16),
        attach_type: u32_at(24),
    })
}

/// Programs attached to one cgroup for one hook, as `BPF_PROG_QUERY` reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupAttachments {
    /// Flags the cgroup's attachments were made with (`BPF_F_ALLOW_*`).
    pub attach_flags: u32,
    /// Number of programs attached directly to this cgroup.
    pub program_count: u32,
}

/// Lists the programs attached directly to `cgroup` for `attach_type`.
pub fn bpf_prog_query(
    cgroup: BorrowedFd<'_>,
    attach_type: AttachType,
) -> io::Result<CgroupAttachments> {
    let mut attr = Attr::new();
    attr.put_u32(0, cgroup.as_raw_fd() as u32);
    attr.put_u32(4, attach_type as u32);
    // prog_ids stays null and prog_cnt 0: the kernel then only reports the count.
    bpf(BPF_PROG_QUERY, &mut attr)?;
    Ok(CgroupAttachments {
        attach_flags: attr.get_u32(12),
        program_count: attr.get_u32(24),
    })
}

/// Maximum number of program ids `bpf_prog_query_ids` reads for one hook. The kernel allows
/// 64 programs per hook and cgroup (`BPF_CGROUP_MAX_PROGS`).
const MAX_QUERIED_PROGRAMS: usize = 64;

/// Lists the ids of the programs attached directly to `cgroup` for `attach_type`, links
/// included.
pub fn bpf_prog_query_ids(cgroup: BorrowedFd<'_>, attach_type: AttachType) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; MAX_QUERIED_PROGRAMS];
    let mut attr = Attr::new();
    attr.put_u32(0, cgroup.as_raw_fd() as u32);
    attr.put_u32(4, attach_type as u32);
    attr.put_u64(16, ids.as_mut_ptr() as u64);
    attr.put_u32(24, MAX_QUERIED_PROGRAMS as u32);
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let count = (attr.get_u32(24) as usize).min(MAX_QUERIED_PROGRAMS);
    Ok(ids[..count].to_vec())
}

/// Attaches a program to a cgroup with the legacy `BPF_PROG_ATTACH` and the given flags
/// (0 makes it exclusive). The gateway itself attaches with links; this exists so tests can
/// build the conflicting setups the loader must detect.
pub fn bpf_prog_attach(
    cgroup: BorrowedFd<'_>,
    program: BorrowedFd<'_>,
    attach_type: AttachType,
    flags: u32,
) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, cgroup.as_raw_fd() as u32);
    attr.put_u32(4, program.as_raw_fd() as u32);
    attr.put_u32(8, attach_type as u32);
    attr.put_u32(12, flags);
    bpf(BPF_PROG_ATTACH, &mut attr).map(|_| ())
}

/// Detaches every program attached with `BPF_PROG_ATTACH` to `cgroup` for `attach_type`,
/// given the program's file descriptor.
pub fn bpf_prog_detach(
    cgroup: BorrowedFd<'_>,
    program: BorrowedFd<'_>,
    attach_type: AttachType,
) -> io::Result<()> {
    const BPF_PROG_DETACH: libc::c_long = 9;
    let mut attr = Attr::new();
    attr.put_u32(0, cgroup.as_raw_fd() as u32);
    attr.put_u32(4, program.as_raw_fd() as u32);
    attr.put_u32(8, attach_type as u32);
    bpf(BPF_PROG_DETACH, &mut attr).map(|_| ())
}

/// Returns the cookie of the network namespace `socket` belongs to (`SO_NETNS_COOKIE`,
/// Linux 5.14 and later).
pub fn netns_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are live locals of the sizes the option expects.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Restores the default action of SIGPIPE, which the Rust runtime ignores, so that a
/// command-line tool whose output reader goes away (`gatewayctl ... | head`) ends quietly with
/// the signal, as other tools do, instead of panicking in `println!`. Call it first in `main`.
pub fn default_sigpipe() {
    // SAFETY: `signal` with SIG_DFL installs no handler code, and SIGPIPE is a valid signal.
    let previous = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    debug_assert_ne!(previous, libc::SIG_ERR, "SIGPIPE is a valid signal");
}

/// Returns `CLOCK_MONOTONIC` in nanoseconds, the clock `bpf_ktime_get_ns()` reads.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a live, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    assert_eq!(
        ret, 0,
        "clock_gettime(CLOCK_MONOTONIC) cannot fail on Linux"
    );
    (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64
}

/// Moves the calling thread to `SCHED_BATCH`: the same CPU share as before, but its wake-ups
/// no longer preempt threads already running (sched(7)). Needs no privilege.
pub fn batch_scheduling() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread, and `param` is a live sched_param.
    let ret = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `statfs(2)` magic number of bpffs.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `statfs(2)` magic number of cgroup2.
pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Returns the `f_type` of the filesystem holding `path`.
pub fn filesystem_type(path: &Path) -> io::Result<i64> {
    let path = path_cstring(path)?;
    // SAFETY: an all-zero `statfs` is a valid value to be overwritten.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` is a live, writable statfs.
    let ret = unsafe { libc::statfs(path.as_ptr(), &mut stat) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_type as i64)
}

/// Returns the bytes available to unprivileged users on the filesystem holding `path`
/// (`statvfs(2)`'s `f_bavail` times `f_frsize`).
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    let path = path_cstring(path)?;
    // SAFETY: an all-zero `statvfs` is a valid value to be overwritten.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` is a live, writable statvfs.
    let ret = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Returns the real user id of this process.
pub fn real_uid() -> u32 {
    // SAFETY: getuid(2) has no arguments and cannot fail.
    unsafe { libc::getuid() }
}

/// Mounts a bpffs instance at `target`.
pub fn mount_bpffs(target: &Path) -> io::Result<()> {
    let source = c"bpf";
    let fstype = c"bpf";
    let target = path_cstring(target)?;
    // SAFETY: all strings are NUL-terminated and live for the call; no data argument.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `signal` to process `pid`.
pub fn kill(pid: u32, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) has no memory arguments.
    let ret = unsafe { libc::kill(pid as libc::pid_t, signal) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling thread into the network namespace `netns` (an open `/var/run/netns`
/// or `/proc/PID/ns/net` file). Safe to call between `fork` and `exec`: it allocates nothing.
pub fn setns_net(netns: RawFd) -> io::Result<()> {
    // SAFETY: setns(2) takes a file descriptor and a flag; no memory arguments.
    let ret = unsafe { libc::setns(netns, libc::CLONE_NEWNET) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes "0" to an open `cgroup.procs` file, moving the calling process into that cgroup.
/// Safe to call between `fork` and `exec`: it allocates nothing.
pub fn join_cgroup(cgroup_procs: RawFd) -> io::Result<()> {
    let zero = b"0";
    // SAFETY: `zero` is a live 1-byte buffer.
    let ret = unsafe { libc::write(cgroup_procs, zero.as_ptr().cast(), zero.len()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` in the child between `fork` and `exec` of `command`.
///
/// `f` must only make async-signal-safe calls (no allocation, no locks), as the functions
/// marked safe to call between `fork` and `exec` in this module do.
pub fn pre_exec<F>(command: &mut std::process::Command, f: F)
where
    F: FnMut() -> io::Result<()> + Send + Sync + 'static,
{
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the caller's `f` keeps to async-signal-safe calls, as documented above.
    unsafe {
        command.pre_exec(f);
    }
}

/// A non-blocking pipe, the kernel buffer `splice(2)` moves bytes through.
#[derive(Debug)]
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

impl Pipe {
    /// Creates a non-blocking, close-on-exec pipe and requests a `capacity`-byte buffer. The
    /// kernel rounds the size up to a power-of-two number of pages, and when it rejects the
    /// size the default 64 KiB stays.
    pub fn new(capacity: usize) -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a live array of two file descriptors for pipe2 to fill.
        let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are new and have no other owner.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl with F_SETPIPE_SZ takes an integer argument.
        let _ = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                capacity as libc::c_int,
            )
        };
        Ok(Self { read, write })
    }
}

/// Moves up to `len` bytes from `from` to `to` without copying them through user space; one
/// of the two must be a pipe. Non-blocking: returns `WouldBlock` when nothing can move now.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the call; null offsets mean "current position",
    // which is what sockets and pipes require.
    let ret = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as usize)
}

/// Returns the soft and hard limits on open files.
fn nofile_limits() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a live, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

/// Returns the hard limit on open files, which the daemon raises its soft limit to.
pub fn nofile_hard_limit() -> io::Result<u64> {
    Ok(nofile_limits()?.rlim_max)
}

/// Raises the soft limit on open files to the hard limit: each proxied session uses two
/// sockets, up to two pipes and a recording file.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = nofile_limits()?;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: `limit` is a live rlimit with the soft limit not above the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit.rlim_cur)
}

/// Opens a pseudo-terminal pair with `openpty(3)` and returns (controller, terminal), both
/// close-on-exec.
pub fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut controller: libc::c_int = -1;
    let mut terminal: libc::c_int = -1;
    // SAFETY: both out-pointers point to live integers; name, termios and winsize may be null.
    let ret = unsafe {
        libc::openpty(
            &mut controller,
            &mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded, so both descriptors are open and have no other owner.
    let pair = unsafe {
        (
            OwnedFd::from_raw_fd(controller),
            OwnedFd::from_raw_fd(terminal),
        )
    };
    for fd in [&pair.0, &pair.1] {
        // SAFETY: fcntl(2) on an open descriptor with an integer argument.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(pair)
}

/// Sets a terminal's window size (`TIOCSWINSZ`), which sends SIGWINCH to its foreground
/// process group.
pub fn set_window_size(terminal: BorrowedFd<'_>, columns: u16, rows: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: columns,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `size` is a live winsize that the ioctl only reads.
    let ret = unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Starts a new session and makes standard input its controlling terminal, as a terminal
/// session's first process needs. Safe to call between `fork` and `exec`: it allocates
/// nothing.
pub fn become_terminal_session_leader() -> io::Result<()> {
    // SAFETY: setsid(2) takes no arguments.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ioctl(2) TIOCSCTTY on descriptor 0 with an integer argument.
    if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
