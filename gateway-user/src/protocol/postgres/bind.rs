//! Reading a Bind message that streams through in pieces (over the hold limit), so that its
//! portal's parameters and result formats are known like those of a Bind read whole.
//!
//! Bind's body: portal name and statement name (C strings), parameter format codes (int16
//! count, then int16 each), parameters (int16 count, then per value an int32 length, -1 for
//! NULL, and the bytes), result format codes (int16 count, then int16 each). Only the first
//! bytes of each value are kept, as much as a recording shows.

use serde_json::{Value, json};

/// Maximum length of a portal or statement name kept; PostgreSQL truncates names to 63 bytes.
const MAX_NAME: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Portal,
    Statement,
    FormatCount,
    Formats,
    ParamCount,
    ParamLen,
    ParamValue,
    ResultCount,
    ResultFormats,
    Done,
}

/// The parts of a Bind, collected from its pieces.
#[derive(Debug)]
pub struct BindScanner {
    stage: Stage,
    /// Bytes of the fixed-size field being read.
    field: Vec<u8>,
    pub portal: Vec<u8>,
    pub statement: Vec<u8>,
    formats: Vec<i16>,
    count: usize,
    /// Per parameter: `None` for NULL, else the first bytes kept and the full length.
    values: Vec<Option<(Vec<u8>, usize)>>,
    value_left: usize,
    pub result_formats: Vec<i16>,
    /// Bytes of each value kept.
    keep: usize,
}

impl BindScanner {
    /// Creates a scanner that keeps the first `keep` bytes of each parameter.
    pub fn new(keep: usize) -> Self {
        Self {
            stage: Stage::Portal,
            field: Vec::with_capacity(4),
            portal: Vec::new(),
            statement: Vec::new(),
            formats: Vec::new(),
            count: 0,
            values: Vec::new(),
            value_left: 0,
            result_formats: Vec::new(),
            keep,
        }
    }

    /// Reports whether the whole message was read and made sense.
    pub fn is_complete(&self) -> bool {
        self.stage == Stage::Done
    }

    /// Takes the next piece of the body.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.stage != Stage::Done {
            match self.stage {
                Stage::Portal | Stage::Statement => {
                    let end = data.iter().position(|b| *b == 0);
                    let take = end.unwrap_or(data.len());
                    let name = if self.stage == Stage::Portal {
                        &mut self.portal
                    } else {
                        &mut self.statement
                    };
                    let room = MAX_NAME.saturating_sub(name.len());
                    name.extend_from_slice(&data[..take.min(room)]);
                    if end.is_some() {
                        self.stage = if self.stage == Stage::Portal {
                            Stage::Statement
                        } else {
                            Stage::FormatCount
                        };
                        data = &data[take + 1..];
                    } else {
                        data = &[];
                    }
                }
                Stage::ParamValue => {
                    let take = self.value_left.min(data.len());
                    if let Some(Some((prefix, _))) = self.values.last_mut() {
                        let room = self.keep.saturating_sub(prefix.len());
                        prefix.extend_from_slice(&data[..take.min(room)]);
                    }
                    self.value_left -= take;
                    data = &data[take..];
                    if self.value_left == 0 {
                        self.after_value();
                    }
                }
                _ => {
                    let width = if self.stage == Stage::ParamLen { 4 } else { 2 };
                    let take = (width - self.field.len()).min(data.len());
                    self.field.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.field.len() == width {
                        let field = std::mem::take(&mut self.field);
                        self.on_field(&field);
                    }
                }
            }
        }
    }

    fn on_field(&mut self, field: &[u8]) {
        let int16 = || i16::from_be_bytes([field[0], field[1]]);
        match self.stage {
            Stage::FormatCount => {
                self.count = int16().max(0) as usize;
                self.stage = if self.count == 0 {
                    Stage::ParamCount
                } else {
                    Stage::Formats
                };
            }
            Stage::Formats => {
                self.formats.push(int16());
                if self.formats.len() == self.count {
                    self.stage = Stage::ParamCount;
                }
            }
            Stage::ParamCount => {
                self.count = int16().max(0) as usize;
                self.stage = if self.count == 0 {
                    Stage::ResultCount
                } else {
                    Stage::ParamLen
                };
            }
            Stage::ParamLen => {
                let len = i32::from_be_bytes([field[0], field[1], field[2], field[3]]);
                if len < 0 {
                    self.values.push(None);
                    self.after_value();
                } else {
                    self.values.push(Some((Vec::new(), len as usize)));
                    self.value_left = len as usize;
                    if len == 0 {
                        self.after_value();
                    } else {
                        self.stage = Stage::ParamValue;
                    }
                }
            }
            Stage::ResultCount => {
                self.count = int16().max(0) as usize;
                self.stage = if self.count == 0 {
                    Stage::Done
                } else {
                    Stage::ResultFormats
                };
            }
            Stage::ResultFormats => {
                self.result_formats.push(int16());
                if self.result_formats.len() == self.count {
                    self.stage = Stage::Done;
                }
            }
            Stage::Portal | Stage::Statement | Stage::ParamValue | Stage::Done => {}
        }
    }

    fn after_value(&mut self) {
        self.stage = if self.values.len() == self.count {
            Stage::ResultCount
        } else {
            Stage::ParamLen
        };
    }

    /// Returns the parameters as recorded values, text ones passed through `text` (which masks
    /// and cuts them) with the value's full length, binary ones by size.
    pub fn params(&self, text: impl Fn(&[u8], usize) -> String) -> Vec<Value> {
        self.values
            .iter()
            .enumerate()
            .map(|(index, value)| {
                let Some((prefix, len)) = value else {
                    return Value::Null;
                };
                let format = match self.formats.len() {
                    0 => 0,
                    1 => self.formats[0],
                    _ => self.formats.get(index).copied().unwrap_or(0),
                };
                if format == 0 {
                    Value::String(text(prefix, *len))
                } else {
                    json!({ "binary_bytes": len })
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(values: &[Option<&[u8]>], formats: &[i16], results: &[i16]) -> Vec<u8> {
        let mut body = b"portal\0stmt\0".to_vec();
        body.extend_from_slice(&(formats.len() as i16).to_be_bytes());
        for format in formats {
            body.extend_from_slice(&format.to_be_bytes());
        }
        body.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for value in values {
            match value {
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(bytes) => {
                    body.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
                    body.extend_from_slice(bytes);
                }
            }
        }
        body.extend_from_slice(&(results.len() as i16).to_be_bytes());
        for format in results {
            body.extend_from_slice(&format.to_be_bytes());
        }
        body
    }

    #[test]
    fn pieces_of_any_size_give_the_same_bind() {
        let big = vec![b'x'; 3000];
        let body = bind(
            &[Some(b"4111"), None, Some(&big), Some(b"")],
            &[0, 0, 0, 1],
            &[1, 0],
        );
        for piece in [1, 2, 3, 7, 64, body.len()] {
            let mut scanner = BindScanner::new(16);
            for chunk in body.chunks(piece) {
                scanner.feed(chunk);
            }
            assert!(scanner.is_complete(), "piece size {piece}");
            assert_eq!(scanner.portal, b"portal");
            assert_eq!(scanner.statement, b"stmt");
            assert_eq!(scanner.result_formats, [1, 0]);
            let params =
                scanner.params(|prefix, len| format!("{}/{len}", String::from_utf8_lossy(prefix)));
            assert_eq!(
                params,
                [
                    json!("4111/4"),
                    Value::Null,
                    json!(format!("{}/3000", "x".repeat(16))),
                    json!({ "binary_bytes": 0 }),
                ]
            );
        }
    }

    #[test]
    fn truncated_bind_is_incomplete() {
        let body = bind(&[Some(b"abc")], &[], &[1]);
        let mut scanner = BindScanner::new(16);
        scanner.feed(&body[..body.len() - 1]);
        assert!(!scanner.is_complete());
    }
}
