//! Protobuf encoding (`application/vnd.kubernetes.protobuf`) of ConfigMap and ConfigMapList.
//!
//! # Format
//! A body is the 4-byte magic `k8s\0` followed by a `runtime.Unknown` message:
//! `typeMeta` (1: `apiVersion` 1, `kind` 2), `raw` (2: the object's own message),
//! `contentEncoding` (3), `contentType` (4). Field numbers are those of the upstream
//! `generated.proto` files of `k8s.io/api/core/v1`, `k8s.io/apimachinery/pkg/apis/meta/v1`
//! and `k8s.io/apimachinery/pkg/runtime` (Kubernetes 1.32):
//! - ConfigMap: `metadata` 1, `data` 2 (map), `binaryData` 3 (map), `immutable` 4;
//! - ConfigMapList: `metadata` 1 (ListMeta), `items` 2;
//! - ObjectMeta: `name` 1, `generateName` 2, `namespace` 3, `uid` 5, `resourceVersion` 6,
//!   `generation` 7, `creationTimestamp` 8, `deletionTimestamp` 9, `labels` 11,
//!   `annotations` 12, `finalizers` 14;
//! - ListMeta: `resourceVersion` 2, `continue` 3;
//! - Time: `seconds` 1, `nanos` 2;
//! - a map entry: `key` 1, `value` 2.
//!
//! Request bodies of Secret, ConfigMap and Namespace are decoded too, because kubectl's
//! `create secret`, `create configmap` and `create namespace` send protobuf.
//!
//! NOTE: `ownerReferences` and `managedFields` are not encoded; the store never sets them.

use base64::Engine as _;
use serde_json::Value;

/// Magic prefix of every protobuf body.
pub const MAGIC: &[u8] = b"k8s\0";
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";
/// Content type of a protobuf watch response.
pub const WATCH_CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf;stream=watch";

const WIRE_VARINT: u64 = 0;
const WIRE_LEN: u64 = 2;

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, (field << 3) | WIRE_LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_varint_field(out: &mut Vec<u8>, field: u64, value: u64) {
    put_varint(out, (field << 3) | WIRE_VARINT);
    put_varint(out, value);
}

/// Writes an optional string field; proto2 `optional` fields are written when set, even empty.
fn put_str(out: &mut Vec<u8>, field: u64, value: Option<&Value>) {
    if let Some(text) = value.and_then(Value::as_str) {
        put_bytes(out, field, text.as_bytes());
    }
}

/// Writes a `map<string, string>` (or `map<string, bytes>` with `decode_base64`), entries in
/// key order as Go's marshaller writes them.
fn put_map(out: &mut Vec<u8>, field: u64, value: Option<&Value>, decode_base64: bool) {
    let Some(map) = value.and_then(Value::as_object) else {
        return;
    };
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    for key in keys {
        let text = map[key].as_str().unwrap_or_default();
        let bytes = if decode_base64 {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .unwrap_or_default()
        } else {
            text.as_bytes().to_vec()
        };
        let mut entry = Vec::new();
        put_bytes(&mut entry, 1, key.as_bytes());
        put_bytes(&mut entry, 2, &bytes);
        put_bytes(out, field, &entry);
    }
}

fn encode_time(text: &str) -> Option<Vec<u8>> {
    let time = chrono::DateTime::parse_from_rfc3339(text).ok()?;
    let mut out = Vec::new();
    put_varint_field(&mut out, 1, time.timestamp() as u64);
    let nanos = time.timestamp_subsec_nanos();
    if nanos != 0 {
        put_varint_field(&mut out, 2, u64::from(nanos));
    }
    Some(out)
}

fn encode_object_meta(metadata: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    put_str(&mut out, 1, metadata.get("name"));
    put_str(&mut out, 2, metadata.get("generateName"));
    put_str(&mut out, 3, metadata.get("namespace"));
    put_str(&mut out, 5, metadata.get("uid"));
    put_str(&mut out, 6, metadata.get("resourceVersion"));
    if let Some(generation) = metadata.get("generation").and_then(Value::as_i64) {
        put_varint_field(&mut out, 7, generation as u64);
    }
    for (field, name) in [(8, "creationTimestamp"), (9, "deletionTimestamp")] {
        if let Some(time) = metadata
            .get(name)
            .and_then(Value::as_str)
            .and_then(encode_time)
        {
            put_bytes(&mut out, field, &time);
        }
    }
    put_map(&mut out, 11, metadata.get("labels"), false);
    put_map(&mut out, 12, metadata.get("annotations"), false);
    if let Some(finalizers) = metadata.get("finalizers").and_then(Value::as_array) {
        for finalizer in finalizers.iter().filter_map(Value::as_str) {
            put_bytes(&mut out, 14, finalizer.as_bytes());
        }
    }
    out
}

/// Encodes a ConfigMap's own message (the `raw` of the envelope).
pub fn encode_config_map(object: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    let metadata = object.get("metadata").cloned().unwrap_or(Value::Null);
    put_bytes(&mut out, 1, &encode_object_meta(&metadata));
    put_map(&mut out, 2, object.get("data"), false);
    put_map(&mut out, 3, object.get("binaryData"), true);
    if let Some(immutable) = object.get("immutable").and_then(Value::as_bool) {
        put_varint_field(&mut out, 4, u64::from(immutable));
    }
    out
}

/// Encodes a ConfigMapList's own message.
pub fn encode_config_map_list(items: &[Value], resource_version: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut list_meta = Vec::new();
    put_bytes(&mut list_meta, 2, resource_version.to_string().as_bytes());
    put_bytes(&mut out, 1, &list_meta);
    for item in items {
        put_bytes(&mut out, 2, &encode_config_map(item));
    }
    out
}

/// Wraps an object's message in the `k8s\0` + `runtime.Unknown` envelope.
pub fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
    let mut type_meta = Vec::new();
    put_bytes(&mut type_meta, 1, api_version.as_bytes());
    put_bytes(&mut type_meta, 2, kind.as_bytes());

    let mut out = MAGIC.to_vec();
    put_bytes(&mut out, 1, &type_meta);
    put_bytes(&mut out, 2, raw);
    // contentEncoding and contentType are empty strings in what the real server sends.
    put_bytes(&mut out, 3, b"");
    put_bytes(&mut out, 4, b"");
    out
}

/// Encodes one ConfigMap watch event as a frame of a protobuf watch stream: a 4-byte
/// big-endian length, then a `WatchEvent` (`type` 1, `object` 2 as a RawExtension whose
/// `raw` 1 contains the enveloped ConfigMap) in its own envelope.
///
/// NOTE: the outer envelope's `apiVersion` is `v1`, not checked against a real server's
/// bytes. ERROR events are not encoded (a `Status` needs its own message), so a protobuf
/// watch that falls behind ends without one.
pub fn watch_event_frame(event_type: &str, object: &Value) -> Vec<u8> {
    let inner = envelope("v1", "ConfigMap", &encode_config_map(object));
    let mut raw_extension = Vec::new();
    put_bytes(&mut raw_extension, 1, &inner);
    let mut event = Vec::new();
    put_bytes(&mut event, 1, event_type.as_bytes());
    put_bytes(&mut event, 2, &raw_extension);
    let message = envelope("v1", "WatchEvent", &event);

    let mut frame = (message.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&message);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Splits a message into (field, wire type, payload) triples; varints come back as their
    /// little-endian bytes of the decoded value.
    fn fields(mut bytes: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
        fn varint(bytes: &mut &[u8]) -> u64 {
            let mut value = 0;
            let mut shift = 0;
            loop {
                let byte = bytes[0];
                *bytes = &bytes[1..];
                value |= u64::from(byte & 0x7f) << shift;
                if byte < 0x80 {
                    return value;
                }
                shift += 7;
            }
        }
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let tag = varint(&mut bytes);
            let (field, wire) = (tag >> 3, tag & 7);
            if wire == WIRE_LEN {
                let len = varint(&mut bytes) as usize;
                out.push((field, wire, bytes[..len].to_vec()));
                bytes = &bytes[len..];
            } else {
                out.push((field, wire, varint(&mut bytes).to_le_bytes().to_vec()));
            }
        }
        out
    }

    #[test]
    fn config_map_envelope_has_upstream_field_numbers() {
        let object = json!({
            "metadata": {"name": "cards", "namespace": "default", "resourceVersion": "7",
                         "creationTimestamp": "2026-01-02T03:04:05Z"},
            "data": {"b": "2", "a": "1"},
        });
        let body = envelope("v1", "ConfigMap", &encode_config_map(&object));
        assert_eq!(&body[..4], MAGIC);

        let unknown = fields(&body[4..]);
        let type_meta = fields(&unknown[0].2);
        assert_eq!(type_meta[0], (1, WIRE_LEN, b"v1".to_vec()));
        assert_eq!(type_meta[1], (2, WIRE_LEN, b"ConfigMap".to_vec()));
        assert_eq!(unknown[1].0, 2);

        let config_map = fields(&unknown[1].2);
        let metadata = fields(&config_map[0].2);
        assert_eq!(metadata[0], (1, WIRE_LEN, b"cards".to_vec()));
        assert_eq!(metadata[1], (3, WIRE_LEN, b"default".to_vec()));
        assert_eq!(metadata[2], (6, WIRE_LEN, b"7".to_vec()));
        let created = fields(&metadata[3].2);
        assert_eq!(metadata[3].0, 8);
        assert_eq!(created[0].0, 1);

        let first_entry = fields(&config_map[1].2);
        assert_eq!(config_map[1].0, 2);
        assert_eq!(first_entry[0], (1, WIRE_LEN, b"a".to_vec()));
        assert_eq!(first_entry[1], (2, WIRE_LEN, b"1".to_vec()));
    }
}

/// A protobuf request body that could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("protobuf body is invalid: {reason}")]
pub struct DecodeError {
    reason: &'static str,
}

fn invalid(reason: &'static str) -> DecodeError {
    DecodeError { reason }
}

/// One field of a message: its number and either a varint or a length-delimited payload.
enum FieldValue<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn read_varint(bytes: &mut &[u8]) -> Result<u64, DecodeError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first().ok_or(invalid("truncated varint"))?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Ok(value);
        }
    }
    Err(invalid("varint longer than 10 bytes"))
}

/// Splits a message into its fields; fixed-width fields (wire types 1 and 5) are skipped.
fn read_fields(mut bytes: &[u8]) -> Result<Vec<(u64, FieldValue<'_>)>, DecodeError> {
    let mut fields = Vec::new();
    while !bytes.is_empty() {
        let tag = read_varint(&mut bytes)?;
        let value = match tag & 7 {
            0 => FieldValue::Varint(read_varint(&mut bytes)?),
            2 => {
                let len = usize::try_from(read_varint(&mut bytes)?)
                    .map_err(|_| invalid("length does not fit in memory"))?;
                if len > bytes.len() {
                    return Err(invalid("length runs past the end of the message"));
                }
                let (payload, rest) = bytes.split_at(len);
                bytes = rest;
                FieldValue::Bytes(payload)
            }
            1 => {
                bytes = bytes.get(8..).ok_or(invalid("truncated fixed64"))?;
                continue;
            }
            5 => {
                bytes = bytes.get(4..).ok_or(invalid("truncated fixed32"))?;
                continue;
            }
            _ => return Err(invalid("unsupported wire type")),
        };
        fields.push((tag >> 3, value));
    }
    Ok(fields)
}

fn text(payload: &[u8]) -> Result<String, DecodeError> {
    String::from_utf8(payload.to_vec()).map_err(|_| invalid("string field is not UTF-8"))
}

/// Reads a map entry; with `base64_value` the value is bytes and becomes base64 text, as in
/// the JSON form of `map<string, bytes>`.
fn read_entry(payload: &[u8], base64_value: bool) -> Result<(String, Value), DecodeError> {
    let mut key = String::new();
    let mut value = Value::String(String::new());
    for (field, entry) in read_fields(payload)? {
        match (field, entry) {
            (1, FieldValue::Bytes(bytes)) => key = text(bytes)?,
            (2, FieldValue::Bytes(bytes)) if base64_value => {
                value = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
            }
            (2, FieldValue::Bytes(bytes)) => value = Value::String(text(bytes)?),
            _ => {}
        }
    }
    Ok((key, value))
}

fn insert_entry(
    object: &mut serde_json::Map<String, Value>,
    name: &str,
    payload: &[u8],
    base64_value: bool,
) -> Result<(), DecodeError> {
    let (key, value) = read_entry(payload, base64_value)?;
    object
        .entry(name)
        .or_insert_with(|| Value::Object(serde_json::Map::new()))
        .as_object_mut()
        .expect("map fields are objects")
        .insert(key, value);
    Ok(())
}

/// Decodes the ObjectMeta fields a client sets on create: name, generateName, namespace,
/// labels, annotations, finalizers.
fn decode_object_meta(payload: &[u8]) -> Result<Value, DecodeError> {
    let mut meta = serde_json::Map::new();
    for (field, value) in read_fields(payload)? {
        let FieldValue::Bytes(bytes) = value else {
            continue;
        };
        match field {
            1 => drop(meta.insert("name".into(), Value::String(text(bytes)?))),
            2 => drop(meta.insert("generateName".into(), Value::String(text(bytes)?))),
            3 => drop(meta.insert("namespace".into(), Value::String(text(bytes)?))),
            6 => drop(meta.insert("resourceVersion".into(), Value::String(text(bytes)?))),
            11 => insert_entry(&mut meta, "labels", bytes, false)?,
            12 => insert_entry(&mut meta, "annotations", bytes, false)?,
            14 => meta
                .entry("finalizers")
                .or_insert_with(|| Value::Array(Vec::new()))
                .as_array_mut()
                .expect("finalizers is an array")
                .push(Value::String(text(bytes)?)),
            _ => {}
        }
    }
    Ok(Value::Object(meta))
}

/// Decodes a `k8s\0` request body of a Secret, ConfigMap or Namespace into its JSON form.
/// Field numbers: Secret `metadata` 1, `data` 2 (`map<string, bytes>`), `type` 3,
/// `stringData` 4, `immutable` 5; Namespace `metadata` 1 (its spec and status are not read).
pub fn decode_object(body: &[u8]) -> Result<Value, DecodeError> {
    let envelope = body
        .strip_prefix(MAGIC)
        .ok_or(invalid("body does not start with k8s\\0"))?;
    let mut api_version = String::new();
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    for (field, value) in read_fields(envelope)? {
        match (field, value) {
            (1, FieldValue::Bytes(type_meta)) => {
                for (field, value) in read_fields(type_meta)? {
                    match (field, value) {
                        (1, FieldValue::Bytes(bytes)) => api_version = text(bytes)?,
                        (2, FieldValue::Bytes(bytes)) => kind = text(bytes)?,
                        _ => {}
                    }
                }
            }
            (2, FieldValue::Bytes(bytes)) => raw = bytes,
            _ => {}
        }
    }

    let mut object = serde_json::Map::new();
    object.insert("kind".into(), Value::String(kind.clone()));
    object.insert("apiVersion".into(), Value::String(api_version));
    for (field, value) in read_fields(raw)? {
        match (kind.as_str(), field, value) {
            (_, 1, FieldValue::Bytes(bytes)) => {
                object.insert("metadata".into(), decode_object_meta(bytes)?);
            }
            ("ConfigMap", 2, FieldValue::Bytes(bytes)) => {
                insert_entry(&mut object, "data", bytes, false)?;
            }
            ("ConfigMap", 3, FieldValue::Bytes(bytes)) => {
                insert_entry(&mut object, "binaryData", bytes, true)?;
            }
            ("ConfigMap", 4, FieldValue::Varint(flag))
            | ("Secret", 5, FieldValue::Varint(flag)) => {
                object.insert("immutable".into(), Value::Bool(flag != 0));
            }
            ("Secret", 2, FieldValue::Bytes(bytes)) => {
                insert_entry(&mut object, "data", bytes, true)?;
            }
            ("Secret", 3, FieldValue::Bytes(bytes)) => {
                object.insert("type".into(), Value::String(text(bytes)?));
            }
            ("Secret", 4, FieldValue::Bytes(bytes)) => {
                insert_entry(&mut object, "stringData", bytes, false)?;
            }
            ("ConfigMap" | "Secret" | "Namespace", _, _) => {}
            _ => {
                return Err(invalid(
                    "only Secret, ConfigMap and Namespace bodies are decoded",
                ));
            }
        }
    }
    Ok(Value::Object(object))
}
