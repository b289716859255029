//! The daemon's configuration: one YAML file given with `--config`, parsed into typed structs
//! and validated before anything is attached, so a mistake is reported with the field it is
//! in instead of surfacing later as odd behaviour.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// Default bpffs directory for the gateway's pinned maps and links.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/gateway";
/// Default directory of the recording store: sessions, journal and signing key.
pub const DEFAULT_RECORDING_DIR: &str = "/var/lib/gateway";
/// Retention below which pruning needs `recording.force_short_retention`: PCI DSS 10.5.1 requires
/// a year of audit history.
pub const MIN_RETENTION_DAYS: u32 = 365;
/// Default `SO_MARK` of the proxy's upstream sockets: the ASCII bytes "GW", chosen to stay clear
/// of the low marks and of the 0x4000/0x8000 bits kube-proxy and Calico use.
pub const DEFAULT_MARK: u32 = 0x4757_0000;
/// Default limit on concurrent proxied connections. Each idle one costs a few KiB of proxy
/// memory and two file descriptors.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// Default idle time after which a connection with no bytes in either direction is closed.
/// One hour, like pgbouncer's `server_idle_timeout` default, so quiet database sessions and
/// API watches survive.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default time allowed for the upstream TCP handshake.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a client gets to log in, half of pgbouncer's `client_login_timeout`.
pub const DEFAULT_LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time open connections get to finish after SIGTERM before they are closed.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time exec and attach output that may start a card number is held back. A terminal
/// user does not notice 30 ms, and a process that writes a number in several quick writes
/// usually completes it sooner.
pub const DEFAULT_EXEC_OUTPUT_HOLD: Duration = Duration::from_millis(30);
/// Maximum `proxy.exec_output_hold`, so a typo cannot freeze interactive sessions.
pub const MAX_EXEC_OUTPUT_HOLD: Duration = Duration::from_secs(10);
/// Default interval between heartbeats written to the `CONFIG` map.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Default heartbeat age after which the fail mode applies.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default path of the approvals socket, in the daemon's state directory.
pub const DEFAULT_APPROVAL_SOCKET: &str = "/var/lib/gateway/approvals.sock";
/// Default interval between checks of the policy files for changes.
pub const DEFAULT_POLICY_RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// Kubernetes' default NodePort range, which the redirect port must stay out of.
const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;

/// Errors while reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The YAML does not match the schema; `field` is the path to the offending value.
    #[error("invalid config file {path}: field `{field}`: {message}")]
    Parse {
        path: PathBuf,
        field: String,
        message: String,
    },
    /// The values parse but contradict each other or are out of range.
    #[error("invalid config file {path}: field `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name of this node, written into recordings. Defaults to the host name.
    #[serde(default)]
    pub node_name: Option<String>,
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub redirect: RedirectSettings,
    #[serde(default)]
    pub recording: RecordingConfig,
    #[serde(default)]
    pub identity: IdentityConfig,
    /// Destinations whose connects are redirected.
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
    /// Rules that deny SQL statements on `postgres` and `mysql` targets, first match wins.
    #[serde(default)]
    pub sql_rules: Vec<crate::policy::SqlRule>,
    /// Rules that deny Kubernetes API requests on `kube_api` targets, first match wins.
    #[serde(default)]
    pub kube_rules: Vec<crate::policy::KubeRule>,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub approvals: ApprovalsConfig,
    #[serde(default)]
    pub operations: OperationsConfig,
}

/// Source of the access policies.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// File or directory of `AccessPolicy` objects. Without it, `sql_rules` are the policy.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// How often the files are checked for changes (e.g. `2s`).
    #[serde(default = "default_policy_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            path: None,
            reload_interval: DEFAULT_POLICY_RELOAD_INTERVAL,
        }
    }
}

/// The socket on which held requests are listed and answered.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// Unix socket path; created by the daemon, owned by root. Defaults to `approvals.sock`
    /// in `recording.dir`, the daemon's state directory.
    #[serde(default)]
    pub socket: PathBuf,
    /// Group allowed to answer (socket mode 0660); without it only root can (mode 0600).
    #[serde(default)]
    pub group: Option<String>,
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::new(),
            group: None,
        }
    }
}

/// The proxy's listeners and limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// IPv4 redirect address: a node address pods can reach. Resolved from `listen_v4` as
    /// written, after expanding environment variables.
    #[serde(skip)]
    pub listen_v4: Option<SocketAddrV4>,
    /// IPv6 redirect address, resolved like `listen_v4`.
    #[serde(skip)]
    pub listen_v6: Option<SocketAddrV6>,
    /// `listen_v4` as written: `IP:PORT`, where `${NAME}` is replaced with the value of
    /// environment variable NAME (`${HOST_IP}:15001`), because the node address differs per
    /// node.
    #[serde(default, rename = "listen_v4")]
    listen_v4_text: Option<String>,
    /// `listen_v6` as written, with the same expansion (`'[${HOST_IPV6}]:15001'`).
    #[serde(default, rename = "listen_v6")]
    listen_v6_text: Option<String>,
    /// Maximum number of proxied connections open at once; further ones are reset.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Threads that run the proxied sessions. Default: one per CPU the daemon may use, which
    /// counts its cgroup's CPU limit. The recording writer runs on a thread of its own.
    #[serde(default)]
    pub worker_threads: Option<usize>,
    /// Close a connection after this long with no bytes either way (e.g. `30m`).
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time allowed for the upstream TCP handshake.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time a client gets to finish connecting: the startup and authentication of PostgreSQL
    /// and MySQL sessions, and the TLS handshake of Kubernetes API sessions. A connection
    /// still short of that is closed, so silent connections cannot pile up until
    /// `idle_timeout`.
    #[serde(default = "default_login_timeout", with = "humantime_serde")]
    pub login_timeout: Duration,
    /// Time open connections get to finish after SIGTERM.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Maximum time that `kubectl exec`, `attach` and `port-forward` output, and a pod log
    /// followed over WebSocket, ending in what may be the start of a card number waits for the
    /// rest of it. The bytes are then sent (masked if they
    /// form a PAN), so a number whose parts are written further apart than this is not masked.
    #[serde(default = "default_exec_output_hold", with = "humantime_serde")]
    pub exec_output_hold: Duration,
}

/// Behaviour of the connect hook once the daemon stops refreshing its heartbeat.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Connects go direct, unproxied and unrecorded: availability first.
    #[default]
    Open,
    /// Connects keep going to the proxy and fail while it is down: control first.
    Closed,
}

/// Attachment settings of the eBPF programs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectSettings {
    /// Turns redirection off while keeping the programs attached.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// cgroup to attach to, absolute or relative to the cgroup2 mount. Default: the kubelet's
    /// `kubepods.slice` or `kubepods`.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// bpffs directory for pinned maps and links.
    #[serde(default = "default_bpffs")]
    pub bpffs: PathBuf,
    /// `SO_MARK` of the proxy's upstream sockets; connects carrying it are never redirected.
    #[serde(default = "default_mark")]
    pub mark: u32,
    #[serde(default)]
    pub fail_mode: FailMode,
    #[serde(default = "default_heartbeat_interval", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Heartbeat age after which the fail mode applies.
    #[serde(default = "default_heartbeat_timeout", with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// cgroups (with everything below them) whose connects are never redirected.
    #[serde(default)]
    pub exclude_cgroups: Vec<PathBuf>,
}

impl Default for RedirectSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            cgroup: None,
            bpffs: default_bpffs(),
            mark: DEFAULT_MARK,
            fail_mode: FailMode::Open,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            exclude_cgroups: Vec::new(),
        }
    }
}

/// Where subjects' pod names, namespaces and service accounts come from.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// YAML file mapping cgroup path patterns to subjects, for hosts outside Kubernetes.
    #[serde(default)]
    pub static_file: Option<PathBuf>,
    /// Watches this node's pods through the API server and names subjects after them.
    #[serde(default)]
    pub cluster: bool,
    /// kubeconfig for the pod watch and for Service targets; the in-cluster configuration
    /// when unset.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Time a connection from a pod the watch has not delivered yet waits for it before it
    /// proceeds as `unknown` (e.g. `1s`).
    #[serde(default = "default_identity_wait", with = "humantime_serde")]
    pub wait: Duration,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            static_file: None,
            cluster: false,
            kubeconfig: None,
            wait: default_identity_wait(),
        }
    }
}

fn default_identity_wait() -> Duration {
    Duration::from_secs(1)
}

/// Session recording settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordingConfig {
    /// Store directory: `sessions/`, `journal/` and the signing key's public half live here.
    #[serde(default = "default_recording_dir")]
    pub dir: PathBuf,
    /// Behaviour when recordings cannot be written (disk full or failing).
    #[serde(default = "default_recording_fail_mode")]
    pub fail_mode: FailMode,
    /// Maximum time between a record's write and its `fdatasync`: the records a power loss can
    /// cost. A killed daemon loses nothing it has written.
    #[serde(default = "default_group_commit", with = "humantime_serde")]
    pub group_commit: Duration,
    /// A signed checkpoint is written after this many records of a session or of the journal.
    #[serde(default = "default_checkpoint_records")]
    pub checkpoint_records: u64,
    /// A signed checkpoint is written when records have waited this long without one.
    #[serde(default = "default_checkpoint_interval", with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// ed25519 private key (PKCS#8 PEM) that signs checkpoints, e.g. from a mounted Secret.
    /// Defaults to `<dir>/signing.key`, generated when missing.
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
    /// Days that recordings are kept before pruning.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// Allows `retention_days` below 365.
    #[serde(default)]
    pub force_short_retention: bool,
    /// Closed session files are compressed with zstd after this long (e.g. `1d`).
    #[serde(default = "default_compress_after", with = "humantime_serde")]
    pub compress_after: Duration,
    /// Free space (MiB) below which the store counts as full and the fail mode applies.
    #[serde(default = "default_min_free_mib")]
    pub min_free_mib: u64,
}

impl Default for RecordingConfig {
    fn default() -> Self {
        Self {
            dir: default_recording_dir(),
            fail_mode: default_recording_fail_mode(),
            group_commit: default_group_commit(),
            checkpoint_records: default_checkpoint_records(),
            checkpoint_interval: default_checkpoint_interval(),
            signing_key: None,
            retention_days: default_retention_days(),
            force_short_retention: false,
            compress_after: default_compress_after(),
            min_free_mib: default_min_free_mib(),
        }
    }
}

impl RecordingConfig {
    /// Path of the signing key.
    pub fn signing_key_path(&self) -> PathBuf {
        self.signing_key
            .clone()
            .unwrap_or_else(|| self.dir.join("signing.key"))
    }
}

fn default_recording_fail_mode() -> FailMode {
    FailMode::Closed
}
fn default_group_commit() -> Duration {
    Duration::from_millis(100)
}
fn default_checkpoint_records() -> u64 {
    1000
}
fn default_checkpoint_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_retention_days() -> u32 {
    400
}
fn default_compress_after() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_min_free_mib() -> u64 {
    64
}

/// Default address of the operations endpoint (`/healthz`, `/readyz`, `/metrics`, `/status`):
/// node-local, so only processes on the node (the kubelet's probes with `hostNetwork`, a
/// node-local scraper, `gatewayctl`) reach it.
pub const DEFAULT_OPERATIONS_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15021);

/// The operations endpoint: health, readiness, metrics and status over HTTP/1.1.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationsConfig {
    /// Address to listen on, or `null` to turn the endpoint off.
    #[serde(
        default = "default_operations_listen",
        deserialize_with = "parse_operations_listen"
    )]
    pub listen: Option<SocketAddr>,
}

impl Default for OperationsConfig {
    fn default() -> Self {
        Self {
            listen: default_operations_listen(),
        }
    }
}

impl OperationsConfig {
    /// Checks the listen address against the proxy's redirect addresses. Returns the field and
    /// the message of the first problem.
    fn validate(&self, proxy: &ProxyConfig) -> Result<(), (&'static str, String)> {
        let Some(addr) = self.listen else {
            return Ok(());
        };
        if addr.port() == 0 {
            return Err((
                "operations.listen",
                format!("{addr}: the port must be between 1 and 65535"),
            ));
        }
        let is_redirect_addr = proxy.listen_v4.map(SocketAddr::V4) == Some(addr)
            || proxy.listen_v6.map(SocketAddr::V6) == Some(addr);
        if is_redirect_addr {
            return Err((
                "operations.listen",
                format!("{addr} is the proxy's redirect address; pick another port"),
            ));
        }
        Ok(())
    }
}

fn default_operations_listen() -> Option<SocketAddr> {
    Some(DEFAULT_OPERATIONS_LISTEN)
}

/// Parses `operations.listen`: `IP:PORT`, or `null` for no endpoint.
fn parse_operations_listen<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let Some(text) = Option::<String>::deserialize(deserializer)? else {
        return Ok(None);
    };
    text.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "invalid address {text:?}: expected IP:PORT such as 127.0.0.1:15021, or null to \
             turn the operations endpoint off"
        ))
    })
}

/// Protocol class of a target.
#[derive(Clone, Copy, Debug, Deserialize, serde::Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum TargetClass {
    KubeApi,
    Postgres,
    Mysql,
    Tcp,
}

impl TargetClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::KubeApi => "kube_api",
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
            Self::Tcp => "tcp",
        }
    }

    pub fn to_kernel(self) -> gateway_common::TargetClass {
        match self {
            Self::KubeApi => gateway_common::TargetClass::KubeApi,
            Self::Postgres => gateway_common::TargetClass::Postgres,
            Self::Mysql => gateway_common::TargetClass::Mysql,
            Self::Tcp => gateway_common::TargetClass::Tcp,
        }
    }
}

impl fmt::Display for TargetClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One target: a fixed address, or a Service whose addresses are taken from the cluster.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Name used in recordings; defaults to `address:port` or `namespace/name:port`.
    #[serde(default)]
    pub name: Option<String>,
    /// The target's IP address. Exactly one of `address` and `service` is set.
    #[serde(default, deserialize_with = "parse_optional_ip")]
    pub address: Option<IpAddr>,
    /// A Service, as `namespace/name`: its cluster IPs and the endpoints of its EndpointSlices
    /// are redirected, and followed as they change.
    #[serde(default)]
    pub service: Option<ServiceRef>,
    /// The port dialed: the address's port, or the Service port (its endpoints are matched
    /// through the port's name).
    pub port: u16,
    pub class: TargetClass,
    /// Serving certificate to terminate client TLS with (`postgres` and `kube_api` targets). A
    /// `kube_api` target without one is relayed as TCP, with its SNI recorded.
    #[serde(default)]
    pub tls: Option<crate::tls::ServingTls>,
    /// Encryption of the proxy's connection to the server (`postgres` and `kube_api` targets).
    #[serde(default)]
    pub upstream_tls: crate::tls::UpstreamTls,
}

impl TargetConfig {
    /// Returns the fixed address and port; `None` for a Service target.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.address
            .map(|address| SocketAddr::new(address, self.port))
    }

    pub fn display_name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        match (self.socket_addr(), &self.service) {
            (Some(addr), _) => addr.to_string(),
            (None, Some(service)) => format!("{service}:{}", self.port),
            (None, None) => format!("port {}", self.port),
        }
    }

    /// Returns the name the upstream certificate is checked against when `upstream_tls` names
    /// none: the address, or the Service's DNS name `name.namespace.svc`.
    pub fn default_server_name(&self) -> String {
        match (&self.address, &self.service) {
            (Some(address), _) => address.to_string(),
            (None, Some(service)) => format!("{}.{}.svc", service.name, service.namespace),
            (None, None) => String::new(),
        }
    }
}

/// A Service named `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl<'de> Deserialize<'de> for ServiceRef {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let valid = |part: &str| {
            !part.is_empty()
                && part.len() <= 63
                && part
                    .bytes()
                    .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
        };
        match text.split_once('/') {
            Some((namespace, name)) if valid(namespace) && valid(name) => Ok(Self {
                namespace: namespace.to_string(),
                name: name.to_string(),
            }),
            _ => Err(serde::de::Error::custom(format!(
                "invalid Service {text:?}: expected namespace/name, such as default/kubernetes"
            ))),
        }
    }
}

/// Parses an IP address, naming the value and the expected form when it is not one.
fn parse_optional_ip<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<IpAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "invalid IP address {text:?}: targets are IP addresses such as 10.96.0.20 or fd00::20, \
             host names are not resolved (name a Service with `service: namespace/name` instead)"
        ))
    })
}

impl ProxyConfig {
    /// Resolves the listen addresses from their written text, taking `${NAME}` references from
    /// `env`. Returns the field and the message of the first error.
    fn resolve_listen(
        &mut self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), (&'static str, String)> {
        self.listen_v4 = parse_listen_addr(self.listen_v4_text.as_deref(), env)
            .map_err(|message| ("proxy.listen_v4", message))?;
        self.listen_v6 = parse_listen_addr(self.listen_v6_text.as_deref(), env)
            .map_err(|message| ("proxy.listen_v6", message))?;
        Ok(())
    }
}

/// Parses an `IP:PORT` socket address after expanding `${NAME}` references, naming the value
/// and the expected form when it is not one.
fn parse_listen_addr<A: std::str::FromStr>(
    text: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<A>, String> {
    let Some(text) = text else {
        return Ok(None);
    };
    let expanded = expand_env(text, env)?;
    let described = if expanded == text {
        format!("{text:?}")
    } else {
        format!("{expanded:?} (expanded from {text:?})")
    };
    expanded.parse().map(Some).map_err(|_| {
        format!(
            "invalid address {described}: expected IP:PORT, such as 10.0.0.5:15001 or '[fd00::5]:15001'"
        )
    })
}

/// Replaces each `${NAME}` in `text` with the value `env` returns for NAME. A `$` that does not
/// start a well-formed reference, and a variable that is unset or empty, are errors, so a
/// mistyped reference never turns into a wrong address.
fn expand_env(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut expanded = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        expanded.push_str(&rest[..start]);
        let reference = &rest[start..];
        let Some(end) = reference
            .strip_prefix("${")
            .and_then(|inner| inner.find('}'))
        else {
            return Err(format!(
                "invalid environment variable reference in {text:?}: write it as ${{NAME}}"
            ));
        };
        let name = &reference[2..2 + end];
        let valid_name = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(format!(
                "invalid environment variable name {name:?} in {text:?}: use letters, digits \
                 and underscores, not starting with a digit"
            ));
        }
        match env(name) {
            Some(value) if !value.is_empty() => expanded.push_str(&value),
            _ => {
                return Err(format!(
                    "environment variable {name} is not set or empty (referenced in {text:?})"
                ));
            }
        }
        rest = &reference[2 + end + 1..];
    }
    expanded.push_str(rest);
    Ok(expanded)
}

fn default_true() -> bool {
    true
}
fn default_bpffs() -> PathBuf {
    PathBuf::from(DEFAULT_BPFFS_DIR)
}
fn default_recording_dir() -> PathBuf {
    PathBuf::from(DEFAULT_RECORDING_DIR)
}
fn default_policy_reload_interval() -> Duration {
    DEFAULT_POLICY_RELOAD_INTERVAL
}
fn default_mark() -> u32 {
    DEFAULT_MARK
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_idle_timeout() -> Duration {
    DEFAULT_IDLE_TIMEOUT
}
fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}
fn default_login_timeout() -> Duration {
    DEFAULT_LOGIN_TIMEOUT
}
fn default_drain_timeout() -> Duration {
    DEFAULT_DRAIN_TIMEOUT
}
fn default_exec_output_hold() -> Duration {
    DEFAULT_EXEC_OUTPUT_HOLD
}
fn default_heartbeat_interval() -> Duration {
    DEFAULT_HEARTBEAT_INTERVAL
}
fn default_heartbeat_timeout() -> Duration {
    DEFAULT_HEARTBEAT_TIMEOUT
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates configuration text; `path` only names it in errors. `${NAME}`
    /// references in the listen addresses are taken from this process's environment.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        Self::parse_with_env(path, text, &|name| std::env::var(name).ok())
    }

    /// Parses and validates configuration text like [`Config::parse`], taking `${NAME}`
    /// references from `env` instead of the environment.
    pub fn parse_with_env(
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let deserializer = serde_yaml::Deserializer::from_str(text);
        let mut config: Config =
            serde_path_to_error::deserialize(deserializer).map_err(|error| {
                let field = error.path().to_string();
                let message = error.into_inner().to_string();
                // serde_yaml starts some messages with the path, or part of it, already given in
                // `field`.
                let message = match message.split_once(": ") {
                    Some((prefix, rest)) if field.starts_with(prefix) => rest.to_string(),
                    _ => message,
                };
                ConfigError::Parse {
                    path: path.to_path_buf(),
                    field: if field == "." {
                        "(top level)".to_string()
                    } else {
                        field
                    },
                    message,
                }
            })?;
        config
            .proxy
            .resolve_listen(env)
            .map_err(|(field, message)| ConfigError::Parse {
                path: path.to_path_buf(),
                field: field.to_string(),
                message,
            })?;
        if config.approvals.socket.as_os_str().is_empty() {
            config.approvals.socket = config.recording.dir.join("approvals.sock");
        }
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };

        let proxy = &self.proxy;
        if proxy.listen_v4.is_none() && proxy.listen_v6.is_none() {
            return Err(invalid(
                "proxy",
                "set listen_v4, listen_v6 or both: the proxy needs a redirect address".into(),
            ));
        }
        for (field, addr) in [
            ("proxy.listen_v4", proxy.listen_v4.map(SocketAddr::V4)),
            ("proxy.listen_v6", proxy.listen_v6.map(SocketAddr::V6)),
        ] {
            let Some(addr) = addr else { continue };
            if addr.ip().is_unspecified() {
                return Err(invalid(
                    field,
                    format!(
                        "{addr}: the redirect address must be a specific node address, not a wildcard"
                    ),
                ));
            }
            if addr.port() == 0 || NODE_PORT_RANGE.contains(&addr.port()) {
                return Err(invalid(
                    field,
                    format!(
                        "port {} is not allowed: use a fixed port outside the NodePort range {}-{}",
                        addr.port(),
                        NODE_PORT_RANGE.start(),
                        NODE_PORT_RANGE.end()
                    ),
                ));
            }
        }
        if proxy.max_connections == 0 {
            return Err(invalid(
                "proxy.max_connections",
                "must be at least 1".into(),
            ));
        }
        if proxy.worker_threads == Some(0) {
            return Err(invalid(
                "proxy.worker_threads",
                "must be at least 1; leave it out for one thread per CPU".into(),
            ));
        }
        for (field, value) in [
            ("proxy.idle_timeout", proxy.idle_timeout),
            ("proxy.connect_timeout", proxy.connect_timeout),
            ("proxy.login_timeout", proxy.login_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(field, "must be longer than zero".into()));
            }
        }
        if proxy.exec_output_hold > MAX_EXEC_OUTPUT_HOLD {
            return Err(invalid(
                "proxy.exec_output_hold",
                format!(
                    "{} is too long: interactive output would stall; use at most {}",
                    humantime::format_duration(proxy.exec_output_hold),
                    humantime::format_duration(MAX_EXEC_OUTPUT_HOLD)
                ),
            ));
        }

        let redirect = &self.redirect;
        if redirect.mark == 0 {
            return Err(invalid(
                "redirect.mark",
                "must be non-zero: mark 0 is what unmarked sockets carry".into(),
            ));
        }
        if redirect.heartbeat_interval.is_zero() {
            return Err(invalid(
                "redirect.heartbeat_interval",
                "must be longer than zero".into(),
            ));
        }
        if redirect.heartbeat_timeout < redirect.heartbeat_interval * 2 {
            return Err(invalid(
                "redirect.heartbeat_timeout",
                format!(
                    "{} is too short: it must be at least twice heartbeat_interval ({}), or a \
                     single late heartbeat would trip the fail mode",
                    humantime::format_duration(redirect.heartbeat_timeout),
                    humantime::format_duration(redirect.heartbeat_interval)
                ),
            ));
        }
        if !redirect.bpffs.is_absolute() {
            return Err(invalid("redirect.bpffs", "must be an absolute path".into()));
        }

        if let Some(path) = &self.identity.static_file
            && let Err(error) = crate::identity::Identity::check_static_file(path)
        {
            return Err(invalid("identity.static_file", crate::error_chain(&error)));
        }

        let recording = &self.recording;
        if !recording.dir.is_absolute() {
            return Err(invalid("recording.dir", "must be an absolute path".into()));
        }
        if recording.retention_days < MIN_RETENTION_DAYS && !recording.force_short_retention {
            return Err(invalid(
                "recording.retention_days",
                format!(
                    "{} is below {MIN_RETENTION_DAYS} days, the year of history PCI DSS 10.5.1 \
                     asks for; set recording.force_short_retention: true to allow it",
                    recording.retention_days
                ),
            ));
        }
        if recording.retention_days == 0 {
            return Err(invalid(
                "recording.retention_days",
                "must be at least 1".into(),
            ));
        }
        if recording.group_commit.is_zero() || recording.group_commit > Duration::from_secs(10) {
            return Err(invalid(
                "recording.group_commit",
                "must be between 1ms and 10s".into(),
            ));
        }
        if recording.checkpoint_records == 0 || recording.checkpoint_interval.is_zero() {
            return Err(invalid(
                "recording.checkpoint_records",
                "checkpoint_records and checkpoint_interval must be above zero".into(),
            ));
        }

        for (index, rule) in self.sql_rules.iter().enumerate() {
            if let Err((field, message)) = rule.validate() {
                return Err(invalid(&format!("sql_rules[{index}].{field}"), message));
            }
            if self.sql_rules[..index]
                .iter()
                .any(|earlier| earlier.name == rule.name)
            {
                return Err(invalid(
                    &format!("sql_rules[{index}].name"),
                    format!("{:?} is used twice: denials must name one rule", rule.name),
                ));
            }
        }
        if self.policy.path.is_some() && !self.sql_rules.is_empty() {
            return Err(invalid(
                "sql_rules",
                "cannot be combined with policy.path: move the rules into an AccessPolicy \
                 (`gatewayctl policy check` validates it) and remove sql_rules"
                    .into(),
            ));
        }
        if self.policy.reload_interval.is_zero() {
            return Err(invalid(
                "policy.reload_interval",
                "must be longer than zero".into(),
            ));
        }
        if !self.approvals.socket.is_absolute() {
            return Err(invalid(
                "approvals.socket",
                "must be an absolute path".into(),
            ));
        }

        if let Err((field, message)) = self.operations.validate(proxy) {
            return Err(invalid(field, message));
        }

        for (index, rule) in self.kube_rules.iter().enumerate() {
            if let Err((field, message)) = rule.validate() {
                return Err(invalid(&format!("kube_rules[{index}].{field}"), message));
            }
        }

        let mut seen = HashSet::new();
        let mut seen_services = HashSet::new();
        let mut names = HashSet::new();
        for (index, target) in self.targets.iter().enumerate() {
            let field = |name: &str| format!("targets[{index}].{name}");
            // Policies and recordings tell targets apart by name.
            if !names.insert(target.display_name()) {
                return Err(invalid(
                    &field("name"),
                    format!(
                        "{:?} names another target too: policies and recordings tell targets apart by name",
                        target.display_name()
                    ),
                ));
            }
            if target.port == 0 {
                return Err(invalid(
                    &field("port"),
                    "must be between 1 and 65535".into(),
                ));
            }
            let address = match (target.address, &target.service) {
                (Some(address), None) => Some(address),
                (None, Some(_)) => None,
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        &field("service"),
                        "set either address or service, not both".into(),
                    ));
                }
                (None, None) => {
                    return Err(invalid(
                        &field("address"),
                        "missing: set address (an IP) or service (namespace/name)".into(),
                    ));
                }
            };
            if let Some(address) = address {
                let addr = SocketAddr::new(address, target.port);
                check_target_address(proxy, addr)
                    .map_err(|message| invalid(&field("address"), message))?;
                if !seen.insert(normalize(addr)) {
                    return Err(invalid(
                        &field("address"),
                        format!("{addr} is listed twice"),
                    ));
                }
            } else if !seen_services.insert((target.service.clone(), target.port)) {
                return Err(invalid(
                    &field("service"),
                    format!("{} is listed twice", target.display_name()),
                ));
            }
            let has_tls = target.tls.is_some()
                || target.upstream_tls.mode != crate::tls::UpstreamTlsMode::Disable;
            if has_tls
                && !matches!(
                    target.class,
                    TargetClass::Postgres | TargetClass::KubeApi | TargetClass::Mysql
                )
            {
                return Err(invalid(
                    &field("tls"),
                    format!(
                        "TLS settings are supported on postgres, mysql and kube_api targets only, not {}",
                        target.class
                    ),
                ));
            }
            if target.class == TargetClass::KubeApi
                && target.tls.is_some()
                && target.upstream_tls.mode == crate::tls::UpstreamTlsMode::Disable
            {
                return Err(invalid(
                    &field("upstream_tls.mode"),
                    "a kube_api target with a serving certificate needs upstream TLS: the API \
                     server serves HTTPS only; set verify-full with the cluster CA"
                        .into(),
                ));
            }
            if target.upstream_tls.mode == crate::tls::UpstreamTlsMode::VerifyFull
                && target.upstream_tls.ca.is_none()
            {
                return Err(invalid(
                    &field("upstream_tls.ca"),
                    "missing: mode verify-full checks the server certificate against this CA file"
                        .into(),
                ));
            }
        }
        Ok(())
    }
}

/// Checks that `addr` can be redirected: a unicast address other than the proxy's own, of a
/// family the proxy listens on. Returns the problem otherwise.
pub fn check_target_address(proxy: &ProxyConfig, addr: SocketAddr) -> Result<(), String> {
    let address = addr.ip();
    if address.is_unspecified() || address.is_multicast() {
        return Err(format!("{address}: a target must be a unicast address"));
    }
    let is_proxy = proxy.listen_v4.map(SocketAddr::V4) == Some(addr)
        || proxy.listen_v6.map(SocketAddr::V6) == Some(addr);
    if is_proxy {
        return Err(format!("{addr} is the proxy's own redirect address"));
    }
    let needs_v6 = matches!(address, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none());
    if needs_v6 && proxy.listen_v6.is_none() {
        return Err(format!("{address} is IPv6 but proxy.listen_v6 is not set"));
    }
    if !needs_v6 && proxy.listen_v4.is_none() {
        return Err(format!("{address} is IPv4 but proxy.listen_v4 is not set"));
    }
    Ok(())
}

/// Folds a mapped IPv6 address onto its IPv4 form so duplicates are found across forms.
fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const GOOD: &str = "
proxy:
  listen_v4: 10.0.0.1:15001
  listen_v6: '[fd00::1]:15001'
redirect:
  fail_mode: closed
  heartbeat_interval: 500ms
  heartbeat_timeout: 2s
targets:
  - name: payments-db
    address: 10.96.0.20
    port: 5432
    class: postgres
  - address: fd00::20
    port: 443
    class: kube_api
";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.yaml"), text)
    }

    fn error_of(text: &str) -> String {
        parse(text)
            .expect_err("config must be rejected")
            .to_string()
    }

    #[test]
    fn config_valid_file() {
        let config = parse(GOOD).expect("valid config");
        assert_eq!(config.redirect.fail_mode, FailMode::Closed);
        assert_eq!(
            config.redirect.heartbeat_interval,
            Duration::from_millis(500)
        );
        assert_eq!(config.targets.len(), 2);
        assert_eq!(config.targets[0].class, TargetClass::Postgres);
        assert_eq!(config.targets[1].display_name(), "[fd00::20]:443");
        assert_eq!(config.proxy.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(config.proxy.worker_threads, None);
        assert_eq!(config.recording.dir, PathBuf::from(DEFAULT_RECORDING_DIR));
    }

    #[test]
    fn config_worker_threads() {
        let with = |threads: &str| {
            GOOD.replace(
                "proxy:\n",
                &format!("proxy:\n  worker_threads: {threads}\n"),
            )
        };
        let config = parse(&with("3")).expect("valid config");
        assert_eq!(config.proxy.worker_threads, Some(3));
        let message = error_of(&with("0"));
        assert!(message.contains("proxy.worker_threads"), "{message}");
        assert!(message.contains("at least 1"), "{message}");
    }

    #[test]
    fn config_exec_output_hold_limits() {
        let config = parse(GOOD).expect("valid config");
        assert_eq!(config.proxy.exec_output_hold, DEFAULT_EXEC_OUTPUT_HOLD);

        let set = |value: &str| {
            GOOD.replace(
                "  listen_v4: 10.0.0.1:15001\n",
                &format!("  listen_v4: 10.0.0.1:15001\n  exec_output_hold: {value}\n"),
            )
        };
        let config = parse(&set("0s")).expect("no hold is valid");
        assert_eq!(config.proxy.exec_output_hold, Duration::ZERO);
        let config = parse(&set("250ms")).expect("a quarter second is valid");
        assert_eq!(config.proxy.exec_output_hold, Duration::from_millis(250));

        let message = error_of(&set("1m"));
        assert!(message.contains("proxy.exec_output_hold"), "{message}");
        assert!(message.contains("at most 10s"), "{message}");
    }

    #[test]
    fn config_unknown_class() {
        let text = GOOD.replace("class: postgres", "class: ftp");
        let message = error_of(&text);
        assert!(message.contains("targets[0].class"), "{message}");
        assert!(message.contains("ftp"), "{message}");
    }

    #[test]
    fn config_tls_on_protocol_targets_only() {
        let mysql = GOOD.replace(
            "class: postgres",
            "class: mysql\n    upstream_tls: {mode: require}",
        );
        assert!(parse(&mysql).is_ok(), "TLS on a mysql target is valid");
        let kube = GOOD.replace(
            "    class: kube_api\n",
            "    class: kube_api\n    upstream_tls: {mode: require}\n",
        );
        assert!(parse(&kube).is_ok(), "TLS on a kube_api target is valid");

        let tcp = GOOD.replace(
            "    class: kube_api\n",
            "    class: tcp\n    upstream_tls: {mode: require}\n",
        );
        let message = error_of(&tcp);
        assert!(message.contains("targets[1].tls"), "{message}");
        assert!(message.contains("not tcp"), "{message}");
    }

    #[test]
    fn config_duplicate_target_name() {
        let text = GOOD.replace(
            "  - address: fd00::20\n",
            "  - name: payments-db\n    address: fd00::20\n",
        );
        let text = text.replace(
            "  - address: 10.96.0.20\n",
            "  - name: payments-db\n    address: 10.96.0.20\n",
        );
        let message = error_of(&text);
        assert!(message.contains("targets[1].name"), "{message}");
        assert!(message.contains("names another target"), "{message}");
    }

    #[test]
    fn config_service_targets() {
        let service = GOOD.replace(
            "  - address: fd00::20\n",
            "  - service: default/kubernetes\n",
        );
        let config = parse(&service).expect("a Service target is valid");
        let target = &config.targets[1];
        assert_eq!(target.address, None);
        assert_eq!(target.display_name(), "default/kubernetes:443");
        assert_eq!(target.default_server_name(), "kubernetes.default.svc");

        let both = GOOD.replace(
            "  - address: fd00::20\n",
            "  - address: fd00::20\n    service: default/kubernetes\n",
        );
        let message = error_of(&both);
        assert!(message.contains("targets[1].service"), "{message}");
        assert!(message.contains("not both"), "{message}");

        let neither = GOOD.replace("  - address: fd00::20\n", "  - port: 443\n");
        let message =
            error_of(&neither.replace("    port: 443\n    class: kube_api", "    class: kube_api"));
        assert!(message.contains("targets[1].address"), "{message}");

        let bad = GOOD.replace("  - address: fd00::20\n", "  - service: kubernetes\n");
        let message = error_of(&bad);
        assert!(message.contains("expected namespace/name"), "{message}");
    }

    #[test]
    fn config_bad_address() {
        let text = GOOD.replace("10.96.0.20", "10.96.0.300");
        let message = error_of(&text);
        assert!(message.contains("targets[0].address"), "{message}");
    }

    #[test]
    fn config_missing_field() {
        let text = GOOD.replace("    port: 5432\n", "");
        let message = error_of(&text);
        assert!(message.contains("targets[0]"), "{message}");
        assert!(message.contains("missing field `port`"), "{message}");
    }

    #[test]
    fn config_unknown_field() {
        let text = GOOD.replace("  fail_mode: closed", "  failmode: closed");
        let message = error_of(&text);
        assert!(message.contains("redirect"), "{message}");
        assert!(message.contains("failmode"), "{message}");
    }

    #[test]
    fn config_bad_fail_mode() {
        let text = GOOD.replace("fail_mode: closed", "fail_mode: sometimes");
        let message = error_of(&text);
        assert!(message.contains("redirect.fail_mode"), "{message}");
    }

    #[test]
    fn config_node_port_range_rejected() {
        let text = GOOD.replace("10.0.0.1:15001", "10.0.0.1:30080");
        let message = error_of(&text);
        assert!(message.contains("proxy.listen_v4"), "{message}");
        assert!(message.contains("NodePort"), "{message}");
    }

    #[test]
    fn config_ipv6_target_needs_v6_listener() {
        let text = GOOD.replace("  listen_v6: '[fd00::1]:15001'\n", "");
        let message = error_of(&text);
        assert!(message.contains("targets[1].address"), "{message}");
    }

    #[test]
    fn config_duplicate_target_across_forms() {
        let text = GOOD
            .replace("fd00::20", "::ffff:10.96.0.20")
            .replace("443", "5432");
        let message = error_of(&text);
        assert!(message.contains("listed twice"), "{message}");
    }

    #[test]
    fn config_short_heartbeat_timeout() {
        let text = GOOD.replace("heartbeat_timeout: 2s", "heartbeat_timeout: 600ms");
        let message = error_of(&text);
        assert!(message.contains("redirect.heartbeat_timeout"), "{message}");
    }

    #[test]
    fn config_target_is_proxy() {
        let text = GOOD
            .replace("10.96.0.20", "10.0.0.1")
            .replace("5432", "15001");
        let message = error_of(&text);
        assert!(message.contains("proxy's own"), "{message}");
    }

    #[test]
    fn config_unknown_statement_kind() {
        let text = format!("{GOOD}sql_rules:\n  - name: typo\n    statement_kinds: [dropp]\n");
        let message = error_of(&text);
        assert!(
            message.contains("sql_rules[0].statement_kinds"),
            "{message}"
        );
        assert!(message.contains("dropp"), "{message}");
    }

    #[test]
    fn config_sql_rules_with_policy_path_rejected() {
        let text = format!(
            "{GOOD}sql_rules:\n  - name: no-drop\n    statement_kinds: [drop]\npolicy:\n  path: /etc/gateway/policies\n"
        );
        let message = error_of(&text);
        assert!(message.contains("field `sql_rules`"), "{message}");
        assert!(message.contains("policy.path"), "{message}");
    }

    #[test]
    fn config_duplicate_sql_rule_name() {
        let text = format!(
            "{GOOD}sql_rules:\n  - name: a\n    statement_kinds: [drop]\n  - name: a\n    tables: [t]\n"
        );
        let message = error_of(&text);
        assert!(message.contains("sql_rules[1].name"), "{message}");
    }

    #[test]
    fn config_policy_and_approvals_defaults() {
        let config = parse(GOOD).expect("valid config");
        assert_eq!(config.policy.path, None);
        assert_eq!(
            config.policy.reload_interval,
            DEFAULT_POLICY_RELOAD_INTERVAL
        );
        assert_eq!(
            config.approvals.socket,
            PathBuf::from(DEFAULT_APPROVAL_SOCKET)
        );
        let message = error_of(&format!("{GOOD}approvals:\n  socket: relative.sock\n"));
        assert!(message.contains("approvals.socket"), "{message}");
        // The socket follows the state directory unless it is set.
        let moved =
            parse(&format!("{GOOD}recording:\n  dir: /srv/gateway\n")).expect("valid config");
        assert_eq!(
            moved.approvals.socket,
            PathBuf::from("/srv/gateway/approvals.sock")
        );
    }

    #[test]
    fn config_operations_listen() {
        let config = parse(GOOD).expect("valid config");
        assert_eq!(config.operations.listen, Some(DEFAULT_OPERATIONS_LISTEN));

        let off = parse(&format!("{GOOD}operations:\n  listen: null\n")).expect("valid config");
        assert_eq!(off.operations.listen, None);

        let moved =
            parse(&format!("{GOOD}operations:\n  listen: '[::1]:9102'\n")).expect("valid config");
        assert_eq!(
            moved.operations.listen,
            Some("[::1]:9102".parse().expect("valid address"))
        );

        let message = error_of(&format!("{GOOD}operations:\n  listen: localhost\n"));
        assert!(message.contains("operations.listen"), "{message}");
        assert!(message.contains("null"), "{message}");

        let message = error_of(&format!("{GOOD}operations:\n  listen: 10.0.0.1:15001\n"));
        assert!(message.contains("operations.listen"), "{message}");
        assert!(message.contains("redirect address"), "{message}");

        let message = error_of(&format!("{GOOD}operations:\n  listen: 127.0.0.1:0\n"));
        assert!(message.contains("operations.listen"), "{message}");
    }

    #[test]
    fn config_no_listener() {
        let text = "proxy: {}\n";
        let message = error_of(text);
        assert!(message.contains("field `proxy`"), "{message}");
    }

    fn parse_with(text: &str, variables: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let variables: HashMap<String, String> = variables
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        Config::parse_with_env(Path::new("test.yaml"), text, &|name| {
            variables.get(name).cloned()
        })
    }

    #[test]
    fn listen_address_from_environment() {
        let text = GOOD
            .replace("10.0.0.1:15001", "${HOST_IP}:15001")
            .replace("[fd00::1]:15001", "[${HOST_IPV6}]:${PORT}");
        let config = parse_with(
            &text,
            &[
                ("HOST_IP", "10.0.0.7"),
                ("HOST_IPV6", "fd00::7"),
                ("PORT", "15002"),
            ],
        )
        .expect("valid config");
        assert_eq!(
            config.proxy.listen_v4,
            Some("10.0.0.7:15001".parse().unwrap())
        );
        assert_eq!(
            config.proxy.listen_v6,
            Some("[fd00::7]:15002".parse().unwrap())
        );
    }

    #[test]
    fn listen_address_literal_unchanged() {
        let config = parse_with(GOOD, &[]).expect("valid config");
        assert_eq!(
            config.proxy.listen_v4,
            Some("10.0.0.1:15001".parse().unwrap())
        );
        assert_eq!(
            config.proxy.listen_v6,
            Some("[fd00::1]:15001".parse().unwrap())
        );
    }

    #[test]
    fn listen_address_unset_variable() {
        let text = GOOD.replace("10.0.0.1:15001", "${HOST_IP}:15001");
        for variables in [&[][..], &[("HOST_IP", "")][..]] {
            let message = parse_with(&text, variables)
                .expect_err("an unset or empty variable must be rejected")
                .to_string();
            assert!(message.contains("proxy.listen_v4"), "{message}");
            assert!(message.contains("HOST_IP is not set"), "{message}");
        }
    }

    #[test]
    fn listen_address_malformed_reference() {
        for written in [
            "$HOST_IP:15001",
            "${HOST_IP:15001",
            "${1IP}:15001",
            "${}:15001",
        ] {
            let text = GOOD.replace("10.0.0.1:15001", written);
            let message = parse_with(&text, &[("HOST_IP", "10.0.0.7")])
                .expect_err("a malformed reference must be rejected")
                .to_string();
            assert!(message.contains("proxy.listen_v4"), "{written}: {message}");
            assert!(
                message.contains("environment variable"),
                "{written}: {message}"
            );
        }
    }

    #[test]
    fn listen_address_expanded_value_invalid() {
        let text = GOOD.replace("10.0.0.1:15001", "${HOST_IP}:15001");
        let message = parse_with(&text, &[("HOST_IP", "fd00::7")])
            .expect_err("an IPv6 address in listen_v4 must be rejected")
            .to_string();
        assert!(message.contains("proxy.listen_v4"), "{message}");
        assert!(message.contains("\"fd00::7:15001\""), "{message}");
        assert!(message.contains("expanded from"), "{message}");
    }

    #[test]
    fn listen_address_expanded_still_validated() {
        let text = GOOD.replace("10.0.0.1:15001", "${HOST_IP}:30080");
        let message = parse_with(&text, &[("HOST_IP", "10.0.0.7")])
            .expect_err("a NodePort must be rejected after expansion")
            .to_string();
        assert!(message.contains("NodePort"), "{message}");
    }
}
