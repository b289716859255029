//! Legacy discovery documents: `/version`, `/api`, `/api/v1` (and `/apis`, built by the
//! caller with no groups). kubectl 1.32 first requests aggregated discovery and falls back to
//! these when the response is plain JSON.

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

pub fn api_resources() -> Value {
    let mut resources = Vec::new();
    for resource in store::RESOURCES {
        resources.push(json!({
            "name": resource.name,
            "singularName": resource.singular,
            "namespaced": resource.namespaced,
            "kind": resource.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            "shortNames": resource.short_names,
        }));
    }
    for sub in ["exec", "portforward"] {
        resources.push(json!({
            "name": format!("pods/{sub}"),
            "singularName": "",
            "namespaced": true,
            "kind": if sub == "exec" { "PodExecOptions" } else { "PodPortForwardOptions" },
            "verbs": ["create", "get"],
        }));
    }
    json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": resources,
    })
}
