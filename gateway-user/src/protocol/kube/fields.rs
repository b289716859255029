//! Masking of named JSON fields whole (the policy's `masking.fields`) in API server responses,
//! in place and streamed: a tokenizer follows the JSON structure across chunks, so a chunk
//! boundary anywhere changes nothing and no byte is held back.
//!
//! A field whose name matches (case-insensitive) has its value overwritten with the same
//! length: every byte between a string's quotes becomes the mask character, and a number
//! becomes `0` followed by spaces. An object or array value has every string and number in it
//! masked. `true`, `false` and `null` stay, and so does every key. The result is valid JSON of
//! the same length, so Content-Length and watch framing hold. Input that is not JSON passes
//! through unchanged.

/// Maximum length of a key compared, in bytes. A longer key never matches.
const MAX_KEY: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Container {
    /// `expect_key` is set after `{` and after `,`, where a string is a key.
    Object {
        expect_key: bool,
    },
    Array,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between tokens.
    Between,
    String {
        is_key: bool,
        escaped: bool,
        masked: bool,
    },
    Number {
        masked: bool,
    },
    Literal,
}

/// Masks the values of named fields in a JSON stream.
#[derive(Debug)]
pub struct FieldMasker {
    /// Field names, lowercase.
    fields: Vec<String>,
    mask_char: u8,
    stack: Vec<Container>,
    state: State,
    key: Vec<u8>,
    /// Set when the key just read matched: the next value is masked.
    matched: bool,
    /// Depth of the container whose contents are masked whole, while inside one.
    masking_from: Option<usize>,
    /// Values masked so far.
    pub masked: usize,
}

impl FieldMasker {
    pub fn new(fields: &[String], mask_char: u8) -> Self {
        Self {
            fields: fields.iter().map(|field| field.to_lowercase()).collect(),
            mask_char,
            stack: Vec::new(),
            state: State::Between,
            key: Vec::new(),
            matched: false,
            masking_from: None,
            masked: 0,
        }
    }

    /// Masks the next bytes of the stream in place.
    pub fn apply(&mut self, data: &mut [u8]) {
        for byte in data.iter_mut() {
            self.step(byte);
        }
    }

    fn step(&mut self, byte: &mut u8) {
        match self.state {
            State::String {
                is_key,
                escaped,
                masked,
            } => {
                let original = *byte;
                if original == b'"' && !escaped {
                    self.state = State::Between;
                    if is_key {
                        self.end_key();
                    }
                    return;
                }
                if is_key && self.key.len() <= MAX_KEY {
                    self.key.push(original);
                }
                if masked {
                    *byte = self.mask_char;
                }
                self.state = State::String {
                    is_key,
                    escaped: !escaped && original == b'\\',
                    masked,
                };
            }
            State::Number { masked } => {
                if matches!(*byte, b'0'..=b'9' | b'+' | b'-' | b'.' | b'e' | b'E') {
                    if masked {
                        *byte = b' ';
                    }
                } else {
                    self.state = State::Between;
                    self.between(byte);
                }
            }
            State::Literal => {
                if !byte.is_ascii_alphabetic() {
                    self.state = State::Between;
                    self.between(byte);
                }
            }
            State::Between => self.between(byte),
        }
    }

    fn between(&mut self, byte: &mut u8) {
        match *byte {
            b'{' | b'[' => {
                let masked = self.value_masked();
                if masked && self.masking_from.is_none() {
                    self.masking_from = Some(self.stack.len());
                }
                self.stack.push(if *byte == b'{' {
                    Container::Object { expect_key: true }
                } else {
                    Container::Array
                });
            }
            b'}' | b']' => {
                self.stack.pop();
                if self.masking_from == Some(self.stack.len()) {
                    self.masking_from = None;
                }
            }
            b',' => {
                if let Some(Container::Object { expect_key }) = self.stack.last_mut() {
                    *expect_key = true;
                }
            }
            b'"' => {
                if let Some(Container::Object { expect_key: true }) = self.stack.last() {
                    self.key.clear();
                    self.state = State::String {
                        is_key: true,
                        escaped: false,
                        masked: false,
                    };
                } else {
                    let masked = self.value_masked();
                    self.masked += usize::from(masked);
                    self.state = State::String {
                        is_key: false,
                        escaped: false,
                        masked,
                    };
                }
            }
            b'-' | b'0'..=b'9' => {
                let masked = self.value_masked();
                if masked {
                    self.masked += 1;
                    *byte = b'0';
                }
                self.state = State::Number { masked };
            }
            b't' | b'f' | b'n' => {
                self.value_masked();
                self.state = State::Literal;
            }
            _ => {}
        }
    }

    /// Tells whether the value starting now is masked, and consumes a key match.
    fn value_masked(&mut self) -> bool {
        let matched = std::mem::take(&mut self.matched);
        matched || self.masking_from.is_some()
    }

    fn end_key(&mut self) {
        if let Some(Container::Object { expect_key }) = self.stack.last_mut() {
            *expect_key = false;
        }
        self.matched = self.key.len() <= MAX_KEY && {
            let key = String::from_utf8_lossy(&self.key).to_lowercase();
            self.fields.contains(&key)
        };
    }
}

/// Tells whether a media range names a format the maskers cannot read: YAML, whose base64
/// values are not quoted, and with `named_fields` also protobuf and CBOR, whose fields the
/// field masker cannot find.
fn unreadable_media(media_range: &str) -> bool {
    let media_type = media_range
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    // Base64 values are found only in JSON strings, where quotes delimit them: protobuf,
    // CBOR and YAML carry the same text unquoted. Named fields are found in JSON only too.
    ["protobuf", "yaml", "cbor"]
        .iter()
        .any(|format| media_type.contains(format))
}

/// The handling of a request's `Accept` header when named fields are masked.
#[derive(Debug, PartialEq, Eq)]
pub enum AcceptChoice {
    /// The header names no format the masker cannot read; it goes upstream unchanged.
    Unchanged,
    /// The header without its protobuf, YAML and CBOR entries: the API server then responds
    /// in JSON, as it does for a client that prefers JSON.
    Rewritten(String),
    /// Every entry names a format the masker cannot read.
    Unacceptable,
}

/// Named fields are found in JSON only, so a client that would take a protobuf, YAML or CBOR
/// response gets the JSON one instead, when its `Accept` allows one (client-go sends
/// `application/vnd.kubernetes.protobuf,application/json`). A missing header means JSON.
pub fn json_accept(accept: &[&str]) -> AcceptChoice {
    let ranges: Vec<&str> = accept
        .iter()
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|range| !range.is_empty())
        .collect();
    if !ranges.iter().any(|range| unreadable_media(range)) {
        return AcceptChoice::Unchanged;
    }
    let json_ranges: Vec<&str> = ranges
        .into_iter()
        .filter(|range| !unreadable_media(range))
        .collect();
    if json_ranges.is_empty() {
        AcceptChoice::Unacceptable
    } else {
        AcceptChoice::Rewritten(json_ranges.join(", "))
    }
}

/// Tells whether a response of `content_type` is in a format the masker cannot read.
pub fn unreadable_response(content_type: &str) -> bool {
    unreadable_media(content_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(fields: &[&str], input: &str) -> (String, usize) {
        let fields: Vec<String> = fields.iter().map(|field| field.to_string()).collect();
        let mut masker = FieldMasker::new(&fields, b'*');
        let mut data = input.as_bytes().to_vec();
        masker.apply(&mut data);
        (
            String::from_utf8(data).expect("ASCII stays ASCII"),
            masker.masked,
        )
    }

    #[test]
    fn named_string_and_number_fields_masked() {
        let input = r#"{"name":"ada","cvv":"123","pin":4711,"note":"cvv"}"#;
        let (output, masked) = mask(&["CVV", "pin"], input);
        assert_eq!(
            output,
            r#"{"name":"ada","cvv":"***","pin":0   ,"note":"cvv"}"#
        );
        assert_eq!(masked, 2);
        serde_json::from_str::<serde_json::Value>(&output).expect("still JSON");
    }

    #[test]
    fn nested_values_masked_whole() {
        let input =
            r#"{"data":{"card":{"pan":"4111","exp":[12,"2030"],"ok":true}},"card":null,"x":"y"}"#;
        let (output, masked) = mask(&["card"], input);
        assert_eq!(
            output,
            r#"{"data":{"card":{"pan":"****","exp":[0 ,"****"],"ok":true}},"card":null,"x":"y"}"#
        );
        assert_eq!(masked, 3);
        serde_json::from_str::<serde_json::Value>(&output).expect("still JSON");
    }

    #[test]
    fn escapes_and_unicode_masked_same_length() {
        let input = "{\"secret\":\"a\\\"b\\\\ é\",\"k\\\"ey\":\"v\"}";
        let (output, _) = mask(&["secret"], input);
        assert_eq!(output.len(), input.len());
        let value: serde_json::Value = serde_json::from_str(&output).expect("still JSON");
        assert!(
            value["secret"]
                .as_str()
                .expect("string")
                .bytes()
                .all(|b| b == b'*')
        );
        assert_eq!(value["k\"ey"], "v");
    }

    #[test]
    fn every_split_gives_the_same_bytes() {
        let input = "{\"type\":\"ADDED\",\"object\":{\"data\":{\"cvv\":\"987\",\"n\":-1.5e3}}}\n{\"type\":\"MODIFIED\",\"object\":{\"cvv\":[\"1\",2]}}\n";
        let (whole, _) = mask(&["cvv", "n"], input);
        assert!(whole.contains(r#""cvv":"***""#), "{whole}");
        assert!(whole.contains(r#""n":0     "#), "{whole}");
        for split in 0..=input.len() {
            let fields = vec!["cvv".to_string(), "n".to_string()];
            let mut masker = FieldMasker::new(&fields, b'*');
            let mut data = input.as_bytes().to_vec();
            let (first, second) = data.split_at_mut(split);
            masker.apply(first);
            masker.apply(second);
            assert_eq!(
                String::from_utf8(data).expect("ASCII"),
                whole,
                "split at {split}"
            );
        }
    }

    #[test]
    fn keys_and_other_input_untouched() {
        let (output, masked) = mask(&["cvv"], r#"{"cvv_hint":"x","list":["cvv"]}"#);
        assert_eq!(output, r#"{"cvv_hint":"x","list":["cvv"]}"#);
        assert_eq!(masked, 0);
        let (output, _) = mask(&["cvv"], "not json: \"cvv\": 123");
        assert_eq!(output, "not json: \"cvv\": 123");
    }

    #[test]
    fn accept_keeps_json_entries_only() {
        assert_eq!(
            json_accept(&["application/vnd.kubernetes.protobuf,application/json"]),
            AcceptChoice::Rewritten("application/json".into())
        );
        assert_eq!(
            json_accept(&[
                "application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io",
                "application/json;as=Table;v=v1;g=meta.k8s.io, application/yaml, */*"
            ]),
            AcceptChoice::Rewritten("application/json;as=Table;v=v1;g=meta.k8s.io, */*".into())
        );
        assert_eq!(
            json_accept(&["application/vnd.kubernetes.protobuf;stream=watch, application/json"]),
            AcceptChoice::Rewritten("application/json".into())
        );
    }

    #[test]
    fn accept_without_json_is_refused() {
        assert_eq!(
            json_accept(&["application/vnd.kubernetes.protobuf"]),
            AcceptChoice::Unacceptable
        );
        assert_eq!(
            json_accept(&["application/cbor", "Application/YAML"]),
            AcceptChoice::Unacceptable
        );
    }

    #[test]
    fn accept_of_json_unchanged() {
        assert_eq!(json_accept(&[]), AcceptChoice::Unchanged);
        assert_eq!(
            json_accept(&["application/json, */*"]),
            AcceptChoice::Unchanged
        );
        assert!(unreadable_response("application/vnd.kubernetes.protobuf"));
        assert!(!unreadable_response("application/json; charset=utf-8"));
        assert!(!unreadable_response("text/plain"));
    }

    #[test]
    fn formats_without_quoted_strings_rewritten() {
        // A ConfigMap's text in base64 is an unquoted string in protobuf, so JSON is asked
        // for instead.
        let protobuf = "application/vnd.kubernetes.protobuf,application/json";
        assert_eq!(
            json_accept(&[protobuf]),
            AcceptChoice::Rewritten("application/json".into())
        );
        assert_eq!(
            json_accept(&["application/yaml, application/json"]),
            AcceptChoice::Rewritten("application/json".into())
        );
        assert_eq!(
            json_accept(&["application/yaml"]),
            AcceptChoice::Unacceptable
        );
        assert!(unreadable_response("application/yaml"));
        assert!(unreadable_response("application/vnd.kubernetes.protobuf"));
    }
}
