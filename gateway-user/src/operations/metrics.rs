//! The counters and gauges that the data path updates as it works, kept process-wide so that
//! the proxy, the protocol handlers, the masker and the recorder can reach them without passing
//! a handle through every layer. Values that the kernel or another component already stores
//! (verdict counters, map fill, queue depth, held requests) are read at scrape time instead, by
//! the collector in the parent module.
//!
//! Metric names follow the Prometheus conventions: a `gateway_` prefix, base units, and
//! counters ending in `_total` (the encoder appends the suffix).

use std::sync::LazyLock;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Kinds of errors counted in `gateway_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// `accept(2)` on a redirect listener failed.
    Accept,
    /// A connection reached the proxy without a `CONN` entry (dialed directly, or evicted).
    NoOriginalDestination,
    /// A connection was reset because `proxy.max_connections` were open.
    ConnectionLimit,
    /// The upstream connection to the original destination failed.
    UpstreamConnect,
    /// A session was refused because its recording could not start.
    RecordingStart,
    /// The recorder failed to write a session file or the journal.
    RecordingWrite,
    /// Writing the heartbeat into the `CONFIG` map failed.
    Heartbeat,
    /// A detached program could not be attached again.
    Reattach,
}

impl ErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Accept => "accept",
            Self::NoOriginalDestination => "no_original_destination",
            Self::ConnectionLimit => "connection_limit",
            Self::UpstreamConnect => "upstream_connect",
            Self::RecordingStart => "recording_start",
            Self::RecordingWrite => "recording_write",
            Self::Heartbeat => "heartbeat",
            Self::Reattach => "reattach",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    class: &'static str,
    decision: &'static str,
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: String,
}

/// The metrics the data path updates.
#[derive(Debug, Default)]
pub struct Metrics {
    connections_accepted: Counter,
    connections_active: Gauge,
    requests: Family<RequestLabels, Counter>,
    masked_values: Counter,
    errors: Family<ErrorLabels, Counter>,
    reattachments: Family<ProgramLabels, Counter>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

/// Returns the process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Decrements `gateway_connections_active` when the session it was made for ends.
#[derive(Debug)]
pub struct ActiveConnection(());

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        metrics().connections_active.dec();
    }
}

impl Metrics {
    /// Counts a connection the proxy accepted on a redirect listener.
    pub fn connection_accepted(&self) {
        self.connections_accepted.inc();
    }

    /// Counts an open proxied session until the returned guard is dropped.
    pub fn connection_opened(&self) -> ActiveConnection {
        self.connections_active.inc();
        ActiveConnection(())
    }

    /// Counts one access decision on a request to a target of `class`, labelled with the
    /// rule's action (`allow`, `deny`, `review`) and the policy's mode (`enforce`, `audit`).
    pub fn request_decided(
        &self,
        class: crate::config::TargetClass,
        decision: &crate::policy::PolicyDecision,
    ) {
        let mode = match decision.mode {
            crate::policy::Mode::Audit => "audit",
            crate::policy::Mode::Enforce => "enforce",
        };
        self.requests
            .get_or_create(&RequestLabels {
                class: class.as_str(),
                decision: decision.action.as_str(),
                mode,
            })
            .inc();
    }

    /// Counts `count` card numbers masked, in relayed bytes or in text bound for a recording.
    pub fn values_masked(&self, count: usize) {
        if count > 0 {
            self.masked_values.inc_by(count as u64);
        }
    }

    /// Counts one error of `kind`.
    pub fn error(&self, kind: ErrorKind) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.as_str(),
            })
            .inc();
    }

    /// Counts a program the daemon attached again after it was detached from outside.
    pub fn program_reattached(&self, program: &str) {
        self.reattachments
            .get_or_create(&ProgramLabels {
                program: program.to_string(),
            })
            .inc();
    }

    /// Registers every metric in `registry`. The registry shares the values, so later updates
    /// show in its output.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "gateway_connections_accepted",
            "Connections the proxy accepted on its redirect addresses",
            self.connections_accepted.clone(),
        );
        registry.register(
            "gateway_connections_active",
            "Proxied sessions open now",
            self.connections_active.clone(),
        );
        registry.register(
            "gateway_requests",
            "Requests and statements decided by the access policy, by target class, decision \
             and policy mode",
            self.requests.clone(),
        );
        registry.register(
            "gateway_masked_values",
            "Card numbers (PANs) masked, in relayed traffic and in recorded text",
            self.masked_values.clone(),
        );
        registry.register("gateway_errors", "Errors by kind", self.errors.clone());
        registry.register(
            "gateway_ebpf_reattachments",
            "Programs attached again after they were found detached from the pods' cgroup",
            self.reattachments.clone(),
        );
    }
}
