//! The gateway's eBPF programs, attached to the pods' cgroup:
//!
//! - `connect4` / `connect6` (`cgroup/connect4`, `cgroup/connect6`) point a pod's TCP connect
//!   towards a target at the node-local proxy and remember where it was going;
//! - `sock_ops` publishes a redirected connection's 4-tuple in `CONN` once it is established,
//!   so the proxy can find the original destination from its accepted socket, and removes it
//!   when the socket closes;
//! - `getpeername4` / `getpeername6` hand the original peer back to the application.
//!
//! Each program is a thin entry that calls a `try_` function and turns its outcome into the
//! return value. No path rejects a connect except the closed fail mode, because a bug here
//! would otherwise break every pod on the node.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

/// The programs only exist for the BPF target; a host build (`cargo clippy --workspace`)
/// gets this empty entry point.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
