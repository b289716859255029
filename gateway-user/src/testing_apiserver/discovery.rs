//! Legacy discovery documents: `/version`, `/api`, `/api/v1`, `/apis` and the one group
//! served besides the core group, `discovery.k8s.io`. kubectl 1.32 first requests aggregated
//! discovery and falls back to these when the response is plain JSON.

use serde_json::{Value, json};

use super::store;

/// Server version reported by `/version`: the release kubectl 1.32 expects as its peer.
const VERSION_MINOR: &str = "32";

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": VERSION_MINOR,
        "gitVersion": format!("v1.{VERSION_MINOR}.0-gateway-test"),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

pub fn api_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "kubernetes.default.svc:443"}],
    })
}

/// Builds the `/apis` group list.
pub fn api_groups() -> Value {
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [api_group()],
    })
}

/// Builds the `/apis/discovery.k8s.io` group document.
pub fn api_group() -> Value {
    let version = json!({
        "groupVersion": format!("{}/v1", store::DISCOVERY_GROUP),
        "version": "v1",
    });
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": store::DISCOVERY_GROUP,
        "versions": [version.clone()],
        "preferredVersion": version,
    })
}

/// Builds the resource list of `group`'s `v1` (empty for the core group).
pub fn api_resources(group: &str) -> Value {
    let mut resources = Vec::new();
    for resource in store::RESOURCES
        .iter()
        .filter(|resource| resource.group == group)
    {
        resources.push(json!({
            "name": resource.name,
            "singularName": resource.singular,
            "namespaced": resource.namespaced,
            "kind": resource.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            "shortNames": resource.short_names,
        }));
    }
    let subresources: &[&str] = if group.is_empty() {
        &["exec", "portforward"]
    } else {
        &[]
    };
    for &sub in subresources {
        resources.push(json!({
            "name": format!("pods/{sub}"),
            "singularName": "",
            "namespaced": true,
            "kind": if sub == "exec" { "PodExecOptions" } else { "PodPortForwardOptions" },
            "verbs": ["create", "get"],
        }));
    }
    let group_version = if group.is_empty() {
        "v1".to_string()
    } else {
        format!("{group}/v1")
    };
    json!({
        "kind": "APIResourceList",
        "groupVersion": group_version,
        "resources": resources,
    })
}
