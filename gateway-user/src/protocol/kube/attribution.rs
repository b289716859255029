//! Request attribution: the fields the API server derives from a request's method, path and
//! query (its `RequestInfo`), plus the parameters of exec and attach requests.
//!
//! The rules follow the API server's request info resolver (k8s.io/apiserver, `request`
//! package). `/api/VERSION/...` is the core group and `/apis/GROUP/VERSION/...` a named group,
//! with `namespaces/NS/RESOURCE/NAME/SUBRESOURCE` below that. A `GET` without a name is `list`
//! or, with `watch=true`, `watch`, and a `DELETE` without a name is `deletecollection`. Everything
//! else (`/healthz`, `/version`, `/openapi/v3`) is a non-resource request whose verb is the
//! lowercase method.

use serde::Serialize;

/// Subresources that make a request a connect request: the API server runs them as a stream
/// instead of a read or a write.
const CONNECT_SUBRESOURCES: &[&str] = &["exec", "attach", "portforward", "proxy"];

/// The attribution of one request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RequestInfo {
    /// Whether the path names an API resource (as opposed to `/healthz` and the like).
    pub is_resource: bool,
    pub verb: String,
    /// API group; empty for the core group.
    pub group: String,
    pub version: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// Request path, for non-resource requests and the recording.
    pub path: String,
    /// Parameters of exec and attach requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecParams>,
}

/// Query parameters of an exec or attach request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExecParams {
    /// The command and its arguments, one `command` parameter each (exec only).
    pub command: Vec<String>,
    pub container: String,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl RequestInfo {
    /// Reports whether the request is an exec, attach, port-forward or proxy stream.
    pub fn is_connect(&self) -> bool {
        self.is_resource && CONNECT_SUBRESOURCES.contains(&self.subresource.as_str())
    }
}

/// Derives the attribution of a request from its method, path and raw query string.
pub fn attribute(method: &http::Method, path: &str, query: Option<&str>) -> RequestInfo {
    let mut info = RequestInfo {
        verb: method.as_str().to_ascii_lowercase(),
        path: path.to_string(),
        ..RequestInfo::default()
    };
    // The API server routes by the decoded path, so `%73ecrets` is `secrets`.
    let decoded: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(decode_segment)
        .collect();
    let parts: Vec<&str> = decoded.iter().map(String::as_str).collect();

    // As in the API server, a path that ends at the version (`/api/v1`, `/apis/apps/v1`, the
    // discovery documents) is a non-resource request.
    let rest = match parts.as_slice() {
        ["api", version, rest @ ..] if !rest.is_empty() => {
            info.version = (*version).to_string();
            rest
        }
        ["apis", group, version, rest @ ..] if !rest.is_empty() => {
            info.group = (*group).to_string();
            info.version = (*version).to_string();
            rest
        }
        _ => return info,
    };
    info.is_resource = true;
    info.verb = match *method {
        http::Method::POST => "create",
        http::Method::GET | http::Method::HEAD => "get",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        // The API server rejects other methods with 405, so the method stays the verb.
        _ => info.verb.as_str(),
    }
    .to_string();

    // The deprecated `/api/v1/watch/...` form is a watch of what follows.
    let mut rest = rest;
    if let ["watch", after @ ..] = rest {
        info.verb = "watch".to_string();
        rest = after;
    }

    let mut rest: Vec<&str> = rest
        .iter()
        .copied()
        .filter(|part| !part.is_empty())
        .collect();
    if rest.first() == Some(&"namespaces")
        && let Some(namespace) = rest.get(1)
    {
        info.namespace = (*namespace).to_string();
        // `namespaces/NS/status` and `namespaces/NS/finalize` are subresources of the
        // namespace itself; anything else after the name is a namespaced resource.
        if rest.len() > 2 && !matches!(rest[2], "status" | "finalize") {
            rest.drain(..2);
        }
    }
    if let Some(resource) = rest.first() {
        info.resource = (*resource).to_string();
    }
    if let Some(name) = rest.get(1) {
        info.name = (*name).to_string();
    }
    if rest.len() >= 3 {
        info.subresource = rest[2..].join("/");
    }

    let params = QueryParams::parse(query.unwrap_or(""));
    if info.name.is_empty() && info.verb == "get" {
        info.verb = if params.flag("watch") {
            "watch"
        } else {
            "list"
        }
        .to_string();
        // A list narrowed to one name by a field selector is attributed to that name, as the
        // API server does for watches of a single object.
        if let Some(name) = params
            .first("fieldSelector")
            .and_then(|selector| selector.strip_prefix("metadata.name="))
            .filter(|name| !name.contains(','))
        {
            info.name = name.to_string();
        }
    }
    if info.name.is_empty() && info.verb == "delete" {
        info.verb = "deletecollection".to_string();
    }

    if info.resource == "pods" && matches!(info.subresource.as_str(), "exec" | "attach") {
        // A WebSocket exec arrives as a GET and a SPDY one as a POST; the API server authorizes
        // both as `create` on `pods/exec` (Kubernetes 1.30 and later), so rules see `create`.
        info.verb = "create".to_string();
        info.exec = Some(ExecParams {
            command: params.all("command"),
            container: params.first("container").unwrap_or_default().to_string(),
            stdin: params.flag("stdin"),
            stdout: params.flag("stdout"),
            stderr: params.flag("stderr"),
            tty: params.flag("tty"),
        });
    } else if info.resource == "pods" && info.subresource == "portforward" {
        info.verb = "create".to_string();
    }
    info
}

/// Segments of a path that name the request: up to `/apis/GROUP/VERSION/namespaces/NS/
/// RESOURCE/NAME/SUBRESOURCE`. Those after them (a proxy subresource's own path) belong to
/// the target.
const NAMING_SEGMENTS: usize = 8;

/// Returns why the API server could route `path` to another request than the gateway
/// attributes it to, or `None` for a plain path. An empty segment (`/api//v1`), a `.` or `..`
/// segment and an escaped slash (`%2F`) in the segments that name the request are such
/// reasons, because routers clean and split such paths in different ways.
pub fn unclear_path(path: &str) -> Option<&'static str> {
    let inner = path.strip_prefix('/').unwrap_or(path);
    let inner = inner.strip_suffix('/').unwrap_or(inner);
    if inner.is_empty() {
        return None;
    }
    for segment in inner.split('/').take(NAMING_SEGMENTS) {
        if segment.is_empty() {
            return Some("an empty segment");
        }
        let decoded = decode_segment(segment);
        if decoded == "." || decoded == ".." {
            return Some("a dot segment");
        }
        if decoded.contains('/') {
            return Some("an escaped slash");
        }
    }
    None
}

/// Decodes the `%XX` escapes of one path segment. Unlike a query string's, a `+` stays.
fn decode_segment(segment: &str) -> String {
    if !segment.contains('%') {
        return segment.to_string();
    }
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = (bytes[index] == b'%')
            .then(|| bytes.get(index + 1..index + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                index += 3;
            }
            None => {
                decoded.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// A decoded `application/x-www-form-urlencoded` query string.
struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    fn parse(query: &str) -> Self {
        let pairs = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(key), percent_decode(value))
            })
            .collect();
        Self(pairs)
    }

    fn first(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
    }

    fn all(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(name, _)| name == key)
            .map(|(_, value)| value.clone())
            .collect()
    }

    /// Reads a boolean parameter as the API server converts query parameters: a missing one
    /// is false, and so are `0` and `false` in any case. Any other value, an empty one too,
    /// is true (`?watch`, `?stdin=yes`).
    fn flag(&self, key: &str) -> bool {
        self.first(key)
            .is_some_and(|value| value != "0" && !value.eq_ignore_ascii_case("false"))
    }
}

/// Decodes `%XX` escapes and `+` as a space. Invalid escapes are kept as they are, and bytes
/// that do not form UTF-8 become U+FFFD.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => decoded.push(b' '),
            b'%' if index + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).ok();
                match hex.and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
                    Some(byte) => {
                        decoded.push(byte);
                        index += 2;
                    }
                    None => decoded.push(b'%'),
                }
            }
            byte => decoded.push(byte),
        }
        index += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    /// (method, path and query, verb, group, version, resource, subresource, namespace, name)
    type Case = (
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
    );
    const CASES: &[Case] = &[
        ("GET", "/api/v1/pods", "list", "", "v1", "pods", "", "", ""),
        (
            "GET",
            "/api/v1/namespaces/default/pods",
            "list",
            "",
            "v1",
            "pods",
            "",
            "default",
            "",
        ),
        (
            "GET",
            "/api/v1/namespaces/default/pods/web",
            "get",
            "",
            "v1",
            "pods",
            "",
            "default",
            "web",
        ),
        (
            "GET",
            "/api/v1/namespaces/default/pods?watch=true",
            "watch",
            "",
            "v1",
            "pods",
            "",
            "default",
            "",
        ),
        (
            "GET",
            "/api/v1/namespaces/default/pods?watch=1&resourceVersion=5",
            "watch",
            "",
            "v1",
            "pods",
            "",
            "default",
            "",
        ),
        (
            "GET",
            "/api/v1/namespaces/default/pods?watch=false",
            "list",
            "",
            "v1",
            "pods",
            "",
            "default",
            "",
        ),
        (
            "GET",
            "/api/v1/watch/namespaces/default/pods",
            "watch",
            "",
            "v1",
            "pods",
            "",
            "default",
            "",
        ),
        (
            "GET",
            "/api/v1/namespaces/default/configmaps?fieldSelector=metadata.name%3Dcards&watch=true",
            "watch",
            "",
            "v1",
            "configmaps",
            "",
            "default",
            "cards",
        ),
        (
            "POST",
            "/api/v1/namespaces/default/secrets",
            "create",
            "",
            "v1",
            "secrets",
            "",
            "default",
            "",
        ),
        (
            "PUT",
            "/api/v1/namespaces/default/secrets/s",
            "update",
            "",
            "v1",
            "secrets",
            "",
            "default",
            "s",
        ),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/prod/deployments/web/scale",
            "patch",
            "apps",
            "v1",
            "deployments",
            "scale",
            "prod",
            "web",
        ),
        (
            "DELETE",
            "/api/v1/namespaces/default/pods/web",
            "delete",
            "",
            "v1",
            "pods",
            "",
            "default",
            "web",
        ),
        (
            "DELETE",
            "/api/v1/namespaces/default/pods",
            "deletecollection",
            "",
            "v1",
            "pods",
            "",
            "default",
            "",
        ),
        (
            "GET",
            "/api/v1/namespaces/default/pods/web/log?follow=true",
            "get",
            "",
            "v1",
            "pods",
            "log",
            "default",
            "web",
        ),
        (
            "GET",
            "/api/v1/namespaces/default/pods/web/exec?command=sh&stdin=true",
            "create",
            "",
            "v1",
            "pods",
            "exec",
            "default",
            "web",
        ),
        (
            "POST",
            "/api/v1/namespaces/default/pods/web/attach?stdout=true",
            "create",
            "",
            "v1",
            "pods",
            "attach",
            "default",
            "web",
        ),
        (
            "POST",
            "/api/v1/namespaces/default/pods/web/portforward",
            "create",
            "",
            "v1",
            "pods",
            "portforward",
            "default",
            "web",
        ),
        // A namespace object is its own namespace, as the API server attributes it.
        (
            "GET",
            "/api/v1/namespaces/default",
            "get",
            "",
            "v1",
            "namespaces",
            "",
            "default",
            "default",
        ),
        (
            "GET",
            "/api/v1/namespaces",
            "list",
            "",
            "v1",
            "namespaces",
            "",
            "",
            "",
        ),
        (
            "PUT",
            "/api/v1/namespaces/old/finalize",
            "update",
            "",
            "v1",
            "namespaces",
            "finalize",
            "old",
            "old",
        ),
        (
            "PUT",
            "/api/v1/namespaces/old/status",
            "update",
            "",
            "v1",
            "namespaces",
            "status",
            "old",
            "old",
        ),
        (
            "GET",
            "/api/v1/nodes/n1/proxy/metrics/cadvisor",
            "get",
            "",
            "v1",
            "nodes",
            "proxy/metrics/cadvisor",
            "",
            "n1",
        ),
        (
            "GET",
            "/apis/rbac.authorization.k8s.io/v1/clusterroles",
            "list",
            "rbac.authorization.k8s.io",
            "v1",
            "clusterroles",
            "",
            "",
            "",
        ),
        (
            "GET",
            "/apis/apps/v1/watch/namespaces/prod/deployments/web",
            "watch",
            "apps",
            "v1",
            "deployments",
            "",
            "prod",
            "web",
        ),
    ];

    #[test]
    fn attribution_table() {
        for &(method, target, verb, group, version, resource, subresource, namespace, name) in CASES
        {
            let method = Method::from_bytes(method.as_bytes()).expect("valid method");
            let (path, query) = match target.split_once('?') {
                Some((path, query)) => (path, Some(query)),
                None => (target, None),
            };
            let info = attribute(&method, path, query);
            assert!(info.is_resource, "{target}: resource request");
            assert_eq!(info.verb, verb, "{method} {target}: verb");
            assert_eq!(info.group, group, "{target}: group");
            assert_eq!(info.version, version, "{target}: version");
            assert_eq!(info.resource, resource, "{target}: resource");
            assert_eq!(info.subresource, subresource, "{target}: subresource");
            assert_eq!(info.namespace, namespace, "{target}: namespace");
            assert_eq!(info.name, name, "{target}: name");
        }
    }

    #[test]
    fn non_resource_requests() {
        for (method, path, verb) in [
            (Method::GET, "/healthz", "get"),
            (Method::GET, "/version", "get"),
            (Method::GET, "/openapi/v3", "get"),
            (Method::POST, "/apis", "post"),
            (Method::GET, "/api", "get"),
            (Method::GET, "/api/v1", "get"),
            (Method::GET, "/api/v1/", "get"),
            (Method::GET, "/apis/apps", "get"),
            (Method::GET, "/apis/discovery.k8s.io/v1", "get"),
        ] {
            let info = attribute(&method, path, None);
            assert!(!info.is_resource, "{path}: non-resource request");
            assert_eq!(info.verb, verb, "{path}: verb");
            assert_eq!(info.path, path, "{path}: path");
        }
    }

    #[test]
    fn exec_parameters() {
        let info = attribute(
            &Method::POST,
            "/api/v1/namespaces/default/pods/web/exec",
            Some(
                "command=sh&command=-c&command=echo+hi%20there&container=app&stdin=true&stdout=true&stderr=true&tty=true",
            ),
        );
        let exec = info.exec.clone().expect("exec parameters");
        assert_eq!(exec.command, ["sh", "-c", "echo hi there"]);
        assert_eq!(exec.container, "app");
        assert!(exec.stdin);
        assert!(exec.stdout);
        assert!(exec.stderr);
        assert!(exec.tty);
        assert!(info.is_connect());

        let quiet = attribute(
            &Method::GET,
            "/api/v1/namespaces/default/pods/web/exec",
            Some("command=ls&stdout=1&tty=false"),
        );
        let exec = quiet.exec.expect("exec parameters");
        assert!(!exec.stdin);
        assert!(exec.stdout);
        assert!(!exec.tty);
    }

    #[test]
    fn unclear_paths_named() {
        for (path, reason) in [
            (
                "/api//v1/namespaces/default/secrets/keep",
                Some("an empty segment"),
            ),
            (
                "/api/v1/namespaces/default/x/../secrets/keep",
                Some("a dot segment"),
            ),
            (
                "/api/v1/namespaces/./default/secrets",
                Some("a dot segment"),
            ),
            (
                "/api/v1/namespaces/default/%2e%2e/secrets",
                Some("a dot segment"),
            ),
            (
                "/api/v1/namespaces/default/secrets%2Fkeep",
                Some("an escaped slash"),
            ),
            ("/api/v1/namespaces/default/secrets/keep", None),
            ("/api/v1/namespaces/default/secrets/", None),
            ("/", None),
            // A proxy's own path belongs to its target.
            ("/api/v1/namespaces/default/services/web/proxy/a//b", None),
        ] {
            assert_eq!(unclear_path(path), reason, "{path}");
        }
        let info = attribute(
            &Method::GET,
            "/api/v1/namespaces/default/%73ecrets/keep",
            None,
        );
        assert_eq!(info.resource, "secrets");
        assert_eq!(info.name, "keep");
    }

    #[test]
    fn booleans_read_as_the_api_server_reads_them() {
        let list = "/api/v1/namespaces/default/configmaps";
        for (query, verb) in [
            ("watch=true", "watch"),
            ("watch", "watch"),
            ("watch=", "watch"),
            ("watch=yes", "watch"),
            ("watch=tRUE", "watch"),
            ("watch=0", "list"),
            ("watch=FALSE", "list"),
            ("limit=5", "list"),
        ] {
            let info = attribute(&Method::GET, list, Some(query));
            assert_eq!(info.verb, verb, "{query}");
        }
        let exec = "/api/v1/namespaces/default/pods/web/exec";
        for query in ["stdin=yes&tty=on", "stdin&tty", "stdin=tRUE&tty=1"] {
            let info = attribute(&Method::POST, exec, Some(query));
            let exec = info.exec.expect("exec parameters");
            assert!(exec.stdin, "{query}");
            assert!(exec.tty, "{query}");
        }
    }

    #[test]
    fn percent_decoding_keeps_invalid_escapes() {
        assert_eq!(percent_decode("a%20b"), "a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("x+y"), "x y");
    }
}
