//! Request handling: authentication, request attribution (verb, resource, namespace, name),
//! authorization, content negotiation and the REST verbs on the store.

use std::{collections::BTreeMap, convert::Infallible, sync::Arc};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited, combinators::BoxBody};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::{
    ApiServer, discovery, proto,
    select::Selector,
    status::{ApiError, deleted_status},
    store::{self, Resource},
    table,
    token::Identity,
};

/// Response body of every handler.
pub type Body = BoxBody<Bytes, Infallible>;

/// Largest request body accepted, the real server's limit for JSON requests (3 MiB).
const MAX_REQUEST_BODY: usize = 3 * 1024 * 1024;

/// The attributes of a request, derived as the real server's request-info resolver does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestInfo {
    pub verb: &'static str,
    pub resource: &'static Resource,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// Query parameters, percent-decoded, with repeats kept in order (`command=a&command=b`).
#[derive(Clone, Debug, Default)]
pub struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(query: Option<&str>) -> Self {
        let pairs = query
            .unwrap_or_default()
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(key), percent_decode(value))
            })
            .collect();
        Self(pairs)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
    }

    pub fn all(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(name, _)| name == key)
            .map(|(_, value)| value.clone())
            .collect()
    }

    /// Reads a boolean parameter the way the real server's converter does: a missing one is
    /// false, and so are `0` and `false` in any case. Any other value, an empty one too, is
    /// true.
    pub fn flag(&self, key: &str) -> Result<bool, ApiError> {
        Ok(self
            .get(key)
            .is_some_and(|value| value != "0" && !value.eq_ignore_ascii_case("false")))
    }
}

fn percent_decode(text: &str) -> String {
    fn hex(byte: u8) -> Option<u8> {
        (byte as char).to_digit(16).map(|digit| digit as u8)
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        let escaped = (byte == b'%' && index + 2 < bytes.len())
            .then(|| Some(hex(bytes[index + 1])? << 4 | hex(bytes[index + 2])?))
            .flatten();
        match (byte, escaped) {
            (_, Some(decoded)) => {
                out.push(decoded);
                index += 2;
            }
            (b'+', None) => out.push(b' '),
            (other, None) => out.push(other),
        }
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The representation a response is sent in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Table,
    Protobuf,
}

/// Picks the first media type in `Accept` that the server can send for `resource`.
/// Protobuf is served for ConfigMaps only; clients that accept it list JSON after it.
pub fn negotiate(headers: &HeaderMap, resource: Option<&Resource>) -> Result<Format, ApiError> {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    if accept.trim().is_empty() {
        return Ok(Format::Json);
    }
    for media in accept.split(',') {
        let mut parts = media.split(';').map(str::trim);
        let essence = parts.next().unwrap_or_default().to_ascii_lowercase();
        let params: BTreeMap<String, String> = parts
            .filter_map(|param| param.split_once('='))
            .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
            .collect();
        let wants_table = params.get("as").map(String::as_str) == Some("Table");
        match essence.as_str() {
            "application/json" if wants_table => {
                let group_ok = params.get("g").map(String::as_str) == Some("meta.k8s.io");
                let version_ok = matches!(
                    params.get("v").map(String::as_str),
                    Some("v1") | Some("v1beta1")
                );
                if group_ok && version_ok && resource.is_some() {
                    return Ok(Format::Table);
                }
            }
            "application/json" | "application/*" | "*/*" if !params.contains_key("as") => {
                return Ok(Format::Json);
            }
            proto::CONTENT_TYPE
                if !wants_table && resource.is_some_and(|r| r.name == "configmaps") =>
            {
                return Ok(Format::Protobuf);
            }
            _ => {}
        }
    }
    Err(ApiError::not_acceptable(accept))
}

/// Builds a JSON response.
pub fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("JSON values always serialize");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("static response parts are valid")
}

/// Builds the `Status` response of an error.
pub fn error_response(error: &ApiError) -> Response<Body> {
    let status = StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &error.to_status())
}

fn text_response(status: StatusCode, text: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(text.as_bytes())).boxed())
        .expect("static response parts are valid")
}

/// The authenticated sender of a request.
#[derive(Clone, Debug)]
pub enum Subject {
    Anonymous,
    ServiceAccount(Identity),
}

impl Subject {
    pub fn username(&self) -> &str {
        match self {
            Self::Anonymous => "system:anonymous",
            Self::ServiceAccount(identity) => &identity.username,
        }
    }
}

impl ApiServer {
    /// Handles one request; every failure becomes a `Status` response.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let response = match self.clone().route(request).await {
            Ok(response) => response,
            Err(error) => error_response(&error),
        };
        let response = if self.gzip_responses {
            gzip_complete_body(response).await
        } else {
            response
        };
        tracing::info!(
            method = %method,
            path = %path,
            status = response.status().as_u16(),
            "request"
        );
        response
    }

    fn authenticate(&self, headers: &HeaderMap) -> Result<Subject, ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Ok(Subject::Anonymous);
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|text| text.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(ApiError::unauthorized)?;
        let identity = self.verifier.verify(token).map_err(|error| {
            tracing::info!(error = %error, "bearer token rejected");
            ApiError::unauthorized()
        })?;

        // A bound token stops working once its pod is gone or was replaced under the same
        // name, which the real authenticator checks through the pod's UID.
        if self.check_bound_pods
            && let Some((pod_name, pod_uid)) = &identity.pod
        {
            let pods = store::resource("pods").expect("pods is served");
            let current = self.store.get(pods, &identity.namespace, pod_name).ok();
            let current_uid = current
                .as_ref()
                .and_then(|pod| pod.pointer("/metadata/uid"))
                .and_then(Value::as_str);
            if current_uid != Some(pod_uid.as_str()) {
                tracing::info!(
                    pod = %pod_name,
                    namespace = %identity.namespace,
                    "bearer token rejected: its pod does not exist or has another UID"
                );
                return Err(ApiError::unauthorized());
            }
        }
        Ok(Subject::ServiceAccount(identity))
    }

    async fn route(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        let subject = self.authenticate(request.headers())?;
        let path = request.uri().path().to_string();
        let query = Query::parse(request.uri().query());
        let segments: Vec<&str> = path
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();

        // Non-resource paths: health and version are public, discovery needs a login, as
        // the default `system:public-info-viewer` and `system:discovery` roles grant.
        match segments.as_slice() {
            ["healthz"] | ["livez"] | ["readyz"] => return Ok(text_response(StatusCode::OK, "ok")),
            ["version"] => return Ok(json_response(StatusCode::OK, &discovery::version())),
            ["api"]
            | ["apis"]
            | ["api", "v1"]
            | ["apis", store::DISCOVERY_GROUP]
            | ["apis", store::DISCOVERY_GROUP, "v1"] => {
                if matches!(subject, Subject::Anonymous) {
                    return Err(ApiError::forbidden_path(subject.username(), "get", &path));
                }
                if request.method() != Method::GET {
                    return Err(ApiError::method_not_allowed(request.method().as_str()));
                }
                let body = match segments.as_slice() {
                    ["api"] => discovery::api_versions(),
                    ["apis"] => discovery::api_groups(),
                    ["apis", _] => discovery::api_group(),
                    ["apis", _, _] => discovery::api_resources(store::DISCOVERY_GROUP),
                    _ => discovery::api_resources(""),
                };
                return Ok(json_response(StatusCode::OK, &body));
            }
            _ => {}
        }

        let info = request_info(request.method(), &segments, &query)?;
        self.authorize(&subject, &info)?;

        match info.subresource.as_deref() {
            Some("exec") => return super::exec::handle_exec(self, request, &info, &query).await,
            Some("portforward") => {
                return super::exec::handle_port_forward(self, request, &info, &query).await;
            }
            Some(other) => {
                return Err(ApiError::not_found(
                    info.resource,
                    &format!("{}/{other}", info.name.clone().unwrap_or_default()),
                ));
            }
            None => {}
        }

        let format = negotiate(request.headers(), Some(info.resource))?;
        match info.verb {
            "get" => self.get(&info, format),
            "list" => self.list(&info, &query, format),
            "watch" => self.watch(&info, &query, format),
            "create" => {
                let body = read_json(request).await?;
                self.create(&info, body, format)
            }
            "update" => {
                let body = read_json(request).await?;
                let name = info.name.clone().unwrap_or_default();
                let object = self
                    .store
                    .update(info.resource, namespace_of(&info), &name, body)?;
                Ok(encode_object(
                    info.resource,
                    &object,
                    format,
                    StatusCode::OK,
                ))
            }
            "patch" => {
                let content_type = content_type(request.headers());
                if !matches!(
                    content_type.as_str(),
                    "application/merge-patch+json" | "application/strategic-merge-patch+json"
                ) {
                    // NOTE: JSON patch (RFC 6902) and server-side apply are not implemented.
                    return Err(ApiError::unsupported_media_type(&content_type));
                }
                let patch = read_body_json(request).await?;
                let name = info.name.clone().unwrap_or_default();
                let mut object = self.store.get(info.resource, namespace_of(&info), &name)?;
                merge_patch(&mut object, &patch);
                let object =
                    self.store
                        .update(info.resource, namespace_of(&info), &name, object)?;
                Ok(encode_object(
                    info.resource,
                    &object,
                    format,
                    StatusCode::OK,
                ))
            }
            "delete" => {
                let name = info.name.clone().unwrap_or_default();
                let object = self
                    .store
                    .delete(info.resource, namespace_of(&info), &name)?;
                let body = match info.resource.name {
                    "pods" => object,
                    "namespaces" => {
                        let mut object = object;
                        object["status"] = json!({"phase": "Terminating"});
                        object
                    }
                    _ => deleted_status(
                        info.resource,
                        &name,
                        object.pointer("/metadata/uid").unwrap_or(&Value::Null),
                    ),
                };
                Ok(json_response(StatusCode::OK, &body))
            }
            "deletecollection" => {
                let (items, version) = self.select(&info, &query)?;
                let mut deleted = Vec::new();
                for item in items {
                    let name = item
                        .pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let namespace = item
                        .pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    if let Ok(object) = self.store.delete(info.resource, namespace, name) {
                        deleted.push(object);
                    }
                }
                Ok(encode_list(info.resource, deleted, version, None, format))
            }
            _ => Err(ApiError::method_not_allowed(info.verb)),
        }
    }

    fn authorize(&self, subject: &Subject, info: &RequestInfo) -> Result<(), ApiError> {
        let allowed = match subject {
            Subject::Anonymous => false,
            Subject::ServiceAccount(_) => self.rules.as_ref().is_none_or(|rules| {
                rules
                    .iter()
                    .any(|rule| rule.allows(subject.username(), info))
            }),
        };
        if allowed {
            return Ok(());
        }
        Err(ApiError::forbidden(
            subject.username(),
            info.verb,
            info.resource.name,
            info.subresource.as_deref(),
            info.namespace.as_deref(),
            info.name.as_deref(),
        ))
    }

    fn get(&self, info: &RequestInfo, format: Format) -> Result<Response<Body>, ApiError> {
        let name = info.name.as_deref().unwrap_or_default();
        let object = self.store.get(info.resource, namespace_of(info), name)?;
        if format == Format::Table {
            let version = self.store.resource_version();
            let body = table::table(info.resource, &[object], version, true);
            return Ok(json_response(StatusCode::OK, &body));
        }
        Ok(encode_object(
            info.resource,
            &object,
            format,
            StatusCode::OK,
        ))
    }

    fn select(&self, info: &RequestInfo, query: &Query) -> Result<(Vec<Value>, u64), ApiError> {
        let labels = Selector::parse(query.get("labelSelector").unwrap_or_default())?;
        let fields = Selector::parse(query.get("fieldSelector").unwrap_or_default())?;
        fields.check_fields()?;
        let namespace = info.namespace.as_deref();
        Ok(self.store.list(info.resource, namespace, |object| {
            labels.matches_labels(object) && fields.matches_fields(object)
        }))
    }

    fn list(
        &self,
        info: &RequestInfo,
        query: &Query,
        format: Format,
    ) -> Result<Response<Body>, ApiError> {
        let (mut items, version) = self.select(info, query)?;

        // Paging: `continue` contains the namespace/name of the last item sent. Pages are not a
        // consistent snapshot as on the real server.
        if let Some(token) = query.get("continue").filter(|token| !token.is_empty()) {
            let last = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(token)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| ApiError::bad_request("continue key is not valid".to_string()))?;
            items.retain(|item| item_key(item) > last);
        }
        let mut next = None;
        if let Some(limit) = query
            .get("limit")
            .and_then(|text| text.parse::<usize>().ok())
            && limit > 0
            && items.len() > limit
        {
            let remaining = items.len() - limit;
            items.truncate(limit);
            let last = item_key(items.last().expect("limit is positive"));
            let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last);
            next = Some((token, remaining));
        }
        Ok(encode_list(info.resource, items, version, next, format))
    }

    fn create(
        &self,
        info: &RequestInfo,
        body: Value,
        format: Format,
    ) -> Result<Response<Body>, ApiError> {
        check_type_meta(info.resource, &body)?;
        if let Some(name) = body.pointer("/metadata/namespace").and_then(Value::as_str)
            && !name.is_empty()
            && info.resource.namespaced
            && Some(name) != info.namespace.as_deref()
        {
            return Err(ApiError::bad_request(format!(
                "the namespace of the provided object does not match the namespace sent on the request ({name} != {})",
                info.namespace.as_deref().unwrap_or_default()
            )));
        }
        let object = self.store.create(info.resource, namespace_of(info), body)?;
        Ok(encode_object(
            info.resource,
            &object,
            format,
            StatusCode::CREATED,
        ))
    }
}

pub(super) fn namespace_of(info: &RequestInfo) -> &str {
    info.namespace.as_deref().unwrap_or_default()
}

fn item_key(item: &Value) -> String {
    format!(
        "{}/{}",
        item.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default(),
        item.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
    )
}

fn encode_object(
    resource: &Resource,
    object: &Value,
    format: Format,
    status: StatusCode,
) -> Response<Body> {
    match format {
        Format::Protobuf => protobuf_response(
            status,
            proto::envelope("v1", resource.kind, &proto::encode_config_map(object)),
        ),
        Format::Table => {
            let body = table::table(resource, std::slice::from_ref(object), 0, true);
            json_response(status, &body)
        }
        Format::Json => json_response(status, object),
    }
}

fn encode_list(
    resource: &Resource,
    mut items: Vec<Value>,
    version: u64,
    next: Option<(String, usize)>,
    format: Format,
) -> Response<Body> {
    match format {
        Format::Protobuf => {
            // NOTE: the protobuf list carries no continue token.
            let raw = proto::encode_config_map_list(&items, version);
            protobuf_response(
                StatusCode::OK,
                proto::envelope("v1", &format!("{}List", resource.kind), &raw),
            )
        }
        Format::Table => {
            let mut body = table::table(resource, &items, version, true);
            if let Some((token, _)) = &next {
                body["metadata"]["continue"] = json!(token);
            }
            json_response(StatusCode::OK, &body)
        }
        Format::Json => {
            // Items in a list carry no kind or apiVersion of their own in the real server's
            // JSON.
            for item in &mut items {
                if let Some(map) = item.as_object_mut() {
                    map.remove("kind");
                    map.remove("apiVersion");
                }
            }
            let mut metadata = json!({"resourceVersion": version.to_string()});
            if let Some((token, remaining)) = next {
                metadata["continue"] = json!(token);
                metadata["remainingItemCount"] = json!(remaining);
            }
            let body = json!({
                "kind": format!("{}List", resource.kind),
                "apiVersion": resource.api_version(),
                "metadata": metadata,
                "items": items,
            });
            json_response(StatusCode::OK, &body)
        }
    }
}

fn protobuf_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, proto::CONTENT_TYPE)
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("static response parts are valid")
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.split(';').next())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, ApiError> {
    Ok(Limited::new(request.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
        .map_err(|error| {
            ApiError::bad_request(format!(
                "request body could not be read (at most {MAX_REQUEST_BODY} bytes): {error}"
            ))
        })?
        .to_bytes())
}

async fn read_body_json(request: Request<Incoming>) -> Result<Value, ApiError> {
    let body = read_body(request).await?;
    serde_json::from_slice(&body)
        .map_err(|error| ApiError::bad_request(format!("request body is not valid JSON: {error}")))
}

/// Reads an object body: JSON, or protobuf for the kinds [`proto::decode_object`] reads.
/// Other content types are rejected as the real server rejects what it has no decoder for.
async fn read_json(request: Request<Incoming>) -> Result<Value, ApiError> {
    let content_type = content_type(request.headers());
    let body = match content_type.as_str() {
        "" | "application/json" => read_body_json(request).await?,
        proto::CONTENT_TYPE => {
            let bytes = read_body(request).await?;
            proto::decode_object(&bytes)
                .map_err(|error| ApiError::bad_request(error.to_string()))?
        }
        // NOTE: YAML request bodies are not decoded.
        _ => return Err(ApiError::unsupported_media_type(&content_type)),
    };
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "request body must be a JSON object".to_string(),
        ));
    }
    Ok(body)
}

fn check_type_meta(resource: &Resource, body: &Value) -> Result<(), ApiError> {
    let kind = body.get("kind").and_then(Value::as_str).unwrap_or_default();
    let api_version = body
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !kind.is_empty() && kind != resource.kind {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({kind}) does not match the expected kind ({})",
            resource.kind
        )));
    }
    let expected = resource.api_version();
    if !api_version.is_empty() && api_version != expected {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({expected})"
        )));
    }
    Ok(())
}

/// Applies a JSON merge patch (RFC 7386). Strategic merge patches are applied the same way,
/// which is exact for maps and scalars and replaces lists whole.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(patch_map) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let target_map = target.as_object_mut().expect("made an object above");
    for (key, value) in patch_map {
        if value.is_null() {
            target_map.remove(key);
        } else {
            merge_patch(target_map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Derives verb, resource, namespace and name from a `/api/v1/...` path.
pub fn request_info(
    method: &Method,
    segments: &[&str],
    query: &Query,
) -> Result<RequestInfo, ApiError> {
    let (group, rest) = match segments {
        ["api", "v1", rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", group, "v1", rest @ ..] if !rest.is_empty() && !group.is_empty() => (*group, rest),
        _ => return Err(ApiError::path_not_found()),
    };
    // `/api/v1/namespaces/NS/RESOURCE...` names a namespaced resource; `/api/v1/namespaces`
    // and `/api/v1/namespaces/NS` the namespaces themselves.
    let (namespace, rest) = match rest {
        ["namespaces", namespace, resource, tail @ ..] => {
            let mut parts = vec![*resource];
            parts.extend_from_slice(tail);
            (Some(namespace.to_string()), parts)
        }
        other => (None, other.to_vec()),
    };
    let resource_name = rest.first().copied().unwrap_or_default();
    let resource = store::resource_in(group, resource_name).ok_or_else(ApiError::path_not_found)?;
    if namespace.is_some() && !resource.namespaced {
        return Err(ApiError::path_not_found());
    }
    let name = rest.get(1).map(|name| name.to_string());
    let subresource = rest.get(2).map(|sub| sub.to_string());
    if rest.len() > 3 {
        return Err(ApiError::path_not_found());
    }
    if resource.namespaced && namespace.is_none() && name.is_some() {
        return Err(ApiError::path_not_found());
    }

    let watch = query.flag("watch")?;
    let verb = match (method, name.is_some()) {
        (&Method::GET, _) if subresource.is_some() => "get",
        (&Method::POST, true) if subresource.is_some() => "create",
        (&Method::GET, true) if watch => "watch",
        (&Method::GET, true) => "get",
        (&Method::GET, false) if watch => "watch",
        (&Method::GET, false) => "list",
        (&Method::POST, false) => "create",
        (&Method::PUT, true) => "update",
        (&Method::PATCH, true) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => return Err(ApiError::method_not_allowed(method.as_str())),
    };
    // Exec and port-forward are authorized as `create` whatever the HTTP method, as the real
    // server does since it checks WebSocket upgrades (GET) the same way as SPDY (POST).
    let verb = if matches!(
        subresource.as_deref(),
        Some("exec" | "portforward" | "attach")
    ) {
        "create"
    } else {
        verb
    };
    Ok(RequestInfo {
        verb,
        resource,
        subresource,
        namespace,
        name,
    })
}

/// Compresses a response body of known length with gzip and labels it `Content-Encoding:
/// gzip`, whatever the request's `Accept-Encoding`. Streamed bodies (watch), empty bodies
/// and upgrades are returned as they are.
async fn gzip_complete_body(response: Response<Body>) -> Response<Body> {
    use std::io::Write as _;

    let known_length = hyper::body::Body::size_hint(response.body())
        .exact()
        .unwrap_or(0);
    if response.status() == StatusCode::SWITCHING_PROTOCOLS || known_length == 0 {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(collected) = body.collect().await;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder
        .write_all(&collected.to_bytes())
        .expect("gzip into memory cannot fail");
    let compressed = encoder.finish().expect("gzip into memory cannot fail");
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_ENCODING,
        http::HeaderValue::from_static("gzip"),
    );
    Response::from_parts(parts, Full::new(Bytes::from(compressed)).boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_info_derives_verbs() {
        let query = Query::parse(Some("watch=true"));
        let none = Query::default();
        type Case<'a> = (
            &'a Method,
            &'a str,
            &'a Query,
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
        );
        let cases: [Case; 6] = [
            (
                &Method::GET,
                "api/v1/namespaces/default/pods",
                &none,
                "list",
                Some("default"),
                None,
            ),
            (&Method::GET, "api/v1/pods", &query, "watch", None, None),
            (
                &Method::GET,
                "api/v1/namespaces/a/secrets/s",
                &none,
                "get",
                Some("a"),
                Some("s"),
            ),
            (
                &Method::POST,
                "api/v1/namespaces/a/pods/p/exec",
                &none,
                "create",
                Some("a"),
                Some("p"),
            ),
            (
                &Method::GET,
                "api/v1/namespaces/a/pods/p/exec",
                &none,
                "create",
                Some("a"),
                Some("p"),
            ),
            (
                &Method::DELETE,
                "api/v1/namespaces/x",
                &none,
                "delete",
                None,
                Some("x"),
            ),
        ];
        for (method, path, query, verb, namespace, name) in cases {
            let segments: Vec<&str> = path.split('/').collect();
            let info = request_info(method, &segments, query).expect(path);
            assert_eq!(info.verb, verb, "{path}");
            assert_eq!(info.namespace.as_deref(), namespace, "{path}");
            assert_eq!(info.name.as_deref(), name, "{path}");
        }
    }

    #[test]
    fn query_decodes_repeated_commands() {
        let query = Query::parse(Some("command=sh&command=-c&command=exit%203&stdin=true"));
        assert_eq!(query.all("command"), ["sh", "-c", "exit 3"]);
        assert_eq!(query.flag("stdin"), Ok(true));
    }

    #[test]
    fn accept_header_picks_table_and_protobuf() {
        let configmaps = store::resource("configmaps");
        let pods = store::resource("pods");
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
                .parse()
                .expect("header"),
        );
        assert_eq!(negotiate(&headers, pods), Ok(Format::Table));
        headers.insert(
            header::ACCEPT,
            "application/vnd.kubernetes.protobuf, application/json"
                .parse()
                .expect("header"),
        );
        assert_eq!(negotiate(&headers, configmaps), Ok(Format::Protobuf));
        assert_eq!(negotiate(&headers, pods), Ok(Format::Json));
        headers.insert(header::ACCEPT, "text/html".parse().expect("header"));
        assert_eq!(negotiate(&headers, pods).map_err(|e| e.code), Err(406));
    }
}
