//! Column definitions, result rows and COM_STMT_EXECUTE parameters: the parts of MySQL's
//! payloads whose layout depends on column types.
//!
//! Rows are masked column by column as they stream, so a row of any size keeps bounded memory
//! and masking never touches a length prefix. Text-protocol rows hold each value as a
//! length-encoded string (`0xfb` for NULL), which is scanned as text. Binary-protocol rows start
//! with `0x00` and a NULL bitmap, then each non-NULL value in a layout fixed by its column type:
//! - string, decimal, JSON, blob and bit types are length-encoded and scanned as text. Text
//!   in `ucs2`, `utf16`, `utf16le` or `utf32` (a column's own character set, or the
//!   session's `character_set_results`) is read one code unit per character, so its digits
//!   are found and masked in that encoding;
//! - `BIGINT` (8 bytes, little-endian, signed or unsigned by the column flag) and `DOUBLE`
//!   holding an integer: when the decimal form is a card number, the digits text masking would
//!   hide are set to zero, so the value keeps its type and width. This is the rule the
//!   PostgreSQL handler applies to `int8` and `numeric`;
//! - other integers and `FLOAT` are too narrow to hold 13 digits exactly and pass unchanged, as
//!   do dates and times (a length byte, then at most 12 bytes).

pub use crate::mask::wide::Wide;
use crate::mask::{MaskPolicy, StreamMasker, mask_in_place, wide::WideText};

use super::packet::{FieldReader, NULL_MARKER, PacketError, lenenc_size};

/// Column type codes (`enum_field_types`).
pub const TYPE_TINY: u8 = 1;
pub const TYPE_SHORT: u8 = 2;
pub const TYPE_LONG: u8 = 3;
pub const TYPE_FLOAT: u8 = 4;
pub const TYPE_DOUBLE: u8 = 5;
pub const TYPE_NULL: u8 = 6;
pub const TYPE_TIMESTAMP: u8 = 7;
pub const TYPE_LONGLONG: u8 = 8;
pub const TYPE_INT24: u8 = 9;
pub const TYPE_DATE: u8 = 10;
pub const TYPE_TIME: u8 = 11;
pub const TYPE_DATETIME: u8 = 12;
pub const TYPE_YEAR: u8 = 13;
pub const TYPE_NEWDATE: u8 = 14;
pub const TYPE_BIT: u8 = 16;
/// Column flag of unsigned integers.
pub const UNSIGNED_FLAG: u16 = 0x20;

/// Type and flags of one result column.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Column {
    pub column_type: u8,
    pub unsigned: bool,
    /// Whether the column is masked whole, because its name is in the policy's
    /// `masking.fields`. Text bytes become the mask character, binary bytes zero.
    pub whole: bool,
    /// The encoding of text values whose characters take 2 or 4 bytes, from the column's
    /// character set. `None` for the others, which keep ASCII digits as single bytes.
    pub wide: Option<Wide>,
}

impl Wide {
    /// Returns the wide encoding of a collation id, as MariaDB 10.11 and MySQL number them.
    pub fn of_collation(id: u16) -> Option<Self> {
        match id {
            // ucs2
            35 | 90 | 128..=151 | 159 | 640..=642 | 1059 | 1114 | 1152 | 1174 | 2560..=2815 => {
                Some(Wide::Utf16Be)
            }
            // utf16
            54 | 55 | 101..=124 | 672..=674 | 1078 | 1079 | 1125 | 1147 | 2816..=3071 => {
                Some(Wide::Utf16Be)
            }
            // utf16le
            56 | 62 | 1080 | 1086 => Some(Wide::Utf16Le),
            // utf32
            60 | 61 | 160..=183 | 736..=738 | 1084 | 1085 | 1184 | 1206 | 3072..=3327 => {
                Some(Wide::Utf32Be)
            }
            _ => None,
        }
    }
}

/// Reads the type and flags from a column definition (protocol 4.1), and whether its name or
/// original name is one of `whole_fields` (lowercase), the columns masked whole.
///
/// # Format
///
/// Six length-encoded strings (catalog, schema, table, original table, name, original name),
/// the length of the fixed fields (`0x0c`), charset `u16`, display length `u32`, type `u8`,
/// flags `u16`, decimals `u8`, 2 filler bytes.
pub fn parse_column(payload: &[u8], whole_fields: &[String]) -> Result<Column, PacketError> {
    let mut reader = FieldReader::new(payload, "column definition");
    let mut whole = false;
    for index in 0..6 {
        let text = reader.lenenc_bytes()?;
        if index >= 4 && !whole_fields.is_empty() {
            let name = String::from_utf8_lossy(text).to_lowercase();
            whole |= whole_fields.contains(&name);
        }
    }
    reader.lenenc()?;
    let collation = reader.u16()?;
    reader.bytes(4)?;
    let column_type = reader.u8()?;
    let flags = reader.u16()?;
    Ok(Column {
        column_type,
        unsigned: flags & UNSIGNED_FLAG != 0,
        whole,
        wide: Wide::of_collation(collation),
    })
}

/// How a binary-protocol value of a type is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// A fixed number of bytes.
    Fixed(usize),
    /// A length byte, then that many bytes (dates and times).
    ShortLen,
    /// A length-encoded string.
    Lenenc,
}

fn layout(column_type: u8) -> Layout {
    match column_type {
        TYPE_TINY => Layout::Fixed(1),
        TYPE_SHORT | TYPE_YEAR => Layout::Fixed(2),
        TYPE_LONG | TYPE_INT24 | TYPE_FLOAT => Layout::Fixed(4),
        TYPE_DOUBLE | TYPE_LONGLONG => Layout::Fixed(8),
        TYPE_NULL => Layout::Fixed(0),
        TYPE_TIMESTAMP | TYPE_DATE | TYPE_TIME | TYPE_DATETIME | TYPE_NEWDATE => Layout::ShortLen,
        // Decimal, varchar, bit, JSON, enum, set, blobs, strings, geometry, and anything newer.
        _ => Layout::Lenenc,
    }
}

/// Applies the numeric rule to a fixed-size binary value in place; returns the PANs masked.
fn mask_fixed(value: &mut [u8], column: Column, policy: &MaskPolicy) -> usize {
    match (column.column_type, value.len()) {
        (TYPE_LONGLONG, 8) => {
            let bytes: [u8; 8] = value.try_into().expect("8 bytes");
            let number = if column.unsigned {
                i128::from(u64::from_le_bytes(bytes))
            } else {
                i128::from(i64::from_le_bytes(bytes))
            };
            let Some((zeroed, masked)) = mask_integer(number, policy) else {
                return 0;
            };
            // The zeroed value is smaller than the original, so it fits the same type.
            let out = if column.unsigned {
                (zeroed as u64).to_le_bytes()
            } else {
                (zeroed as i64).to_le_bytes()
            };
            value.copy_from_slice(&out);
            masked
        }
        (TYPE_DOUBLE, 8) => {
            let number = f64::from_le_bytes(value.try_into().expect("8 bytes"));
            // Only integers below 2^63 are exact enough to be read as digits.
            if !(number.is_finite() && number.fract() == 0.0 && number.abs() < 9.2e18) {
                return 0;
            }
            let Some((zeroed, masked)) = mask_integer(number as i128, policy) else {
                return 0;
            };
            value.copy_from_slice(&(zeroed as f64).to_le_bytes());
            masked
        }
        _ => 0,
    }
}

/// Masks the decimal form of `number`; returns the value with the hidden digits set to zero
/// and the PAN count, or `None` when nothing was masked.
pub(super) fn mask_integer(number: i128, policy: &MaskPolicy) -> Option<(i128, usize)> {
    let negative = number < 0;
    let original = number.unsigned_abs().to_string().into_bytes();
    let mut digits = original.clone();
    let masked = mask_in_place(&mut digits, policy);
    if masked == 0 {
        return None;
    }
    let zeroed: Vec<u8> = digits
        .iter()
        .zip(&original)
        .map(|(after, before)| {
            if after.is_ascii_digit() {
                *before
            } else {
                b'0'
            }
        })
        .collect();
    let magnitude: i128 = std::str::from_utf8(&zeroed).ok()?.parse().ok()?;
    Some((if negative { -magnitude } else { magnitude }, masked))
}

/// Where the masker is inside a row.
#[derive(Debug)]
enum State {
    /// Binary rows: the `0x00` header byte.
    RowHeader,
    /// Binary rows: gathering the NULL bitmap.
    Bitmap,
    /// Choosing the next column, or the end of the row.
    NextColumn,
    /// Gathering a length prefix (lenenc, or the short length of a date) of `need` bytes.
    Prefix { need: usize, short: bool },
    /// Gathering a fixed-size value.
    Fixed { need: usize },
    /// Passing `left` bytes of a date or time through.
    Raw { left: usize },
    /// Streaming `left` bytes of a string value through the text masker.
    Text { left: u64 },
    /// Gathering a short value of `need` bytes that is masked whole: a `BIT` value, or a
    /// `FLOAT` or `DOUBLE` in the text protocol.
    Short { need: usize },
    /// Bytes after the last column, which a well-formed row does not have: scanned as text.
    Trailing,
}

/// Masks one result row that arrives in pieces, column by column. The output has the same
/// length as the input.
#[derive(Debug)]
pub struct RowMasker {
    columns: Vec<Column>,
    binary: bool,
    policy: MaskPolicy,
    state: State,
    column: usize,
    /// Header, bitmap or fixed-value bytes gathered so far.
    gathered: Vec<u8>,
    bitmap: Vec<u8>,
    text: StreamMasker,
    /// The masker of the current value when its column has a wide encoding.
    wide_text: Option<WideText>,
    /// PANs masked so far.
    pub masked: usize,
}

/// Offset of the first column in a binary row's NULL bitmap: the first two bits are reserved.
const BINARY_ROW_BITMAP_OFFSET: usize = 2;

impl RowMasker {
    pub fn new(columns: Vec<Column>, binary: bool, policy: MaskPolicy) -> Self {
        let text = StreamMasker::new(policy.clone());
        Self {
            columns,
            binary,
            policy,
            state: if binary {
                State::RowHeader
            } else {
                State::NextColumn
            },
            column: 0,
            gathered: Vec::with_capacity(9),
            bitmap: Vec::new(),
            text,
            wide_text: None,
            masked: 0,
        }
    }

    fn is_null(&self, column: usize) -> bool {
        let bit = column + BINARY_ROW_BITMAP_OFFSET;
        self.bitmap
            .get(bit / 8)
            .is_some_and(|byte| byte & (1 << (bit % 8)) != 0)
    }

    /// Picks the state for the next column, skipping NULLs of binary rows.
    fn next_column(&mut self) -> State {
        while self.column < self.columns.len() {
            let column = self.columns[self.column];
            if self.binary {
                if self.is_null(self.column) {
                    self.column += 1;
                    continue;
                }
                return match layout(column.column_type) {
                    Layout::Fixed(need) => State::Fixed { need },
                    Layout::ShortLen => State::Prefix {
                        need: 1,
                        short: true,
                    },
                    Layout::Lenenc => State::Prefix {
                        need: 1,
                        short: false,
                    },
                };
            }
            return State::Prefix {
                need: 1,
                short: false,
            };
        }
        State::Trailing
    }

    /// Masks `input`, the next bytes of the row, appending the settled bytes to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            match self.state {
                State::RowHeader => {
                    out.push(input[0]);
                    input = &input[1..];
                    let bytes = (self.columns.len() + 7 + BINARY_ROW_BITMAP_OFFSET) / 8;
                    self.bitmap.clear();
                    self.state = if bytes == 0 {
                        self.next_column()
                    } else {
                        State::Bitmap
                    };
                }
                State::Bitmap => {
                    let bytes = (self.columns.len() + 7 + BINARY_ROW_BITMAP_OFFSET) / 8;
                    let take = (bytes - self.bitmap.len()).min(input.len());
                    self.bitmap.extend_from_slice(&input[..take]);
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if self.bitmap.len() == bytes {
                        self.state = self.next_column();
                    }
                }
                State::NextColumn => self.state = self.next_column(),
                State::Prefix { need, short } => {
                    let take = (need - self.gathered.len()).min(input.len());
                    self.gathered.extend_from_slice(&input[..take]);
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if self.gathered.len() < need {
                        continue;
                    }
                    let first = self.gathered[0];
                    if short {
                        self.gathered.clear();
                        self.state = State::Raw {
                            left: usize::from(first),
                        };
                    } else if need == 1 && lenenc_size(first) > 1 {
                        self.state = State::Prefix {
                            need: lenenc_size(first),
                            short,
                        };
                    } else if first == NULL_MARKER && need == 1 {
                        self.gathered.clear();
                        self.column += 1;
                        self.state = self.next_column();
                    } else {
                        let mut reader = FieldReader::new(&self.gathered, "row");
                        let len = reader.lenenc().ok().flatten().unwrap_or(0);
                        self.gathered.clear();
                        let column = self.columns.get(self.column).copied().unwrap_or_default();
                        self.state = match usize::try_from(len) {
                            Ok(need) if need <= SHORT_VALUE_LIMIT && is_short_value(column) => {
                                State::Short { need }
                            }
                            _ => State::Text { left: len },
                        };
                        if len == 0 {
                            self.column += 1;
                            self.state = self.next_column();
                        }
                    }
                }
                State::Fixed { need } => {
                    let take = (need - self.gathered.len()).min(input.len());
                    self.gathered.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if self.gathered.len() == need {
                        let column = self.columns[self.column];
                        let mut value = std::mem::take(&mut self.gathered);
                        if column.whole {
                            value.fill(0);
                            self.masked += usize::from(need > 0);
                        } else {
                            self.masked += mask_fixed(&mut value, column, &self.policy);
                        }
                        out.extend_from_slice(&value);
                        self.gathered = value;
                        self.gathered.clear();
                        self.column += 1;
                        self.state = self.next_column();
                    }
                }
                State::Short { need } => {
                    let take = (need - self.gathered.len()).min(input.len());
                    self.gathered.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if self.gathered.len() == need {
                        let column = self.columns[self.column];
                        self.masked += mask_short(&mut self.gathered, column, &self.policy);
                        out.extend_from_slice(&self.gathered);
                        self.gathered.clear();
                        self.column += 1;
                        self.state = self.next_column();
                    }
                }
                State::Raw { left } => {
                    let take = left.min(input.len());
                    if self.columns[self.column].whole {
                        out.extend(std::iter::repeat_n(0, take));
                    } else {
                        out.extend_from_slice(&input[..take]);
                    }
                    input = &input[take..];
                    if take == left {
                        self.column += 1;
                        self.state = self.next_column();
                    } else {
                        self.state = State::Raw { left: left - take };
                    }
                }
                State::Text { left } => {
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    let column = self.columns.get(self.column).copied().unwrap_or_default();
                    if column.whole {
                        out.extend(std::iter::repeat_n(self.policy.mask_char, take));
                    } else if let Some(wide) = column.wide {
                        let policy = &self.policy;
                        let text = self
                            .wide_text
                            .get_or_insert_with(|| WideText::new(wide, policy.clone()));
                        self.masked += text.feed(&input[..take], out);
                    } else {
                        self.masked += self.text.feed(&input[..take], out);
                    }
                    input = &input[take..];
                    let left = left - take as u64;
                    if left == 0 {
                        if column.whole {
                            self.masked += 1;
                        }
                        self.masked += self.text.finish(out);
                        if let Some(mut text) = self.wide_text.take() {
                            self.masked += text.finish(out);
                        }
                        self.column += 1;
                        self.state = self.next_column();
                    } else {
                        self.state = State::Text { left };
                    }
                }
                State::Trailing => {
                    self.masked += self.text.feed(input, out);
                    input = &[];
                }
            }
        }
    }

    /// Appends what is still held back (a cut-off value of a malformed row) and resets the
    /// masker for the next row.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.masked += self.text.finish(out);
        if let Some(mut text) = self.wide_text.take() {
            self.masked += text.finish(out);
        }
        // Prefix bytes were written as they came; only fixed-size and short values are held
        // back whole.
        if matches!(self.state, State::Fixed { .. } | State::Short { .. }) {
            out.extend_from_slice(&self.gathered);
        }
        self.gathered.clear();
        self.column = 0;
        self.state = if self.binary {
            State::RowHeader
        } else {
            State::NextColumn
        };
    }
}

/// Maximum length of a value gathered and masked whole by [`mask_short`]. Longer values stream.
const SHORT_VALUE_LIMIT: usize = 4096;

/// Tells whether values of `column` are masked whole by [`mask_short`] when short enough.
fn is_short_value(column: Column) -> bool {
    !column.whole && column.wide.is_none()
}

/// Masks a short value whole. A `BIT` value is a big-endian unsigned number, which follows
/// the rule for binary numbers. Text may contain numbers in exponent notation, such as a
/// `DOUBLE` printed as `4.111111111111111e15`, alone or in JSON. Those are masked as the
/// numbers they stand for, and then the whole value is masked as text.
fn mask_short(value: &mut [u8], column: Column, policy: &MaskPolicy) -> usize {
    if column.column_type == TYPE_BIT {
        if value.is_empty() || value.len() > 8 {
            return 0;
        }
        let number = value
            .iter()
            .fold(0u64, |number, &byte| number << 8 | u64::from(byte));
        let Some((zeroed, masked)) = mask_integer(i128::from(number), policy) else {
            return 0;
        };
        let bytes = (zeroed as u64).to_be_bytes();
        let width = value.len();
        value.copy_from_slice(&bytes[8 - width..]);
        return masked;
    }
    crate::mask::mask_formatted_numbers(value, policy) + mask_in_place(value, policy)
}

/// Types of a prepared statement's parameters, as the last COM_STMT_EXECUTE that sent them set.
#[derive(Clone, Debug, Default)]
pub struct ParamTypes(pub Vec<Column>);

/// Reads the recorded parameter values of a COM_STMT_EXECUTE payload (after the command byte).
/// `types` are updated when the execute binds new ones, and used when it does not. Parameters
/// in `long_data` were sent with COM_STMT_SEND_LONG_DATA and are absent from the payload.
///
/// # Format
///
/// Statement id `u32`, flags `u8`, iteration count `u32`; with parameters: NULL bitmap
/// (`(n + 7) / 8` bytes), new-params-bound flag `u8`, when set `n` types (type `u8`, flags `u8`
/// with `0x80` for unsigned), then the non-NULL values in the binary row layout.
pub fn execute_params(
    payload: &[u8],
    param_count: usize,
    types: &mut ParamTypes,
    long_data: &[(u16, u64)],
    policy: &MaskPolicy,
    recorded_text: impl Fn(&[u8]) -> String,
) -> Result<Vec<serde_json::Value>, PacketError> {
    use serde_json::{Value, json};

    let mut reader = FieldReader::new(payload, "COM_STMT_EXECUTE");
    reader.bytes(4 + 1 + 4)?;
    if param_count == 0 {
        return Ok(Vec::new());
    }
    let bitmap = reader.bytes(param_count.div_ceil(8))?.to_vec();
    if reader.u8()? == 1 {
        let mut bound = Vec::with_capacity(param_count);
        for _ in 0..param_count {
            let column_type = reader.u8()?;
            let flags = reader.u8()?;
            bound.push(Column {
                column_type,
                unsigned: flags & 0x80 != 0,
                ..Column::default()
            });
        }
        types.0 = bound;
    }
    let mut params = Vec::with_capacity(param_count);
    for index in 0..param_count {
        if bitmap[index / 8] & (1 << (index % 8)) != 0 {
            params.push(Value::Null);
            continue;
        }
        if let Some((_, bytes)) = long_data.iter().find(|(id, _)| usize::from(*id) == index) {
            params.push(json!({ "long_data_bytes": bytes }));
            continue;
        }
        let column = types.0.get(index).copied().ok_or(PacketError::Malformed {
            packet: "COM_STMT_EXECUTE",
            reason: "parameter values without their types",
        })?;
        let value = match layout(column.column_type) {
            Layout::Fixed(len) => {
                let mut bytes = reader.bytes(len)?.to_vec();
                mask_fixed(&mut bytes, column, policy);
                fixed_value(&bytes, column)
            }
            Layout::ShortLen => {
                let len = reader.u8()?;
                reader.bytes(usize::from(len))?;
                json!({ "binary_bytes": len })
            }
            Layout::Lenenc => Value::String(recorded_text(reader.lenenc_bytes()?)),
        };
        params.push(value);
    }
    Ok(params)
}

/// A fixed-size binary value as JSON, after masking.
fn fixed_value(bytes: &[u8], column: Column) -> serde_json::Value {
    use serde_json::json;
    match (bytes.len(), column.unsigned) {
        (1, false) => json!(bytes[0] as i8),
        (1, true) => json!(bytes[0]),
        (2, false) => json!(i16::from_le_bytes([bytes[0], bytes[1]])),
        (2, true) => json!(u16::from_le_bytes([bytes[0], bytes[1]])),
        (4, _) if column.column_type == TYPE_FLOAT => {
            json!(f32::from_le_bytes(bytes.try_into().expect("4 bytes")))
        }
        (4, false) => json!(i32::from_le_bytes(bytes.try_into().expect("4 bytes"))),
        (4, true) => json!(u32::from_le_bytes(bytes.try_into().expect("4 bytes"))),
        (8, _) if column.column_type == TYPE_DOUBLE => {
            json!(f64::from_le_bytes(bytes.try_into().expect("8 bytes")))
        }
        (8, false) => json!(i64::from_le_bytes(bytes.try_into().expect("8 bytes"))),
        (8, true) => json!(u64::from_le_bytes(bytes.try_into().expect("8 bytes"))),
        _ => json!({ "binary_bytes": bytes.len() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    const STRING: Column = Column {
        column_type: 253,
        unsigned: false,
        whole: false,
        wide: None,
    };
    const BIGINT: Column = Column {
        column_type: TYPE_LONGLONG,
        unsigned: false,
        whole: false,
        wide: None,
    };
    const INT: Column = Column {
        column_type: TYPE_LONG,
        unsigned: false,
        whole: false,
        wide: None,
    };

    fn text_row(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for value in values {
            match value {
                None => out.extend_from_slice(&[NULL_MARKER]),
                Some(value) => {
                    super::super::packet::put_lenenc(&mut out, value.len() as u64);
                    out.extend_from_slice(value);
                }
            }
        }
        out.to_vec()
    }

    /// Masks `row` split at every byte boundary and checks all splits agree.
    fn mask_all_splits(columns: &[Column], binary: bool, row: &[u8]) -> Vec<u8> {
        let mut whole = Vec::new();
        let mut masker = RowMasker::new(columns.to_vec(), binary, MaskPolicy::default());
        masker.feed(row, &mut whole);
        masker.finish(&mut whole);
        assert_eq!(whole.len(), row.len(), "length kept");
        for split in 0..=row.len() {
            let mut out = Vec::new();
            let mut masker = RowMasker::new(columns.to_vec(), binary, MaskPolicy::default());
            masker.feed(&row[..split], &mut out);
            masker.feed(&row[split..], &mut out);
            masker.finish(&mut out);
            assert_eq!(out, whole, "split at {split}");
        }
        whole
    }

    #[test]
    fn text_row_masks_values_not_lengths() {
        let row = text_row(&[
            Some(b"4111111111111111"),
            None,
            Some(b"plain"),
            Some(b"card 5555-5555-5555-4444 end"),
        ]);
        let masked = mask_all_splits(&[STRING; 4], false, &row);
        let expected = text_row(&[
            Some(b"411111******1111"),
            None,
            Some(b"plain"),
            Some(b"card 5555-55**-****-4444 end"),
        ]);
        assert_eq!(masked, expected);
    }

    #[test]
    fn whole_columns_overwritten_same_width() {
        let hidden = Column {
            whole: true,
            ..STRING
        };
        let row = text_row(&[Some(b"123"), None, Some(b"4111111111111111")]);
        let masked = mask_all_splits(&[hidden, hidden, STRING], false, &row);
        let expected = text_row(&[Some(b"***"), None, Some(b"411111******1111")]);
        assert_eq!(masked, expected);

        // A binary BIGINT masked whole becomes zero, whatever its value.
        let mut binary = vec![0x00, 0x00];
        binary.extend_from_slice(&42i64.to_le_bytes());
        let hidden_bigint = Column {
            whole: true,
            ..BIGINT
        };
        let masked = mask_all_splits(&[hidden_bigint], true, &binary);
        assert_eq!(&masked[2..], &[0; 8]);
    }

    #[test]
    fn column_definition_flags_named_columns() {
        let mut payload = BytesMut::new();
        for text in ["def", "payments", "c", "cards", "CVV", "cvv"] {
            super::super::packet::put_lenenc(&mut payload, text.len() as u64);
            payload.extend_from_slice(text.as_bytes());
        }
        payload.extend_from_slice(&[0x0c, 33, 0, 0, 0, 0, 0, 253, 0, 0, 0, 0, 0]);
        let column = parse_column(&payload, &["cvv".to_string()]).expect("valid definition");
        assert!(column.whole);
        let column = parse_column(&payload, &["pan".to_string()]).expect("valid definition");
        assert!(!column.whole);
    }

    #[test]
    fn text_row_length_digit_not_joined_to_value() {
        // A length byte of 0x35 ('5') in front of a 15-digit value must not form a PAN with it.
        let value = vec![b'1'; 0x35];
        let row = text_row(&[Some(&value)]);
        let masked = mask_all_splits(&[STRING], false, &row);
        assert_eq!(masked[0], 0x35);
    }

    #[test]
    fn binary_row_masks_strings_and_bigint() {
        let mut row = vec![0x00, 0b0000_1000]; // header, column 1 (bit 3) is NULL
        let mut value = BytesMut::new();
        super::super::packet::put_lenenc(&mut value, 16);
        row.extend_from_slice(&value);
        row.extend_from_slice(b"4111111111111111");
        row.extend_from_slice(&4111111111111111i64.to_le_bytes());
        row.extend_from_slice(&42i32.to_le_bytes());
        let columns = [STRING, STRING, BIGINT, INT];
        let masked = mask_all_splits(&columns, true, &row);
        assert_eq!(&masked[3..19], b"411111******1111");
        let bigint = i64::from_le_bytes(masked[19..27].try_into().expect("8 bytes"));
        assert_eq!(bigint, 4111110000001111);
        assert_eq!(&masked[27..31], &42i32.to_le_bytes());
    }

    #[test]
    fn cut_off_rows_keep_their_length() {
        // Rows that end inside a length prefix or a fixed-size value.
        let cases: [(&[Column], bool, &[u8]); 3] = [
            (&[STRING; 6], false, &[0x01, 0xfd, 0xfd, 0xfd]),
            (&[BIGINT, STRING], true, &[0x00, 0x00, 1, 2, 3]),
            (&[STRING], true, &[0x00, 0x00, 0xfe, 1, 2]),
        ];
        for (columns, binary, row) in cases {
            mask_all_splits(columns, binary, row);
        }
    }

    #[test]
    fn binary_double_card_number_masked() {
        let mut row = vec![0x00, 0x00];
        row.extend_from_slice(&4111111111111111f64.to_le_bytes());
        let double = Column {
            column_type: TYPE_DOUBLE,
            unsigned: false,
            whole: false,
            wide: None,
        };
        let masked = mask_all_splits(&[double], true, &row);
        let value = f64::from_le_bytes(masked[2..10].try_into().expect("8 bytes"));
        assert_eq!(value, 4111110000001111f64);
    }

    #[test]
    fn execute_params_keep_types_across_executes() {
        let mut types = ParamTypes::default();
        let mut payload = vec![1, 0, 0, 0, 0, 1, 0, 0, 0];
        payload.push(0); // NULL bitmap
        payload.push(1); // new params bound
        payload.extend_from_slice(&[253, 0, TYPE_LONGLONG, 0]);
        payload.push(16);
        payload.extend_from_slice(b"4111111111111111");
        payload.extend_from_slice(&7i64.to_le_bytes());
        let recorded = |text: &[u8]| {
            let mut copy = text.to_vec();
            mask_in_place(&mut copy, &MaskPolicy::default());
            String::from_utf8_lossy(&copy).into_owned()
        };
        let params = execute_params(
            &payload,
            2,
            &mut types,
            &[],
            &MaskPolicy::default(),
            recorded,
        )
        .expect("valid execute");
        assert_eq!(params[0], "411111******1111");
        assert_eq!(params[1], 7);

        // The second execute binds no types and reuses the first one's.
        let mut again = vec![1, 0, 0, 0, 0, 1, 0, 0, 0, 0b10, 0];
        again.push(3);
        again.extend_from_slice(b"abc");
        let params = execute_params(&again, 2, &mut types, &[], &MaskPolicy::default(), recorded)
            .expect("valid execute");
        assert_eq!(params[0], "abc");
        assert_eq!(params[1], serde_json::Value::Null);
    }

    #[test]
    fn wide_text_values_masked_per_code_unit() {
        let pan = "4111 1111 1111 1111";
        type Encode = fn(&str) -> Vec<u8>;
        let encodings: [(u16, Encode); 3] = [
            (54, |text| {
                text.encode_utf16().flat_map(u16::to_be_bytes).collect()
            }),
            (56, |text| {
                text.encode_utf16().flat_map(u16::to_le_bytes).collect()
            }),
            (60, |text| {
                text.chars()
                    .flat_map(|c| u32::from(c).to_be_bytes())
                    .collect()
            }),
        ];
        for (collation, encode) in encodings {
            let column = Column {
                column_type: 253,
                wide: Wide::of_collation(collation),
                ..Column::default()
            };
            let value = encode(&format!("card {pan} é"));
            let row = text_row(&[Some(&value)]);
            let expected = text_row(&[Some(&encode("card 4111 11** **** 1111 é"))]);
            assert_eq!(
                mask_all_splits(&[column], false, &row),
                expected,
                "{collation}"
            );
        }
        // A UTF-8 column is not read as a wide one.
        assert_eq!(Wide::of_collation(45), None);
    }

    #[test]
    fn bit_and_exponent_values_masked_whole() {
        let bit = Column {
            column_type: TYPE_BIT,
            ..Column::default()
        };
        let double = Column {
            column_type: TYPE_DOUBLE,
            ..Column::default()
        };
        let pan = 4_111_111_111_111_111_u64.to_be_bytes();
        let masked = 4_111_110_000_001_111_u64.to_be_bytes();
        let row = text_row(&[Some(&pan), Some(b"4.111111111111111e15")]);
        let expected = text_row(&[Some(&masked), Some(b"4.11111******1111e15")]);
        assert_eq!(mask_all_splits(&[bit, double], false, &row), expected);
        // In a binary row, BIT is length-encoded as well.
        let mut binary = vec![0x00, 0x00];
        binary.push(8);
        binary.extend_from_slice(&pan);
        let mut expected = vec![0x00, 0x00, 8];
        expected.extend_from_slice(&masked);
        assert_eq!(mask_all_splits(&[bit], true, &binary), expected);
    }
}
