//! `Status` objects the gateway answers with itself (denials, upstream failures), encoded as
//! JSON or as Kubernetes protobuf, whichever the client's `Accept` header prefers, so client
//! libraries show them like the API server's own errors.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};

/// Content type of Kubernetes protobuf bodies.
pub const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";
/// Prefix of every Kubernetes protobuf body: `k8s` and a zero byte.
const PROTOBUF_MAGIC: &[u8] = b"k8s\0";

/// A failure `Status`: what the API server returns for a rejected request.
#[derive(Clone, Debug)]
pub struct Status {
    pub code: StatusCode,
    /// Machine-readable reason, such as `Forbidden` or `ServiceUnavailable`.
    pub reason: &'static str,
    pub message: String,
    /// `details.name`, `details.group` and `details.kind`: the object the request was for.
    pub name: String,
    pub group: String,
    pub kind: String,
}

impl Status {
    /// Builds a status about no object in particular, with empty details.
    pub fn new(code: StatusCode, reason: &'static str, message: String) -> Self {
        Self {
            code,
            reason,
            message,
            name: String::new(),
            group: String::new(),
            kind: String::new(),
        }
    }

    /// Encodes the status in the format the `Accept` header prefers: protobuf when it lists the
    /// Kubernetes protobuf type before JSON, JSON otherwise.
    pub fn encode(&self, headers: &HeaderMap) -> (HeaderValue, Bytes) {
        if prefers_protobuf(headers) {
            (HeaderValue::from_static(PROTOBUF), self.to_protobuf())
        } else {
            (HeaderValue::from_static("application/json"), self.to_json())
        }
    }

    fn to_json(&self) -> Bytes {
        let mut details = serde_json::Map::new();
        for (key, value) in [
            ("name", &self.name),
            ("group", &self.group),
            ("kind", &self.kind),
        ] {
            if !value.is_empty() {
                details.insert(key.into(), value.as_str().into());
            }
        }
        let mut status = serde_json::json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        });
        if !details.is_empty() {
            status["details"] = details.into();
        }
        Bytes::from(status.to_string())
    }

    /// Encodes the status as `k8s\0` followed by a `runtime.Unknown` message whose `raw` field
    /// holds the `meta.v1.Status` message. Field numbers are those of the API's generated.proto
    /// files (apimachinery v0.32): Unknown {typeMeta 1, raw 2, contentEncoding 3, contentType
    /// 4}, TypeMeta {apiVersion 1, kind 2}, Status {metadata 1, status 2, message 3, reason 4,
    /// details 5, code 6}, StatusDetails {name 1, group 2, kind 3}.
    fn to_protobuf(&self) -> Bytes {
        let mut details = Vec::new();
        put_string(&mut details, 1, &self.name);
        put_string(&mut details, 2, &self.group);
        put_string(&mut details, 3, &self.kind);

        let mut status = Vec::new();
        put_bytes(&mut status, 1, &[]);
        put_string(&mut status, 2, "Failure");
        put_string(&mut status, 3, &self.message);
        put_string(&mut status, 4, self.reason);
        if !details.is_empty() {
            put_bytes(&mut status, 5, &details);
        }
        put_varint_field(&mut status, 6, u64::from(self.code.as_u16()));

        let mut type_meta = Vec::new();
        put_string(&mut type_meta, 1, "v1");
        put_string(&mut type_meta, 2, "Status");

        let mut body = PROTOBUF_MAGIC.to_vec();
        put_bytes(&mut body, 1, &type_meta);
        put_bytes(&mut body, 2, &status);
        put_string(&mut body, 3, "");
        put_string(&mut body, 4, "");
        Bytes::from(body)
    }
}

/// Whether the `Accept` header lists Kubernetes protobuf ahead of any JSON type.
fn prefers_protobuf(headers: &HeaderMap) -> bool {
    for value in headers.get_all(header::ACCEPT) {
        let Ok(value) = value.to_str() else { continue };
        for media in value.split(',') {
            let media = media.split(';').next().unwrap_or("").trim();
            if media.eq_ignore_ascii_case(PROTOBUF) {
                return true;
            }
            if media.eq_ignore_ascii_case("application/json") || media.ends_with("+json") {
                return false;
            }
        }
    }
    false
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u64, value: u64) {
    put_varint(out, field << 3);
    put_varint(out, value);
}

/// Writes a length-delimited field. Kubernetes' generated marshallers write optional strings
/// even when empty, and so does this.
fn put_bytes(out: &mut Vec<u8>, field: u64, value: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

fn put_string(out: &mut Vec<u8>, field: u64, value: &str) {
    put_bytes(out, field, value.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden() -> Status {
        Status {
            code: StatusCode::FORBIDDEN,
            reason: "Forbidden",
            message: "pods \"web\" is forbidden: denied by gateway rule \"no-exec\"".into(),
            name: "web".into(),
            group: String::new(),
            kind: "pods".into(),
        }
    }

    #[test]
    fn status_json_by_default() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, */*"),
        );
        let (content_type, body) = forbidden().encode(&headers);
        assert_eq!(content_type, "application/json");
        let value: serde_json::Value = serde_json::from_slice(&body).expect("JSON status");
        assert_eq!(value["kind"], "Status");
        assert_eq!(value["reason"], "Forbidden");
        assert_eq!(value["code"], 403);
        assert_eq!(value["details"]["name"], "web");
        assert_eq!(value["details"]["kind"], "pods");
        assert!(value["details"].get("group").is_none());
    }

    #[test]
    fn status_protobuf_when_preferred() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.kubernetes.protobuf,application/json"),
        );
        let (content_type, body) = forbidden().encode(&headers);
        assert_eq!(content_type, PROTOBUF);
        assert!(body.starts_with(PROTOBUF_MAGIC));
        // Unknown.typeMeta: apiVersion "v1", kind "Status".
        let type_meta = [0x0a, 0x0c, 0x0a, 0x02, b'v', b'1', 0x12, 0x06];
        assert_eq!(&body[4..12], &type_meta);
        assert_eq!(&body[12..18], b"Status");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("denied by gateway rule"));
        // Status.code 403 as a varint: field 6, wire type 0, then 0x93 0x03.
        assert!(body.windows(3).any(|window| window == [0x30, 0x93, 0x03]));
    }
}
