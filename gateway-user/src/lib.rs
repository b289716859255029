//! The gateway's user-space side: the daemon `gatewayd` and the CLI `gatewayctl` are thin
//! binaries over this library.
//!
//! Modules, one concern each:
//! - `config`: the YAML configuration and its validation;
//! - `cgroup`: the cgroup2 mount, the pods cgroup and cgroup id lookups;
//! - `redirect`: loading, attaching, pinning and adopting the eBPF programs and their maps;
//! - `proxy`: accepting redirected connections and dispatching them to a protocol handler;
//! - `protocol`: the handlers, one per target class;
//! - `identity`: the subject behind a connection;
//! - `targets`: targets named by a Service, followed in the cluster;
//! - `mask`: finding card numbers (PANs) in bytes and masking them, whole or streamed;
//! - `policy`: AccessPolicy objects and access decisions;
//! - `approval`: requests held for review and the socket that answers them;
//! - `record`: the tamper-evident recording store: sessions, journal, signing, verification;
//! - `sql`: statement analysis for the database handlers;
//! - `cli`: the larger `gatewayctl` commands (`sessions`);
//! - `daemon`: the daemon's run loop (signals, heartbeat, re-attaching, drain);
//! - `operations`: the node-local HTTP endpoint (health, readiness, metrics, status) and the
//!   metrics the data path updates;
//! - `tls`: TLS settings of targets, both legs;
//! - `cert`: issuing serving certificates for `kube_api` targets from a cluster CA;
//! - `sys`: the only module with unsafe code, wrapping system calls;
//! - `testing` (feature `testing`): the one-machine test node;
//! - `testing_apiserver` (feature `testing`): the stand-in Kubernetes API server of the tests.
#![deny(unsafe_code)]

pub mod approval;
pub mod cert;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod identity;
pub mod mask;
pub mod operations;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod record;
pub mod redirect;
pub mod sql;
#[expect(unsafe_code, reason = "the one module that wraps system calls")]
pub mod sys;
pub mod targets;
#[cfg(feature = "testing")]
pub mod testing;
#[cfg(feature = "testing")]
pub mod testing_apiserver;
pub mod tls;

/// Formats an error with its chain of causes, `outer: inner: innermost`, for log fields.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
