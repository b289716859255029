//! Checks the Kubernetes manifests under `daemonset/` without a cluster:
//!
//! - each manifest parses into its k8s-openapi type, and serializing that value again gives
//!   back the whole document, so a misspelled or misplaced field (which the typed parse
//!   drops silently) is reported with its path;
//! - each kustomization lists exactly the manifests of its directory;
//! - the ConfigMaps' gatewayd configuration loads with `Config`, and their AccessPolicy
//!   objects load with the policy loader;
//! - the DaemonSet gives gatewayd what that configuration needs: mounts for its paths,
//!   capabilities, environment, probes on the operations port and time to drain;
//! - the uninstall DaemonSet removes the pins the configuration names.
//!
//! The `broken_*` tests feed the checks a mutated copy, so each check is known to fail when
//! the manifests lose what it guards.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use gateway_user::config::Config;
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, PodSpec, Probe, ServiceAccount, Volume},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The manifests, relative to this crate.
const MANIFEST_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../daemonset");

/// Name of the container that runs `gatewayd run`.
const GATEWAYD_CONTAINER: &str = "gatewayd";

/// Address the checks give downward-API fields that name the node's IP (TEST-NET-1).
const SAMPLE_HOST_IP: &str = "192.0.2.10";

/// Where the kubelet mounts the service account's token and the cluster CA.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The host's cgroup2 mount, which gatewayd's connect hook attaches below.
const CGROUP2_ROOT: &str = "/sys/fs/cgroup";

/// Capabilities gatewayd needs: bpf(), cgroup sock_addr and sock_ops programs with SO_MARK,
/// and the verifier's root-like checks.
const REQUIRED_CAPABILITIES: [&str; 3] = ["BPF", "NET_ADMIN", "PERFMON"];

/// One manifest file and its single YAML document.
#[derive(Clone, Debug)]
struct Manifest {
    /// Path relative to `daemonset/`, such as `uninstall/daemonset.yaml`.
    file: String,
    document: Value,
}

/// A kustomization file: the fields these manifests use. Any other field is an error, so a
/// field added later gets a look from this test too.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    #[serde(default)]
    resources: Vec<String>,
    /// Image overrides, as `kustomize edit set image` writes them.
    #[serde(default)]
    #[expect(dead_code, reason = "accepted, not checked")]
    images: Vec<serde_yaml::Value>,
}

fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|extension| extension.to_str()),
        Some("yaml" | "yml")
    )
}

fn is_kustomization(file: &str) -> bool {
    Path::new(file).file_name().and_then(|name| name.to_str()) == Some("kustomization.yaml")
}

/// Lists the YAML files under `dir`, relative to it, sorted.
fn yaml_files(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let entries = fs::read_dir(&current)
            .unwrap_or_else(|error| panic!("failed to read {}: {error}", current.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if is_yaml(&path) {
                let relative = path.strip_prefix(dir).expect("path below the manifest dir");
                files.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    files.sort();
    files
}

/// Reads every manifest under `daemonset/`, skipping the kustomization files.
fn read_manifests() -> Vec<Manifest> {
    let dir = Path::new(MANIFEST_DIR);
    yaml_files(dir)
        .into_iter()
        .filter(|file| !is_kustomization(file))
        .map(|file| {
            let text = fs::read_to_string(dir.join(&file))
                .unwrap_or_else(|error| panic!("failed to read {file}: {error}"));
            let document =
                parse_single_document(&file, &text).unwrap_or_else(|problem| panic!("{problem}"));
            Manifest { file, document }
        })
        .collect()
}

/// Parses YAML text that must hold exactly one document.
fn parse_single_document(file: &str, text: &str) -> Result<Value, String> {
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value: Value = serde::Deserialize::deserialize(document)
            .map_err(|error| format!("{file}: invalid YAML: {error}"))?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    match documents.len() {
        1 => Ok(documents.remove(0)),
        count => Err(format!(
            "{file}: expected one object, found {count}; put each object in its own file"
        )),
    }
}

// ----- typed parse without loss -----

/// Checks that a manifest parses as the k8s-openapi type of its kind and loses no field.
fn check_typed(manifest: &Manifest) -> Vec<String> {
    let kind = manifest.document["kind"].as_str().unwrap_or_default();
    match kind {
        "Namespace" => check_round_trip::<Namespace>(manifest),
        "ServiceAccount" => check_round_trip::<ServiceAccount>(manifest),
        "ClusterRole" => check_round_trip::<ClusterRole>(manifest),
        "ClusterRoleBinding" => check_round_trip::<ClusterRoleBinding>(manifest),
        "ConfigMap" => check_round_trip::<ConfigMap>(manifest),
        "DaemonSet" => check_round_trip::<DaemonSet>(manifest),
        _ => vec![format!(
            "{}: kind {kind:?} is not checked by this test; add its k8s-openapi type to check_typed",
            manifest.file
        )],
    }
}

fn check_round_trip<T: DeserializeOwned + Serialize>(manifest: &Manifest) -> Vec<String> {
    let typed: T = match serde_path_to_error::deserialize(&manifest.document) {
        Ok(typed) => typed,
        Err(error) => {
            return vec![format!(
                "{}: field `{}`: invalid {}: {}",
                manifest.file,
                error.path(),
                std::any::type_name::<T>(),
                error.inner()
            )];
        }
    };
    let serialized = serde_json::to_value(&typed).expect("k8s-openapi values serialize");
    let mut problems = Vec::new();
    compare_documents(&manifest.document, &serialized, "", &mut problems);
    problems
        .into_iter()
        .map(|problem| format!("{}: {problem}", manifest.file))
        .collect()
}

/// Reports every value of `written` that `parsed` lacks or changed, by path.
fn compare_documents(written: &Value, parsed: &Value, path: &str, problems: &mut Vec<String>) {
    match (written, parsed) {
        (Value::Object(written), Value::Object(parsed)) => {
            for (key, value) in written {
                let child = format!("{path}.{key}");
                match parsed.get(key) {
                    Some(parsed_value) => compare_documents(value, parsed_value, &child, problems),
                    None => problems.push(format!(
                        "field `{}` is unknown to the typed parse (misspelled or misplaced?)",
                        &child[1..]
                    )),
                }
            }
        }
        (Value::Array(written), Value::Array(parsed)) if written.len() == parsed.len() => {
            for (index, (value, parsed_value)) in written.iter().zip(parsed).enumerate() {
                compare_documents(value, parsed_value, &format!("{path}[{index}]"), problems);
            }
        }
        _ if written == parsed => {}
        _ => problems.push(format!(
            "field `{}`: written {written}, parsed as {parsed}",
            path.trim_start_matches('.')
        )),
    }
}

// ----- kustomizations -----

/// Checks one kustomization against the manifests of its directory: every manifest listed,
/// nothing listed that is not there.
fn check_kustomization(directory: &str, text: &str, manifests: &[String]) -> Vec<String> {
    let label = if directory.is_empty() {
        "kustomization.yaml".to_string()
    } else {
        format!("{directory}/kustomization.yaml")
    };
    let kustomization: Kustomization = match serde_yaml::from_str(text) {
        Ok(kustomization) => kustomization,
        Err(error) => return vec![format!("{label}: {error}")],
    };
    let mut problems = Vec::new();
    if kustomization.api_version != "kustomize.config.k8s.io/v1beta1" {
        problems.push(format!(
            "{label}: apiVersion {:?} is not kustomize.config.k8s.io/v1beta1",
            kustomization.api_version
        ));
    }
    if kustomization.kind != "Kustomization" {
        problems.push(format!(
            "{label}: kind {:?} is not Kustomization",
            kustomization.kind
        ));
    }
    let listed: BTreeSet<&str> = kustomization.resources.iter().map(String::as_str).collect();
    if listed.len() != kustomization.resources.len() {
        problems.push(format!("{label}: a resource is listed twice"));
    }
    let present: BTreeSet<&str> = manifests.iter().map(String::as_str).collect();
    for missing in present.difference(&listed) {
        problems.push(format!(
            "{label}: manifest {missing} is not listed in resources"
        ));
    }
    for absent in listed.difference(&present) {
        problems.push(format!(
            "{label}: resource {absent} is not a manifest in its directory"
        ));
    }
    problems
}

/// Checks every directory under `daemonset/` that contains manifests: it needs a
/// kustomization that lists exactly them.
fn check_kustomizations(files: &BTreeMap<String, String>) -> Vec<String> {
    let mut by_directory: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in files.keys() {
        let path = Path::new(file);
        let directory = path.parent().map(Path::to_string_lossy).unwrap_or_default();
        let name = path.file_name().expect("file name").to_string_lossy();
        let entry = by_directory.entry(directory.into_owned()).or_default();
        if !is_kustomization(file) {
            entry.push(name.into_owned());
        }
    }
    let mut problems = Vec::new();
    for (directory, manifests) in &by_directory {
        let kustomization = if directory.is_empty() {
            "kustomization.yaml".to_string()
        } else {
            format!("{directory}/kustomization.yaml")
        };
        match files.get(&kustomization) {
            Some(text) => problems.extend(check_kustomization(directory, text, manifests)),
            None => problems.push(format!(
                "{directory}/: manifests {manifests:?} are in no kustomization"
            )),
        }
    }
    problems
}

// ----- the install: DaemonSet, configuration and RBAC together -----

/// Finds the manifest of `kind` named `name` and parses it. Returns `None` and adds a problem
/// when there is none or it does not parse.
fn find_object<T: DeserializeOwned>(
    manifests: &[Manifest],
    kind: &str,
    name: &str,
    problems: &mut Vec<String>,
) -> Option<T> {
    let Some(manifest) = manifests.iter().find(|manifest| {
        manifest.document["kind"] == kind && manifest.document["metadata"]["name"] == name
    }) else {
        problems.push(format!("no {kind} named {name}"));
        return None;
    };
    match serde_json::from_value(manifest.document.clone()) {
        Ok(object) => Some(object),
        Err(error) => {
            problems.push(format!("{}: invalid {kind}: {error}", manifest.file));
            None
        }
    }
}

fn pod_spec(daemonset: &DaemonSet) -> Option<&PodSpec> {
    daemonset.spec.as_ref()?.template.spec.as_ref()
}

/// Sample values for the container's environment, as the kubelet would set them: literal
/// values as written, downward-API fields with a stand-in for this node.
fn container_environment(container: &Container) -> BTreeMap<String, String> {
    let mut environment = BTreeMap::new();
    for variable in container.env.iter().flatten() {
        let field_path = variable
            .value_from
            .as_ref()
            .and_then(|source| source.field_ref.as_ref())
            .map(|field| field.field_path.as_str());
        let value = match (&variable.value, field_path) {
            (Some(value), _) => value.clone(),
            (None, Some("spec.nodeName")) => "node-1".to_string(),
            (None, Some("status.hostIP" | "status.podIP")) => SAMPLE_HOST_IP.to_string(),
            (None, Some(other)) => format!("sample-{other}"),
            (None, None) => continue,
        };
        environment.insert(variable.name.clone(), value);
    }
    environment
}

/// Where a path inside the container comes from: the mount and volume that hold it, and the
/// path below the mount point.
struct Source<'a> {
    mount_path: &'a str,
    read_only: bool,
    propagation: Option<&'a str>,
    volume: &'a Volume,
    below: PathBuf,
}

/// Finds the mount with the longest mount path that contains `path`.
fn source_of<'a>(pod: &'a PodSpec, container: &'a Container, path: &Path) -> Option<Source<'a>> {
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|mount| path.starts_with(&mount.mount_path))
        .max_by_key(|mount| mount.mount_path.len())?;
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|volume| volume.name == mount.name)?;
    Some(Source {
        mount_path: &mount.mount_path,
        read_only: mount.read_only == Some(true),
        propagation: mount.mount_propagation.as_deref(),
        volume,
        below: path
            .strip_prefix(&mount.mount_path)
            .expect("the mount path contains the path")
            .to_path_buf(),
    })
}

/// Returns the ConfigMap key a file of a ConfigMap volume shows.
fn config_map_key(volume: &Volume, below: &Path) -> Option<String> {
    let source = volume.config_map.as_ref()?;
    let below = below.to_string_lossy();
    match &source.items {
        Some(items) => items
            .iter()
            .find(|item| item.path == below)
            .map(|item| item.key.clone()),
        None => Some(below.into_owned()),
    }
}

/// What a path of the configuration needs from its mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    /// A host directory at the same path, so files outlive the pod and `gatewayctl` on the
    /// node finds them at its default paths. `writable` when gatewayd creates files there.
    HostDirectory { writable: bool },
    /// A Secret volume: keys and certificates.
    Secret,
    /// The cluster CA in the service account volume, or any mount.
    CaFile,
}

/// Everything the checks read from the gatewayd DaemonSet and its configuration.
struct Install<'a> {
    pod: &'a PodSpec,
    container: &'a Container,
    config: Config,
    environment: BTreeMap<String, String>,
}

/// Runs every check of the install manifests. An empty list means they fit together.
fn check_install(manifests: &[Manifest]) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(daemonset) =
        find_object::<DaemonSet>(manifests, "DaemonSet", "gatewayd", &mut problems)
    else {
        return problems;
    };
    let Some(pod) = pod_spec(&daemonset) else {
        problems.push("DaemonSet gatewayd: no pod template spec".to_string());
        return problems;
    };
    let Some(container) = pod
        .containers
        .iter()
        .find(|container| container.name == GATEWAYD_CONTAINER)
    else {
        problems.push(format!(
            "DaemonSet gatewayd: no container named {GATEWAYD_CONTAINER}"
        ));
        return problems;
    };
    let Some((config, _)) = load_config(manifests, pod, container, &mut problems) else {
        return problems;
    };
    let install = Install {
        pod,
        container,
        config,
        environment: container_environment(container),
    };

    check_pod_settings(&install, &mut problems);
    check_mounts(&install, &mut problems);
    check_policies(manifests, &install, &mut problems);
    check_security(&install, &mut problems);
    check_environment(&install, &mut problems);
    check_probes(&install, &mut problems);
    check_rbac(manifests, &install, &mut problems);
    check_namespaces(manifests, &mut problems);
    problems
}

/// Finds the configuration file `gatewayd run --config` reads, in its ConfigMap, and parses
/// it with the container's environment.
fn load_config(
    manifests: &[Manifest],
    pod: &PodSpec,
    container: &Container,
    problems: &mut Vec<String>,
) -> Option<(Config, String)> {
    let args = container.args.clone().unwrap_or_default();
    let config_path = match args.first().map(String::as_str) {
        Some("run") => args
            .windows(2)
            .find(|pair| pair[0] == "--config" || pair[0] == "-c")
            .map(|pair| PathBuf::from(&pair[1])),
        _ => None,
    };
    let Some(config_path) = config_path else {
        problems.push(format!(
            "container {GATEWAYD_CONTAINER}: args {args:?} do not start with `run --config FILE`"
        ));
        return None;
    };
    let Some(source) = source_of(pod, container, &config_path) else {
        problems.push(format!(
            "--config {}: no volume mount contains it",
            config_path.display()
        ));
        return None;
    };
    let (Some(key), Some(name)) = (
        config_map_key(source.volume, &source.below),
        source
            .volume
            .config_map
            .as_ref()
            .map(|map| map.name.clone()),
    ) else {
        problems.push(format!(
            "--config {}: the volume {} is not a ConfigMap",
            config_path.display(),
            source.volume.name
        ));
        return None;
    };
    let config_map = find_object::<ConfigMap>(manifests, "ConfigMap", &name, problems)?;
    let Some(text) = config_map.data.as_ref().and_then(|data| data.get(&key)) else {
        problems.push(format!("ConfigMap {name}: no key {key:?} for --config"));
        return None;
    };

    let environment = container_environment(container);
    let parsed = Config::parse_with_env(&config_path, text, &|name| environment.get(name).cloned());
    match parsed {
        Ok(config) => Some((config, text.clone())),
        Err(error) => {
            problems.push(format!("ConfigMap {name} key {key}: {error}"));
            None
        }
    }
}

/// Checks the pod-level settings gatewayd depends on.
fn check_pod_settings(install: &Install<'_>, problems: &mut Vec<String>) {
    let pod = install.pod;
    if pod.host_network != Some(true) {
        problems.push(
            "hostNetwork must be true: the proxy listens on the node address and its upstream \
             connections must come from the host network namespace"
                .to_string(),
        );
    }
    if pod.host_pid != Some(true) {
        problems.push(
            "hostPID must be true: gatewayd reads /proc/<pid>/comm for the host pids the connect \
             hook reports"
                .to_string(),
        );
    }

    let grace = pod.termination_grace_period_seconds.unwrap_or(30);
    let drain = install.config.proxy.drain_timeout.as_secs_f64();
    if (grace as f64) <= drain {
        problems.push(format!(
            "terminationGracePeriodSeconds {grace} must be longer than proxy.drain_timeout \
             ({drain}s), or the kubelet kills gatewayd before open sessions drain"
        ));
    }

    let tolerates_all = pod.tolerations.iter().flatten().any(|toleration| {
        toleration.operator.as_deref() == Some("Exists")
            && toleration.key.is_none()
            && toleration.effect.is_none()
    });
    if !tolerates_all {
        problems.push(
            "tolerations need `operator: Exists` without key or effect, so gatewayd runs on \
             tainted nodes too"
                .to_string(),
        );
    }

    let resources = install.container.resources.as_ref();
    for (what, values) in [
        (
            "requests",
            resources.and_then(|resources| resources.requests.as_ref()),
        ),
        (
            "limits",
            resources.and_then(|resources| resources.limits.as_ref()),
        ),
    ] {
        if !values.is_some_and(|values| values.contains_key("memory")) {
            problems.push(format!(
                "container {GATEWAYD_CONTAINER}: resources.{what}.memory is not set"
            ));
        }
    }

    if let Some(listen) = install.config.proxy.listen_v4 {
        if listen.ip().to_string() != SAMPLE_HOST_IP {
            problems.push(format!(
                "proxy.listen_v4 expands to {listen}, not to the node address from status.hostIP \
                 ({SAMPLE_HOST_IP} here): each node's pods must reach their own node's proxy"
            ));
        }
        let declared = install
            .container
            .ports
            .iter()
            .flatten()
            .any(|port| port.container_port == i32::from(listen.port()));
        if !declared {
            problems.push(format!(
                "container {GATEWAYD_CONTAINER}: no containerPort {} for proxy.listen_v4",
                listen.port()
            ));
        }
    }
}

/// Checks that every path the configuration names is mounted the way gatewayd uses it.
fn check_mounts(install: &Install<'_>, problems: &mut Vec<String>) {
    let config = &install.config;
    let mut paths: Vec<(String, PathBuf, Need)> = vec![
        (
            "redirect.bpffs".to_string(),
            config.redirect.bpffs.clone(),
            Need::HostDirectory { writable: true },
        ),
        (
            "recording.dir".to_string(),
            config.recording.dir.clone(),
            Need::HostDirectory { writable: true },
        ),
        (
            "approvals.socket".to_string(),
            config.approvals.socket.clone(),
            Need::HostDirectory { writable: true },
        ),
        (
            "the cgroup2 root".to_string(),
            PathBuf::from(CGROUP2_ROOT),
            Need::HostDirectory { writable: false },
        ),
    ];
    if let Some(key) = &config.recording.signing_key {
        paths.push((
            "recording.signing_key".to_string(),
            key.clone(),
            Need::Secret,
        ));
    }
    for (index, target) in config.targets.iter().enumerate() {
        if let Some(tls) = &target.tls {
            paths.push((
                format!("targets[{index}].tls.cert"),
                tls.cert.clone(),
                Need::Secret,
            ));
            paths.push((
                format!("targets[{index}].tls.key"),
                tls.key.clone(),
                Need::Secret,
            ));
        }
        if let Some(ca) = &target.upstream_tls.ca {
            paths.push((
                format!("targets[{index}].upstream_tls.ca"),
                ca.clone(),
                Need::CaFile,
            ));
        }
    }

    for (field, path, need) in paths {
        check_mount(install, &field, &path, need, problems);
    }

    if let Some(source) = source_of(install.pod, install.container, &config.redirect.bpffs)
        && source.propagation.is_none()
    {
        problems.push(format!(
            "mount {}: set mountPropagation: HostToContainer, so a bpffs mounted on the host \
             after the pod started is seen",
            source.mount_path
        ));
    }
    if let Some(source) = source_of(install.pod, install.container, Path::new(CGROUP2_ROOT))
        && source.mount_path != CGROUP2_ROOT
    {
        problems.push(format!(
            "the cgroup2 root must be mounted at {CGROUP2_ROOT}, over the container's own, \
             because gatewayd takes the first cgroup2 mount of /proc/self/mountinfo; it is \
             mounted at {}",
            source.mount_path
        ));
    }
}

fn check_mount(
    install: &Install<'_>,
    field: &str,
    path: &Path,
    need: Need,
    problems: &mut Vec<String>,
) {
    let in_service_account = path.starts_with(SERVICE_ACCOUNT_DIR);
    let Some(source) = source_of(install.pod, install.container, path) else {
        if need == Need::CaFile && in_service_account {
            if install.pod.automount_service_account_token == Some(false) {
                problems.push(format!(
                    "{field} {}: the service account token is not mounted \
                     (automountServiceAccountToken: false)",
                    path.display()
                ));
            }
            return;
        }
        problems.push(format!(
            "{field} {}: no volume mount of container {GATEWAYD_CONTAINER} contains it",
            path.display()
        ));
        return;
    };
    match need {
        Need::HostDirectory { writable } => {
            match &source.volume.host_path {
                Some(host_path) if host_path.path == source.mount_path => {}
                Some(host_path) => problems.push(format!(
                    "{field} {}: mount {} comes from host path {}; mount it at the same path, so \
                     gatewayctl on the node finds the same files",
                    path.display(),
                    source.mount_path,
                    host_path.path
                )),
                None => problems.push(format!(
                    "{field} {}: mount {} is not a hostPath volume, so it does not outlive the pod",
                    path.display(),
                    source.mount_path
                )),
            }
            if writable && source.read_only {
                problems.push(format!(
                    "{field} {}: mount {} is read-only, but gatewayd writes there",
                    path.display(),
                    source.mount_path
                ));
            }
        }
        Need::Secret => {
            if source.volume.secret.is_none() {
                problems.push(format!(
                    "{field} {}: mount {} is not a Secret volume",
                    path.display(),
                    source.mount_path
                ));
            }
        }
        Need::CaFile => {}
    }
}

/// Checks that `policy.path` is a ConfigMap volume whose AccessPolicy objects load.
fn check_policies(manifests: &[Manifest], install: &Install<'_>, problems: &mut Vec<String>) {
    let Some(policy_path) = &install.config.policy.path else {
        return;
    };
    let Some(source) = source_of(install.pod, install.container, policy_path) else {
        problems.push(format!(
            "policy.path {}: no volume mount contains it",
            policy_path.display()
        ));
        return;
    };
    let Some(map_source) = &source.volume.config_map else {
        problems.push(format!(
            "policy.path {}: mount {} is not a ConfigMap volume",
            policy_path.display(),
            source.mount_path
        ));
        return;
    };
    let Some(config_map) =
        find_object::<ConfigMap>(manifests, "ConfigMap", &map_source.name, problems)
    else {
        return;
    };

    // Lay the ConfigMap out as the kubelet would, then load the policy path from it.
    let volume_dir = tempfile::tempdir().expect("temporary directory");
    for (key, text) in config_map.data.iter().flatten() {
        let file = match &map_source.items {
            Some(items) => match items.iter().find(|item| &item.key == key) {
                Some(item) => item.path.clone(),
                None => continue,
            },
            None => key.clone(),
        };
        fs::write(volume_dir.path().join(file), text).expect("write a policy file");
    }
    let loaded = volume_dir.path().join(&source.below);
    match gateway_user::policy::load_path(&loaded) {
        Ok(policy) if policy.rule_count() == 0 => problems.push(format!(
            "ConfigMap {}: its policies have no rules",
            map_source.name
        )),
        Ok(_) => {}
        Err(error) => problems.push(format!("ConfigMap {}: {error}", map_source.name)),
    }
}

/// Checks the container's privileges: the capabilities gatewayd needs and nothing broad.
fn check_security(install: &Install<'_>, problems: &mut Vec<String>) {
    let context = install
        .container
        .security_context
        .clone()
        .unwrap_or_default();
    if context.privileged == Some(true) {
        problems.push(format!(
            "container {GATEWAYD_CONTAINER}: privileged is set; add capabilities instead"
        ));
    }
    if context.allow_privilege_escalation != Some(false) {
        problems.push(format!(
            "container {GATEWAYD_CONTAINER}: allowPrivilegeEscalation must be false"
        ));
    }
    let capabilities = context.capabilities.unwrap_or_default();
    let added = capabilities.add.unwrap_or_default();
    for required in REQUIRED_CAPABILITIES {
        if !added.iter().any(|capability| capability == required) {
            problems.push(format!(
                "container {GATEWAYD_CONTAINER}: capability {required} is not added"
            ));
        }
    }
    if !capabilities
        .drop
        .unwrap_or_default()
        .iter()
        .any(|capability| capability == "ALL")
    {
        problems.push(format!(
            "container {GATEWAYD_CONTAINER}: capabilities.drop must contain ALL"
        ));
    }
}

/// Checks the environment gatewayd reads beyond the configuration file.
fn check_environment(install: &Install<'_>, problems: &mut Vec<String>) {
    let node_name = install
        .container
        .env
        .iter()
        .flatten()
        .find(|variable| variable.name == "NODE_NAME");
    let from_node_name = node_name
        .and_then(|variable| variable.value_from.as_ref())
        .and_then(|source| source.field_ref.as_ref())
        .is_some_and(|field| field.field_path == "spec.nodeName");
    if install.config.node_name.is_none() && !from_node_name {
        problems.push(
            "NODE_NAME must come from the downward API field spec.nodeName: gatewayd names \
             recordings and watches pods by it"
                .to_string(),
        );
    }
    if install.environment.contains_key("GATEWAY_CONFIG") {
        problems.push(
            "GATEWAY_CONFIG is set as well as --config; keep one source of the config path"
                .to_string(),
        );
    }
}

/// Returns the operations listener's address as gatewayd reads it from the configuration.
fn operations_listen(install: &Install<'_>) -> Result<SocketAddr, String> {
    install
        .config
        .operations
        .listen
        .ok_or_else(|| "operations.listen is off, so the probes have nothing to call".to_string())
}

/// Checks that the probes call the operations listener's health endpoints.
fn check_probes(install: &Install<'_>, problems: &mut Vec<String>) {
    let listen = match operations_listen(install) {
        Ok(listen) => listen,
        Err(problem) => {
            problems.push(problem);
            return;
        }
    };
    let container = install.container;
    let probes: [(&str, Option<&Probe>, &str); 3] = [
        (
            "livenessProbe",
            container.liveness_probe.as_ref(),
            "/healthz",
        ),
        (
            "readinessProbe",
            container.readiness_probe.as_ref(),
            "/readyz",
        ),
        ("startupProbe", container.startup_probe.as_ref(), "/readyz"),
    ];
    for (name, probe, expected_path) in probes {
        let Some(probe) = probe else {
            if name != "startupProbe" {
                problems.push(format!("container {GATEWAYD_CONTAINER}: no {name}"));
            }
            continue;
        };
        let Some(get) = &probe.http_get else {
            problems.push(format!(
                "{name}: not an httpGet probe of the operations listener"
            ));
            continue;
        };
        if get.path.as_deref() != Some(expected_path) {
            problems.push(format!(
                "{name}: path {:?}, expected {expected_path}",
                get.path
            ));
        }
        let port = match &get.port {
            IntOrString::Int(port) => Some(*port),
            IntOrString::String(name) => container
                .ports
                .iter()
                .flatten()
                .find(|port| port.name.as_deref() == Some(name))
                .map(|port| port.container_port),
        };
        if port != Some(i32::from(listen.port())) {
            problems.push(format!(
                "{name}: port {:?} is not the operations listener's port {} (operations.listen {listen})",
                get.port,
                listen.port()
            ));
        }
        // The kubelet sends a probe without `host` to the pod IP, which for a hostNetwork pod
        // is the node address: a listener on loopback needs the probe to name it.
        let host: Option<IpAddr> = get.host.as_deref().and_then(|host| host.parse().ok());
        let reaches = if listen.ip().is_unspecified() {
            true
        } else if listen.ip().is_loopback() {
            host == Some(listen.ip())
        } else {
            host.is_none_or(|host| host == listen.ip())
        };
        if !reaches {
            problems.push(format!(
                "{name}: host {:?} does not reach operations.listen {listen}",
                get.host
            ));
        }
    }
}

/// Checks the service account and its read-only access to this node's pods.
fn check_rbac(manifests: &[Manifest], install: &Install<'_>, problems: &mut Vec<String>) {
    let account = install
        .pod
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".to_string());
    let Some(service_account) =
        find_object::<ServiceAccount>(manifests, "ServiceAccount", &account, problems)
    else {
        return;
    };
    let account_namespace = service_account
        .metadata
        .namespace
        .clone()
        .unwrap_or_default();
    let Some(binding) =
        find_object::<ClusterRoleBinding>(manifests, "ClusterRoleBinding", "gatewayd", problems)
    else {
        return;
    };
    let binds_account = binding.subjects.iter().flatten().any(|subject| {
        subject.kind == "ServiceAccount"
            && subject.name == account
            && subject.namespace.as_deref() == Some(account_namespace.as_str())
    });
    if !binds_account {
        problems.push(format!(
            "ClusterRoleBinding gatewayd: no subject for ServiceAccount {account_namespace}/{account}"
        ));
    }
    if binding.role_ref.kind != "ClusterRole" {
        problems.push("ClusterRoleBinding gatewayd: roleRef is not a ClusterRole".to_string());
        return;
    }
    let Some(role) =
        find_object::<ClusterRole>(manifests, "ClusterRole", &binding.role_ref.name, problems)
    else {
        return;
    };

    let rules = role.rules.unwrap_or_default();
    for rule in &rules {
        let writes: Vec<&String> = rule
            .verbs
            .iter()
            .filter(|verb| !matches!(verb.as_str(), "get" | "list" | "watch"))
            .collect();
        if !writes.is_empty() {
            problems.push(format!(
                "ClusterRole {}: verbs {writes:?} go beyond reading; gatewayd only reads",
                binding.role_ref.name
            ));
        }
    }
    let follows_services = install
        .config
        .targets
        .iter()
        .any(|target| target.service.is_some());
    let mut watched: Vec<(&str, &str, &str)> = Vec::new();
    if install.config.identity.cluster {
        watched.push(("identity.cluster", "", "pods"));
    }
    if follows_services {
        watched.push(("a service target", "", "services"));
        watched.push(("a service target", "discovery.k8s.io", "endpointslices"));
    }
    for (reason, group, resource) in watched {
        for verb in ["list", "watch"] {
            let granted = rules.iter().any(|rule| {
                rule.api_groups
                    .iter()
                    .flatten()
                    .any(|granted| granted == group)
                    && rule
                        .resources
                        .iter()
                        .flatten()
                        .any(|granted| granted == resource)
                    && rule.verbs.iter().any(|granted| granted == verb)
            });
            if !granted {
                problems.push(format!(
                    "ClusterRole {}: {reason} watches {resource}, but `{verb}` on {resource} is not granted",
                    binding.role_ref.name
                ));
            }
        }
    }
    let token_mounted = install.pod.automount_service_account_token != Some(false)
        && service_account.automount_service_account_token != Some(false);
    if (install.config.identity.cluster || follows_services) && !token_mounted {
        problems.push(
            "reading the cluster needs the service account token, but it is not mounted"
                .to_string(),
        );
    }
}

/// Checks that every namespaced object is in the Namespace the manifests create.
fn check_namespaces(manifests: &[Manifest], problems: &mut Vec<String>) {
    let created: Vec<&str> = manifests
        .iter()
        .filter(|manifest| manifest.document["kind"] == "Namespace")
        .filter_map(|manifest| manifest.document["metadata"]["name"].as_str())
        .collect();
    let [namespace] = created.as_slice() else {
        problems.push(format!("expected one Namespace, found {created:?}"));
        return;
    };
    for manifest in manifests {
        let kind = manifest.document["kind"].as_str().unwrap_or_default();
        let cluster_scoped = matches!(kind, "Namespace" | "ClusterRole" | "ClusterRoleBinding");
        let written = manifest.document["metadata"]["namespace"].as_str();
        if !cluster_scoped && written != Some(namespace) {
            problems.push(format!(
                "{}: metadata.namespace {written:?} is not {namespace}",
                manifest.file
            ));
        }
    }
}

/// Checks that the uninstall DaemonSet removes the pins under the configuration's
/// `redirect.bpffs`, on every node, with the gatewayd DaemonSet's image.
fn check_uninstall(manifests: &[Manifest], config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let gatewayd_image =
        find_object::<DaemonSet>(manifests, "DaemonSet", "gatewayd", &mut problems).and_then(
            |daemonset| {
                pod_spec(&daemonset)?
                    .containers
                    .iter()
                    .find(|container| container.name == GATEWAYD_CONTAINER)?
                    .image
                    .clone()
            },
        );
    let Some(daemonset) =
        find_object::<DaemonSet>(manifests, "DaemonSet", "gatewayd-uninstall", &mut problems)
    else {
        return problems;
    };
    let Some(pod) = pod_spec(&daemonset) else {
        problems.push("DaemonSet gatewayd-uninstall: no pod template spec".to_string());
        return problems;
    };
    let uninstall = pod.init_containers.iter().flatten().find(|container| {
        container
            .args
            .as_ref()
            .and_then(|args| args.first())
            .map(String::as_str)
            == Some("uninstall")
    });
    let Some(container) = uninstall else {
        problems.push(
            "DaemonSet gatewayd-uninstall: no init container runs `gatewayd uninstall`".to_string(),
        );
        return problems;
    };
    if container.image != gatewayd_image {
        problems.push(format!(
            "gatewayd-uninstall: image {:?} is not the gatewayd DaemonSet's image {gatewayd_image:?}",
            container.image
        ));
    }
    let args = container.args.clone().unwrap_or_default();
    let bpffs = args
        .windows(2)
        .find(|pair| pair[0] == "--bpffs")
        .map(|pair| PathBuf::from(&pair[1]));
    if bpffs.as_deref() != Some(config.redirect.bpffs.as_path()) {
        problems.push(format!(
            "gatewayd-uninstall: --bpffs {bpffs:?} is not redirect.bpffs {}",
            config.redirect.bpffs.display()
        ));
    }
    match source_of(pod, container, &config.redirect.bpffs) {
        Some(source) if source.volume.host_path.is_some() && !source.read_only => {}
        _ => problems.push(format!(
            "gatewayd-uninstall: {} is not on a writable hostPath mount",
            config.redirect.bpffs.display()
        )),
    }
    let added = container
        .security_context
        .as_ref()
        .and_then(|context| context.capabilities.as_ref())
        .and_then(|capabilities| capabilities.add.clone())
        .unwrap_or_default();
    if !added.iter().any(|capability| capability == "BPF") {
        problems.push("gatewayd-uninstall: capability BPF is not added".to_string());
    }
    let tolerates_all = pod.tolerations.iter().flatten().any(|toleration| {
        toleration.operator.as_deref() == Some("Exists") && toleration.key.is_none()
    });
    if !tolerates_all {
        problems.push("gatewayd-uninstall: does not tolerate every taint".to_string());
    }
    problems
}

/// Checks that the image runs gatewayd, as the DaemonSets' arguments assume, and carries
/// gatewayctl for `kubectl exec`.
fn check_containerfile(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let instructions: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#'))
        .collect();
    let entrypoint = instructions
        .iter()
        .rev()
        .find(|line| line.starts_with("ENTRYPOINT"));
    if !entrypoint.is_some_and(|line| line.contains("\"/usr/local/bin/gatewayd\"")) {
        problems.push(format!(
            "Containerfile: the last ENTRYPOINT is {entrypoint:?}, not /usr/local/bin/gatewayd, \
             which the DaemonSets' args (run, uninstall) are written for"
        ));
    }
    let final_stage = instructions
        .iter()
        .rposition(|line| line.starts_with("FROM "))
        .map_or(&instructions[..], |start| &instructions[start..]);
    for binary in ["gatewayd", "gatewayctl"] {
        let copied = final_stage
            .iter()
            .any(|line| line.starts_with("COPY") && line.contains(&format!("/{binary}")));
        if !copied {
            problems.push(format!(
                "Containerfile: the final stage does not copy {binary}"
            ));
        }
    }
    problems
}

fn read_containerfile() -> String {
    let path = Path::new(MANIFEST_DIR).join("Containerfile");
    fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("failed to read {}: {error}", path.display()))
}

// ----- helpers for the tests -----

fn install_manifests() -> Vec<Manifest> {
    read_manifests()
        .into_iter()
        .filter(|manifest| !manifest.file.starts_with("uninstall/"))
        .collect()
}

/// Parses the install's configuration, for tests that need its values.
fn install_config(manifests: &[Manifest]) -> Config {
    let mut problems = Vec::new();
    let daemonset: DaemonSet = find_object(manifests, "DaemonSet", "gatewayd", &mut problems)
        .expect("the gatewayd DaemonSet");
    let pod = pod_spec(&daemonset).expect("pod spec");
    let container = &pod.containers[0];
    let (config, _) = load_config(manifests, pod, container, &mut problems)
        .unwrap_or_else(|| panic!("configuration does not load: {problems:?}"));
    config
}

fn manifest_mut<'a>(manifests: &'a mut [Manifest], file: &str) -> &'a mut Value {
    &mut manifests
        .iter_mut()
        .find(|manifest| manifest.file == file)
        .unwrap_or_else(|| panic!("no manifest {file}"))
        .document
}

fn gatewayd_container(manifests: &mut [Manifest]) -> &mut Value {
    manifest_mut(manifests, "daemonset.yaml")
        .pointer_mut("/spec/template/spec/containers/0")
        .expect("first container")
}

/// Removes the element with `name` from the array at `pointer`.
fn remove_named(document: &mut Value, pointer: &str, name: &str) {
    let array = document
        .pointer_mut(pointer)
        .and_then(Value::as_array_mut)
        .unwrap_or_else(|| panic!("no array at {pointer}"));
    let before = array.len();
    array.retain(|element| element["name"] != name);
    assert_eq!(
        array.len(),
        before - 1,
        "no element named {name} at {pointer}"
    );
}

/// Replaces `from` with `to` in a ConfigMap's value of `key`.
fn edit_config_map(manifests: &mut [Manifest], file: &str, key: &str, from: &str, to: &str) {
    let value = manifest_mut(manifests, file)
        .pointer_mut(&format!("/data/{key}"))
        .expect("ConfigMap key");
    let text = value.as_str().expect("string value");
    assert!(text.contains(from), "{key} does not contain {from:?}");
    *value = Value::String(text.replace(from, to));
}

fn assert_reports(problems: &[String], expected: &str) {
    assert!(
        problems.iter().any(|problem| problem.contains(expected)),
        "no problem mentions {expected:?}; problems: {problems:#?}"
    );
}

fn manifest_files() -> BTreeMap<String, String> {
    let dir = Path::new(MANIFEST_DIR);
    yaml_files(dir)
        .into_iter()
        .map(|file| {
            let text = fs::read_to_string(dir.join(&file)).expect("read manifest");
            (file, text)
        })
        .collect()
}

// ----- the manifests as written -----

#[test]
fn manifests_parse_without_loss() {
    let manifests = read_manifests();
    assert!(
        manifests.len() >= 8,
        "found only {} manifests",
        manifests.len()
    );
    let problems: Vec<String> = manifests.iter().flat_map(check_typed).collect();
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn kustomizations_list_every_manifest() {
    let problems = check_kustomizations(&manifest_files());
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn install_fits_configuration() {
    let problems = check_install(&install_manifests());
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn uninstall_fits_configuration() {
    let manifests = read_manifests();
    let config = install_config(&manifests);
    let problems = check_uninstall(&manifests, &config);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn containerfile_runs_gatewayd() {
    let problems = check_containerfile(&read_containerfile());
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn starter_policy_is_audit_only() {
    let manifests = install_manifests();
    let document = &manifests
        .iter()
        .find(|manifest| manifest.file == "configmap-policies.yaml")
        .expect("policies ConfigMap")
        .document;
    for (key, text) in document["data"].as_object().expect("data") {
        let policy: serde_yaml::Value =
            serde_yaml::from_str(text.as_str().expect("string")).expect("policy YAML");
        assert_eq!(policy["spec"]["mode"].as_str(), Some("audit"), "{key}");
    }
}

// ----- broken copies: each check must catch what it guards -----

#[test]
fn broken_unknown_field_reported() {
    let mut manifests = install_manifests();
    let spec = manifest_mut(&mut manifests, "daemonset.yaml")
        .pointer_mut("/spec/template/spec")
        .expect("pod spec");
    spec["hostNetwrk"] = Value::Bool(true);
    let problems: Vec<String> = manifests.iter().flat_map(check_typed).collect();
    assert_reports(
        &problems,
        "daemonset.yaml: field `spec.template.spec.hostNetwrk` is unknown",
    );
}

#[test]
fn broken_wrong_type_reported() {
    let mut manifests = install_manifests();
    gatewayd_container(&mut manifests)["ports"][0]["containerPort"] = Value::from("proxy");
    let problems: Vec<String> = manifests.iter().flat_map(check_typed).collect();
    assert_reports(
        &problems,
        "daemonset.yaml: field `spec.template.spec.containers[0].ports[0].containerPort`",
    );
}

#[test]
fn broken_kustomization_missing_file() {
    let mut files = manifest_files();
    let text = files["kustomization.yaml"].replace("  - daemonset.yaml\n", "");
    files.insert("kustomization.yaml".to_string(), text);
    files.insert(
        "extra/thing.yaml".to_string(),
        "kind: ConfigMap\n".to_string(),
    );
    let problems = check_kustomizations(&files);
    assert_reports(&problems, "manifest daemonset.yaml is not listed");
    assert_reports(
        &problems,
        "extra/: manifests [\"thing.yaml\"] are in no kustomization",
    );
}

#[test]
fn broken_kustomization_extra_entry() {
    let mut files = manifest_files();
    let text = files["kustomization.yaml"].replace("resources:\n", "resources:\n  - secret.yaml\n");
    files.insert("kustomization.yaml".to_string(), text);
    let problems = check_kustomizations(&files);
    assert_reports(&problems, "resource secret.yaml is not a manifest");
}

#[test]
fn broken_bpffs_mount_reported() {
    let mut manifests = install_manifests();
    remove_named(gatewayd_container(&mut manifests), "/volumeMounts", "bpffs");
    assert_reports(
        &check_install(&manifests),
        "redirect.bpffs /sys/fs/bpf/gateway",
    );
}

#[test]
fn broken_state_mount_reported() {
    let mut manifests = install_manifests();
    remove_named(gatewayd_container(&mut manifests), "/volumeMounts", "state");
    let problems = check_install(&manifests);
    assert_reports(&problems, "recording.dir /var/lib/gateway");
    assert_reports(&problems, "approvals.socket");
}

#[test]
fn broken_state_mount_read_only() {
    let mut manifests = install_manifests();
    let mounts = gatewayd_container(&mut manifests)["volumeMounts"]
        .as_array_mut()
        .expect("mounts");
    let state = mounts
        .iter_mut()
        .find(|mount| mount["name"] == "state")
        .expect("state mount");
    state["readOnly"] = Value::Bool(true);
    assert_reports(
        &check_install(&manifests),
        "is read-only, but gatewayd writes there",
    );
}

#[test]
fn broken_cgroup_mount_reported() {
    let mut manifests = install_manifests();
    remove_named(
        gatewayd_container(&mut manifests),
        "/volumeMounts",
        "cgroup",
    );
    assert_reports(
        &check_install(&manifests),
        "the cgroup2 root /sys/fs/cgroup",
    );
}

#[test]
fn broken_cgroup_mount_elsewhere() {
    let mut manifests = install_manifests();
    let mounts = gatewayd_container(&mut manifests)["volumeMounts"]
        .as_array_mut()
        .expect("mounts");
    let cgroup = mounts
        .iter_mut()
        .find(|mount| mount["name"] == "cgroup")
        .expect("cgroup mount");
    cgroup["mountPath"] = Value::from("/host/sys/fs/cgroup");
    assert_reports(
        &check_install(&manifests),
        "the cgroup2 root /sys/fs/cgroup",
    );
}

#[test]
fn broken_signing_key_volume() {
    let mut manifests = install_manifests();
    let daemonset = manifest_mut(&mut manifests, "daemonset.yaml");
    let volumes = daemonset
        .pointer_mut("/spec/template/spec/volumes")
        .and_then(Value::as_array_mut)
        .expect("volumes");
    let volume = volumes
        .iter_mut()
        .find(|volume| volume["name"] == "signing-key")
        .expect("signing-key volume");
    *volume = serde_json::json!({"name": "signing-key", "emptyDir": {}});
    assert_reports(
        &check_install(&manifests),
        "recording.signing_key /etc/gateway/signing/signing.key: mount /etc/gateway/signing is not a Secret volume",
    );
}

#[test]
fn broken_capability_reported() {
    for capability in REQUIRED_CAPABILITIES {
        let mut manifests = install_manifests();
        let added = gatewayd_container(&mut manifests)
            .pointer_mut("/securityContext/capabilities/add")
            .and_then(Value::as_array_mut)
            .expect("added capabilities");
        added.retain(|added| added != capability);
        assert_reports(
            &check_install(&manifests),
            &format!("capability {capability} is not added"),
        );
    }
}

#[test]
fn broken_privileged_reported() {
    let mut manifests = install_manifests();
    gatewayd_container(&mut manifests)["securityContext"]["privileged"] = Value::Bool(true);
    assert_reports(&check_install(&manifests), "privileged is set");
}

#[test]
fn broken_node_name_reported() {
    let mut manifests = install_manifests();
    remove_named(gatewayd_container(&mut manifests), "/env", "NODE_NAME");
    assert_reports(&check_install(&manifests), "NODE_NAME must come from");
}

#[test]
fn broken_host_ip_reported() {
    let mut manifests = install_manifests();
    remove_named(gatewayd_container(&mut manifests), "/env", "HOST_IP");
    assert_reports(
        &check_install(&manifests),
        "environment variable HOST_IP is not set",
    );
}

#[test]
fn broken_listen_address_fixed() {
    let mut manifests = install_manifests();
    edit_config_map(
        &mut manifests,
        "configmap-config.yaml",
        "gatewayd.yaml",
        "${HOST_IP}:15001",
        "10.0.0.5:15001",
    );
    assert_reports(
        &check_install(&manifests),
        "not to the node address from status.hostIP",
    );
}

#[test]
fn broken_probe_port_reported() {
    let mut manifests = install_manifests();
    gatewayd_container(&mut manifests)["livenessProbe"]["httpGet"]["port"] = Value::from(15020);
    assert_reports(
        &check_install(&manifests),
        "livenessProbe: port Int(15020) is not the operations listener's port 15021",
    );
}

#[test]
fn broken_probe_host_reported() {
    let mut manifests = install_manifests();
    let probe = gatewayd_container(&mut manifests)["readinessProbe"]["httpGet"]
        .as_object_mut()
        .expect("httpGet");
    probe.remove("host");
    assert_reports(
        &check_install(&manifests),
        "readinessProbe: host None does not reach operations.listen 127.0.0.1:15021",
    );
}

#[test]
fn broken_probe_follows_operations_listen() {
    let mut manifests = install_manifests();
    edit_config_map(
        &mut manifests,
        "configmap-config.yaml",
        "gatewayd.yaml",
        "proxy:\n",
        "operations:\n  listen: 127.0.0.1:15090\nproxy:\n",
    );
    assert_reports(
        &check_install(&manifests),
        "is not the operations listener's port 15090",
    );
}

#[test]
fn broken_grace_period_reported() {
    let mut manifests = install_manifests();
    manifest_mut(&mut manifests, "daemonset.yaml")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] =
        Value::from(30);
    assert_reports(
        &check_install(&manifests),
        "terminationGracePeriodSeconds 30 must be longer than proxy.drain_timeout",
    );
}

#[test]
fn broken_host_network_reported() {
    let mut manifests = install_manifests();
    manifest_mut(&mut manifests, "daemonset.yaml")["spec"]["template"]["spec"]["hostNetwork"] =
        Value::Bool(false);
    assert_reports(&check_install(&manifests), "hostNetwork must be true");
}

#[test]
fn broken_tolerations_reported() {
    let mut manifests = install_manifests();
    manifest_mut(&mut manifests, "daemonset.yaml")["spec"]["template"]["spec"]["tolerations"] =
        serde_json::json!([{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]);
    assert_reports(
        &check_install(&manifests),
        "tolerations need `operator: Exists`",
    );
}

#[test]
fn broken_config_field_reported() {
    let mut manifests = install_manifests();
    edit_config_map(
        &mut manifests,
        "configmap-config.yaml",
        "gatewayd.yaml",
        "fail_mode: open",
        "failmode: open",
    );
    assert_reports(&check_install(&manifests), "unknown field `failmode`");
}

#[test]
fn broken_policy_reported() {
    let mut manifests = install_manifests();
    edit_config_map(
        &mut manifests,
        "configmap-policies.yaml",
        "00-starter.yaml",
        "statementKinds: [drop, truncate]",
        "statementKinds: [dropp]",
    );
    assert_reports(
        &check_install(&manifests),
        "ConfigMap gatewayd-policies: invalid policy",
    );
}

#[test]
fn broken_rbac_reported() {
    let mut manifests = install_manifests();
    manifest_mut(&mut manifests, "clusterrole.yaml")["rules"][0]["verbs"] =
        serde_json::json!(["list", "delete"]);
    let problems = check_install(&manifests);
    assert_reports(&problems, "verbs [\"delete\"] go beyond reading");
    assert_reports(&problems, "`watch` on pods is not granted");
    assert_reports(&problems, "`watch` on services is not granted");

    let mut manifests = install_manifests();
    manifest_mut(&mut manifests, "clusterrole.yaml")["rules"]
        .as_array_mut()
        .expect("rules list")
        .truncate(1);
    assert_reports(
        &check_install(&manifests),
        "a service target watches endpointslices, but `list` on endpointslices is not granted",
    );
}

#[test]
fn broken_binding_reported() {
    let mut manifests = install_manifests();
    manifest_mut(&mut manifests, "clusterrolebinding.yaml")["subjects"][0]["namespace"] =
        Value::from("default");
    assert_reports(
        &check_install(&manifests),
        "no subject for ServiceAccount gateway-system/gatewayd",
    );
}

#[test]
fn broken_namespace_reported() {
    let mut manifests = install_manifests();
    manifest_mut(&mut manifests, "serviceaccount.yaml")["metadata"]["namespace"] =
        Value::from("default");
    assert_reports(
        &check_install(&manifests),
        "serviceaccount.yaml: metadata.namespace Some(\"default\") is not gateway-system",
    );
}

#[test]
fn broken_uninstall_pin_dir_reported() {
    let mut manifests = read_manifests();
    let config = install_config(&manifests);
    let args = manifest_mut(&mut manifests, "uninstall/daemonset.yaml")
        .pointer_mut("/spec/template/spec/initContainers/0/args/2")
        .expect("--bpffs value");
    *args = Value::from("/sys/fs/bpf/other");
    assert_reports(
        &check_uninstall(&manifests, &config),
        "--bpffs Some(\"/sys/fs/bpf/other\") is not redirect.bpffs",
    );
}

#[test]
fn broken_uninstall_image_reported() {
    let mut manifests = read_manifests();
    let config = install_config(&manifests);
    let image = manifest_mut(&mut manifests, "uninstall/daemonset.yaml")
        .pointer_mut("/spec/template/spec/initContainers/0/image")
        .expect("init container image");
    *image = Value::from("node-gateway:0.0.1");
    assert_reports(
        &check_uninstall(&manifests, &config),
        "image Some(\"node-gateway:0.0.1\") is not the gatewayd DaemonSet's image",
    );
}

#[test]
fn broken_containerfile_reported() {
    let text = read_containerfile();
    let without_ctl = text.replace(" /out/gatewayctl", "");
    assert_reports(
        &check_containerfile(&without_ctl),
        "the final stage does not copy gatewayctl",
    );
    let other_entrypoint = text.replace(
        "ENTRYPOINT [\"/usr/local/bin/gatewayd\"]",
        "ENTRYPOINT [\"/usr/local/bin/gatewayctl\"]",
    );
    assert_reports(
        &check_containerfile(&other_entrypoint),
        "not /usr/local/bin/gatewayd",
    );
}
