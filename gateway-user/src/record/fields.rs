//! The fields of one record, serialized as JSON members while they are added.
//!
//! Every string that code outside the recording module adds goes through the PAN masker on its
//! way in, so handlers cannot put a card number in clear into a record, whichever thread builds
//! it. The writer copies the bytes into the line after the chain fields. A handler that records a statement per round trip builds one buffer this
//! way, where a `serde_json::Value` object would allocate a tree node, a key and a value per
//! field, and the writer thread would free them all again.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::mask::{self, MaskPolicy};

/// Keys every record line starts with.
const CHAIN_KEYS: &[&str] = &["v", "seq", "prev", "time", "event"];
/// Keys a session record gets from its session: the chain keys, `session`, `node` and `protocol`.
const SESSION_KEYS: &[&str] = &[
    "v", "seq", "prev", "time", "event", "session", "node", "protocol",
];
/// Keys a journal record gets from the journal: the chain keys and `node`.
const JOURNAL_KEYS: &[&str] = &["v", "seq", "prev", "time", "event", "node"];

/// Minimum number of digits in a PAN. Strings with fewer are written without a scan.
const MIN_PAN_DIGITS: usize = 13;

/// JSON members of a record (`,"key":value` each), with every string masked unless the
/// recording module added it verbatim.
///
/// A key that the line already carries (the chain keys, and the session's or the journal's own
/// keys) is a bug in the caller: debug builds panic on it, release builds leave the field out.
/// Add each key once, because a repeated key is written twice.
#[derive(Clone, PartialEq, Eq)]
pub struct Fields {
    json: Vec<u8>,
    reserved: &'static [&'static str],
}

impl std::fmt::Debug for Fields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The text is masked already.
        f.debug_tuple("Fields")
            .field(&String::from_utf8_lossy(&self.json))
            .finish()
    }
}

impl Default for Fields {
    fn default() -> Self {
        Self::new()
    }
}

impl Fields {
    /// Empty fields for a session record.
    pub fn new() -> Self {
        Self::with_reserved(SESSION_KEYS)
    }

    /// Empty fields for a journal record, which may use `session` and `protocol`.
    pub fn journal() -> Self {
        Self::with_reserved(JOURNAL_KEYS)
    }

    /// Empty fields for the keys a session or the journal adds to each of its lines (`session`,
    /// `node`, `protocol`), which only the chain keys limit.
    pub(super) fn base() -> Self {
        Self::with_reserved(CHAIN_KEYS)
    }

    fn with_reserved(reserved: &'static [&'static str]) -> Self {
        Self {
            json: Vec::with_capacity(256),
            reserved,
        }
    }

    /// Session fields from a JSON object, masked. A value other than an object becomes the
    /// single field `value`, and `null` no fields.
    pub fn from_value(value: Value) -> Self {
        Self::new().with_value(value)
    }

    /// Journal fields from a JSON object, like [`from_value`](Self::from_value).
    pub fn journal_from_value(value: Value) -> Self {
        Self::journal().with_value(value)
    }

    /// Appends the members of `map`, masked, to `fields`.
    pub(super) fn from_map(map: &Map<String, Value>, fields: Self) -> Self {
        fields.with_map(map, Masking::On)
    }

    /// Appends the members of `map` to `fields` as they are. Only for records the writer makes
    /// of its own values (ids, digests, signatures): masking a digit run in a digest or a
    /// signature would break the chain's verification.
    pub(super) fn from_map_verbatim(map: &Map<String, Value>, fields: Self) -> Self {
        fields.with_map(map, Masking::Off)
    }

    fn with_map(mut self, map: &Map<String, Value>, masking: Masking) -> Self {
        for (key, value) in map {
            if self.start_member(key) {
                write_value(&mut self.json, value, masking);
            }
        }
        self
    }

    fn with_value(self, value: Value) -> Self {
        match value {
            Value::Object(map) => Self::from_map(&map, self),
            Value::Null => self,
            other => {
                let mut fields = self;
                fields.value("value", &other);
                fields
            }
        }
    }

    /// Returns the members as JSON text, each with its leading comma.
    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.json
    }

    /// Adds a string, masked.
    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        if self.start_member(key) {
            write_masked_str(&mut self.json, value);
        }
        self
    }

    /// Adds a string as it is, like [`from_map_verbatim`](Self::from_map_verbatim).
    pub(super) fn str_verbatim(&mut self, key: &str, value: &str) -> &mut Self {
        if self.start_member(key) {
            write_str(&mut self.json, value);
        }
        self
    }

    /// Adds a string, masked, or `null`.
    pub fn opt_str(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        if self.start_member(key) {
            match value {
                Some(value) => write_masked_str(&mut self.json, value),
                None => self.json.extend_from_slice(b"null"),
            }
        }
        self
    }

    /// Adds an array of strings, each masked.
    pub fn strs<S: AsRef<str>>(&mut self, key: &str, values: &[S]) -> &mut Self {
        if self.start_member(key) {
            self.json.push(b'[');
            for (index, value) in values.iter().enumerate() {
                if index > 0 {
                    self.json.push(b',');
                }
                write_masked_str(&mut self.json, value.as_ref());
            }
            self.json.push(b']');
        }
        self
    }

    /// Adds an unsigned number.
    pub fn u64(&mut self, key: &str, value: u64) -> &mut Self {
        if self.start_member(key) {
            serde_json::to_writer(&mut self.json, &value).expect("numbers serialize");
        }
        self
    }

    /// Adds a JSON value with every string in it masked, at any depth.
    pub fn value(&mut self, key: &str, value: &Value) -> &mut Self {
        if self.start_member(key) {
            write_value(&mut self.json, value, Masking::On);
        }
        self
    }

    /// Adds an array of JSON values with every string in them masked.
    pub fn values(&mut self, key: &str, values: &[Value]) -> &mut Self {
        if self.start_member(key) {
            self.json.push(b'[');
            for (index, value) in values.iter().enumerate() {
                if index > 0 {
                    self.json.push(b',');
                }
                write_value(&mut self.json, value, Masking::On);
            }
            self.json.push(b']');
        }
        self
    }

    /// Adds any serializable value, through a JSON value, with every string in it masked.
    pub fn serialize<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> &mut Self {
        match serde_json::to_value(value) {
            Ok(value) => self.value(key, &value),
            // Only maps with keys other than strings fail, and no record uses one.
            Err(error) => self.str(key, &format!("<not serializable: {error}>")),
        }
    }

    /// Writes `,"key":` and returns true, or returns false for a reserved key.
    fn start_member(&mut self, key: &str) -> bool {
        if self.reserved.contains(&key) {
            debug_assert!(
                false,
                "record field {key:?} is reserved for the line itself"
            );
            return false;
        }
        self.json.push(b',');
        write_str(&mut self.json, key);
        self.json.push(b':');
        true
    }
}

impl From<Value> for Fields {
    fn from(value: Value) -> Self {
        Self::from_value(value)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Masking {
    On,
    Off,
}

/// Writes `value` as JSON, with every string in it masked unless `masking` is off.
fn write_value(out: &mut Vec<u8>, value: &Value, masking: Masking) {
    match value {
        Value::String(text) if masking == Masking::On => write_masked_str(out, text),
        Value::String(text) => write_str(out, text),
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_value(out, item, masking);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            out.push(b'{');
            for (index, (key, item)) in map.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_str(out, key);
                out.push(b':');
                write_value(out, item, masking);
            }
            out.push(b'}');
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {
            serde_json::to_writer(&mut *out, value).expect("JSON scalars serialize");
        }
    }
}

/// Writes `text` as a JSON string after masking the PANs in it. Keys are not masked: they are
/// names from the code, never data.
fn write_masked_str(out: &mut Vec<u8>, text: &str) {
    if text.bytes().filter(u8::is_ascii_digit).count() < MIN_PAN_DIGITS {
        write_str(out, text);
        return;
    }
    let mut bytes = text.as_bytes().to_vec();
    let policy = MaskPolicy::default();
    mask::mask_in_place_with_hex(&mut bytes, &policy);
    // Masking swaps ASCII digits for the ASCII mask byte and hex digits for hex digits, so the
    // text stays UTF-8.
    write_str(
        out,
        std::str::from_utf8(&bytes).expect("masking keeps UTF-8"),
    );
}

fn write_str(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(&mut *out, text).expect("strings serialize");
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(fields: &Fields) -> Value {
        let mut text = b"{\"v\":1".to_vec();
        text.extend_from_slice(fields.as_bytes());
        text.push(b'}');
        serde_json::from_slice(&text).expect("fields form valid JSON members")
    }

    #[test]
    fn builder_masks_every_string() {
        let mut fields = Fields::new();
        fields
            .str("statement", "SELECT '4111 1111 1111 1111'")
            .opt_str("rule", None)
            .strs("tables", &["cards", "5555-5555-5555-4444"])
            .u64("rows", 3)
            .values(
                "params",
                &[
                    json!("2221000000000009"),
                    Value::Null,
                    json!({"n": "6200000000000000000"}),
                ],
            );
        let parsed = parse(&fields);

        assert_eq!(parsed["statement"], "SELECT '4111 11** **** 1111'");
        assert_eq!(parsed["rule"], Value::Null);
        assert_eq!(parsed["tables"], json!(["cards", "5555-55**-****-4444"]));
        assert_eq!(parsed["rows"], 3);
        assert_eq!(parsed["params"][0], "222100******0009");
        assert_eq!(parsed["params"][1], Value::Null);
        assert_eq!(parsed["params"][2]["n"], "620000*********0000");
    }

    #[test]
    fn short_digit_runs_kept() {
        let mut fields = Fields::new();
        fields.str("statement", "SELECT 1748503543012, \"quoted\"\n");
        assert_eq!(
            parse(&fields)["statement"],
            "SELECT 1748503543012, \"quoted\"\n"
        );
    }

    #[test]
    fn value_conversion_masks_nested() {
        let fields = Fields::from_value(json!({
            "request": { "body": ["4111111111111111"] },
            "count": 2,
        }));
        let parsed = parse(&fields);
        assert_eq!(parsed["request"]["body"][0], "411111******1111");
        assert_eq!(parsed["count"], 2);
    }

    #[test]
    fn scalar_value_becomes_value_field() {
        assert_eq!(parse(&Fields::from_value(json!("x")))["value"], "x");
        assert_eq!(Fields::from_value(Value::Null).as_bytes(), b"");
    }

    #[test]
    #[should_panic(expected = "reserved")]
    fn reserved_key_panics_in_debug() {
        Fields::new().str("protocol", "http");
    }

    #[test]
    fn journal_fields_may_name_a_session() {
        let mut fields = Fields::journal();
        fields.str("session", "0194");
        assert_eq!(parse(&fields)["session"], "0194");
    }

    #[test]
    fn verbatim_fields_unchanged() {
        // A digest whose decimal run happens to look like a PAN.
        let digest = "ab4111111111111111cd";
        let mut fields = Fields::journal();
        fields.str_verbatim("digest", digest);
        let map = json!({ "signature": digest })
            .as_object()
            .cloned()
            .expect("object");
        let fields = Fields::from_map_verbatim(&map, fields);
        let parsed = parse(&fields);
        assert_eq!(parsed["digest"], digest);
        assert_eq!(parsed["signature"], digest);
        assert_eq!(
            parse(&Fields::from_map(&map, Fields::journal()))["signature"],
            "ab411111******1111cd"
        );
    }

    #[test]
    fn debug_print_is_masked() {
        let mut fields = Fields::new();
        fields.str("statement", "4111111111111111");
        let printed = format!("{fields:?}");
        assert!(!printed.contains("4111111111111111"), "{printed}");
        assert!(printed.contains("411111******1111"), "{printed}");
    }
}
