//! Masking of result rows. A DataRow is a column count, then per column a 4-byte length (-1
//! for NULL) and the value. Only values are scanned, never the length fields, so masking can
//! never change the framing.
//!
//! Text-format values are scanned as text. Binary values follow a rule per shape, because the
//! column's type is not always known (a client may Bind and Execute without Describe):
//! - 8 bytes are read as `int8`. When its decimal form is a card number, the digits text
//!   masking would hide are set to zero, so it keeps its type and width;
//! - a well-formed `numeric` (header and base-10000 digit groups) gets the same treatment on
//!   its integer digits, in place, with the same number of groups;
//! - anything else is scanned as text, which covers `bytea` and text-like types fetched in
//!   binary.
//!
//! Text values are also searched for hex-encoded bytes, the form in which PostgreSQL prints
//! `bytea` by default (`\x` and hex digits): a card number inside is masked in its decoded form
//! and written back in hex.
//!
//! Columns the policy masks whole (`masking.fields`, matched by the column name in
//! RowDescription) are overwritten whatever their content. Each byte of a text value becomes
//! the mask character and each byte of a binary value zero, so the width stays the same.

use crate::mask::{
    MaskPolicy, StreamMasker, mask_formatted_numbers, mask_in_place, mask_in_place_with_hex,
};

use super::codec::{BodyReader, CodecError};

/// Format code of binary columns in RowDescription and Bind.
const BINARY_FORMAT: i16 = 1;

/// Reads the format code of each column from a RowDescription body, and whether its name is
/// one of `whole_fields` (lowercase), the columns masked whole.
pub fn row_description(
    body: &[u8],
    whole_fields: &[String],
) -> Result<(Vec<i16>, Vec<bool>), CodecError> {
    let mut reader = BodyReader::new(body, "RowDescription");
    let count = reader.i16()?.max(0) as usize;
    let mut formats = Vec::with_capacity(count);
    let mut whole = Vec::with_capacity(count);
    for _ in 0..count {
        let name = reader.cstr()?;
        let name = String::from_utf8_lossy(name).to_lowercase();
        whole.push(whole_fields.contains(&name));
        // Table OID, column number, type OID, type size, type modifier, then the format.
        reader.bytes(4 + 2 + 4 + 2 + 4)?;
        formats.push(reader.i16()?);
    }
    Ok((formats, whole))
}

/// Masks the column names of a RowDescription body in place, each on its own, so an alias
/// (`SELECT pan AS "4111111111111111"`) is masked like a value. The other fields are binary
/// and stay as they are.
pub fn mask_column_names(body: &mut [u8], policy: &MaskPolicy) -> Result<(), CodecError> {
    let malformed = || CodecError::Malformed {
        message: "RowDescription",
        reason: "body shorter than its columns",
    };
    let count = i16::from_be_bytes(
        body.get(..2)
            .ok_or_else(malformed)?
            .try_into()
            .expect("2 bytes"),
    );
    let mut offset = 2;
    for _ in 0..count.max(0) {
        let name_len = body[offset..]
            .iter()
            .position(|&byte| byte == 0)
            .ok_or_else(malformed)?;
        mask_in_place(&mut body[offset..offset + name_len], policy);
        // The NUL, then table OID, column number, type OID, size, modifier and format.
        offset += name_len + 1 + 18;
        if offset > body.len() {
            return Err(malformed());
        }
    }
    Ok(())
}

/// Masks every value of a DataRow body in place.
pub fn mask_data_row(
    body: &mut [u8],
    formats: &[i16],
    policy: &MaskPolicy,
) -> Result<usize, CodecError> {
    mask_data_row_with(body, formats, &[], policy)
}

/// Masks every value of a DataRow body in place, the columns flagged in `whole` entirely.
pub fn mask_data_row_with(
    body: &mut [u8],
    formats: &[i16],
    whole: &[bool],
    policy: &MaskPolicy,
) -> Result<usize, CodecError> {
    let short = || CodecError::Malformed {
        message: "DataRow",
        reason: "body shorter than its columns",
    };
    if body.len() < 2 {
        return Err(short());
    }
    let count = i16::from_be_bytes([body[0], body[1]]).max(0) as usize;
    let mut offset = 2;
    let mut masked = 0;
    for column in 0..count {
        let len_bytes: [u8; 4] = body
            .get(offset..offset + 4)
            .ok_or_else(short)?
            .try_into()
            .expect("4 bytes");
        let len = i32::from_be_bytes(len_bytes);
        offset += 4;
        if len < 0 {
            continue;
        }
        let end = offset + len as usize;
        let value = body.get_mut(offset..end).ok_or_else(short)?;
        // One format code applies to every column (Bind may send just one).
        let format = if formats.len() == 1 {
            formats.first()
        } else {
            formats.get(column)
        };
        let binary = format.copied() == Some(BINARY_FORMAT);
        if whole.get(column).copied().unwrap_or(false) {
            overwrite(value, binary, policy);
            masked += usize::from(!value.is_empty());
        } else {
            masked += mask_value(value, binary, policy);
        }
        offset = end;
    }
    Ok(masked)
}

/// Signature that opens a binary COPY stream, before its flags and header extension.
const COPY_BINARY_SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Masks one CopyData message of a binary COPY out in place. PostgreSQL sends one tuple per
/// message, the first one after the stream's header and the trailer (a field count of -1) on
/// its own. Each field follows the binary rule of DataRow columns. A message that does not
/// parse as whole tuples is scanned as text instead, so nothing is passed unscanned.
pub fn mask_copy_binary(body: &mut [u8], policy: &MaskPolicy) -> usize {
    match mask_copy_tuples(body, policy) {
        Some(masked) => masked,
        None => mask_in_place_with_hex(body, policy),
    }
}

/// Masks the tuples of a binary COPY message, or returns `None` if it contains anything else.
fn mask_copy_tuples(body: &mut [u8], policy: &MaskPolicy) -> Option<usize> {
    let mut offset = 0;
    if body.starts_with(COPY_BINARY_SIGNATURE) {
        // The signature, 4 bytes of flags, and the extension's length and bytes.
        let extension_at = COPY_BINARY_SIGNATURE.len() + 4;
        let extension: [u8; 4] = body.get(extension_at..extension_at + 4)?.try_into().ok()?;
        offset = extension_at + 4 + usize::try_from(u32::from_be_bytes(extension)).ok()?;
    }
    // Fields are masked only once the whole message has parsed, so a failed parse leaves the
    // bytes for the text scan untouched.
    let mut fields = Vec::new();
    while offset < body.len() {
        let count = i16::from_be_bytes(body.get(offset..offset + 2)?.try_into().ok()?);
        offset += 2;
        if count == -1 {
            break;
        }
        for _ in 0..usize::try_from(count).ok()? {
            let len = i32::from_be_bytes(body.get(offset..offset + 4)?.try_into().ok()?);
            offset += 4;
            if len < 0 {
                continue;
            }
            let end = offset.checked_add(usize::try_from(len).ok()?)?;
            body.get(offset..end)?;
            fields.push(offset..end);
            offset = end;
        }
    }
    if offset != body.len() {
        return None;
    }
    Some(
        fields
            .into_iter()
            .map(|field| mask_value(&mut body[field], true, policy))
            .sum(),
    )
}

/// Overwrites a value masked whole: the mask character for text, zero bytes for binary.
fn overwrite(value: &mut [u8], binary: bool, policy: &MaskPolicy) {
    value.fill(if binary { 0 } else { policy.mask_char });
}

/// Masks one value of a row, as binary or as text.
pub(crate) fn mask_value(value: &mut [u8], binary: bool, policy: &MaskPolicy) -> usize {
    if binary {
        return mask_binary_value(value, policy, 0);
    }
    // `float8` prints large whole numbers in exponent notation, alone or in arrays.
    mask_formatted_numbers(value, policy) + mask_in_place_with_hex(value, policy)
}

/// Masks the column values of a pgoutput row change (`I`nsert, `U`pdate, `D`elete) in place,
/// each value on its own, so the length before a value can never join its digits. Returns
/// `None` for other messages and for bytes that do not parse whole, which the caller scans
/// as text.
///
/// # Format
///
/// The message type, the transaction id (`i32`) in a streamed transaction, and the relation
/// OID (`i32`). Then come tuples, each after a `K`, `O` or `N` byte, as `ncols: i16` and per
/// column `n` (NULL), `u` (unchanged TOAST value), or `t` (text) or `b` (binary) with
/// `length: i32` and the bytes.
pub fn mask_pgoutput(message: &mut [u8], policy: &MaskPolicy) -> Option<usize> {
    if !matches!(message.first(), Some(b'I' | b'U' | b'D')) {
        return None;
    }
    // Without, then with, the transaction id of a streamed transaction.
    let values = pgoutput_values(message, 1).or_else(|| pgoutput_values(message, 5))?;
    Some(
        values
            .into_iter()
            .map(|(value, binary)| mask_value(&mut message[value], binary, policy))
            .sum(),
    )
}

/// Returns the value ranges of a row change whose relation OID starts at `at`, and whether
/// each is binary, when the message parses whole.
fn pgoutput_values(message: &[u8], at: usize) -> Option<Vec<(std::ops::Range<usize>, bool)>> {
    let kind = message[0];
    let mut at = at + 4;
    message.get(..at)?;
    let mut values = Vec::new();
    loop {
        let tuple = *message.get(at)?;
        at += 1;
        let last = match (kind, tuple) {
            (b'U' | b'D', b'K' | b'O') => kind == b'D',
            (b'I' | b'U', b'N') => true,
            _ => return None,
        };
        let count = i16::from_be_bytes(message.get(at..at + 2)?.try_into().ok()?);
        at += 2;
        for _ in 0..usize::try_from(count).ok()? {
            let column = *message.get(at)?;
            at += 1;
            match column {
                b'n' | b'u' => {}
                b't' | b'b' => {
                    let len = usize::try_from(read_i32(message, at)?).ok()?;
                    at += 4;
                    let end = at.checked_add(len)?;
                    message.get(at..end)?;
                    values.push((at..end, column == b'b'));
                    at = end;
                }
                _ => return None,
            }
        }
        if last {
            break;
        }
    }
    (at == message.len()).then_some(values)
}

/// Maximum depth of binary arrays, records and ranges opened inside one another.
const MAX_CONTAINER_DEPTH: usize = 4;

/// Masks the elements of a binary array, record (composite) or range by the binary rules, in
/// place. Returns `None` when the bytes are not one of these, checked strictly: every length
/// must fit, and the elements must end where the value ends.
///
/// # Format
///
/// - array: `ndim: i32`, `has_null: i32`, element type OID, `ndim` pairs of `(length, lower
///   bound)`, then each element as `length: i32` (-1 for NULL) and its bytes;
/// - record: `nfields: i32`, then per field a type OID, `length: i32` and its bytes;
/// - range: a flags byte, then the lower and upper bound as `length: i32` and bytes, each
///   present unless the range is empty or that bound infinite.
fn mask_container(value: &mut [u8], policy: &MaskPolicy, depth: usize) -> Option<usize> {
    if depth >= MAX_CONTAINER_DEPTH {
        return None;
    }
    let fields = array_elements(value)
        .or_else(|| record_fields(value))
        .or_else(|| range_bounds(value))?;
    Some(
        fields
            .into_iter()
            .map(|field| mask_binary_value(&mut value[field], policy, depth + 1))
            .sum(),
    )
}

/// Masks one binary value: an `int8`, a `numeric`, a container of such values, or else as
/// text.
fn mask_binary_value(value: &mut [u8], policy: &MaskPolicy, depth: usize) -> usize {
    if value.len() == 8 {
        return mask_int8(value, policy);
    }
    if let Some(masked) = mask_numeric(value, policy) {
        return masked;
    }
    if let Some(masked) = mask_container(value, policy, depth) {
        return masked;
    }
    mask_formatted_numbers(value, policy) + mask_in_place_with_hex(value, policy)
}

fn read_i32(value: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_be_bytes(value.get(at..at + 4)?.try_into().ok()?))
}

/// Reads `count` length-prefixed elements from `at`, each after `skip` bytes (a type OID for
/// record fields). Returns their ranges when they end exactly at the value's end.
fn length_prefixed(
    value: &[u8],
    mut at: usize,
    count: usize,
    skip: usize,
) -> Option<Vec<std::ops::Range<usize>>> {
    let mut fields = Vec::new();
    for _ in 0..count {
        at += skip;
        let len = read_i32(value, at)?;
        at += 4;
        if len < 0 {
            continue;
        }
        let end = at.checked_add(usize::try_from(len).ok()?)?;
        value.get(at..end)?;
        fields.push(at..end);
        at = end;
    }
    (at == value.len()).then_some(fields)
}

fn array_elements(value: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
    let ndim = usize::try_from(read_i32(value, 0)?).ok()?;
    let has_null = read_i32(value, 4)?;
    if !(1..=6).contains(&ndim) || !(0..=1).contains(&has_null) {
        return None;
    }
    let mut count: usize = 1;
    for dim in 0..ndim {
        let len = usize::try_from(read_i32(value, 12 + dim * 8)?).ok()?;
        read_i32(value, 16 + dim * 8)?;
        count = count.checked_mul(len)?;
    }
    if count > value.len() / 4 {
        return None;
    }
    length_prefixed(value, 12 + ndim * 8, count, 0)
}

fn record_fields(value: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
    let count = usize::try_from(read_i32(value, 0)?).ok()?;
    if count == 0 || count > value.len() / 8 {
        return None;
    }
    length_prefixed(value, 4, count, 4)
}

/// Range flags: empty, lower bound infinite, upper bound infinite (`RANGE_EMPTY`,
/// `RANGE_LB_INF`, `RANGE_UB_INF` in PostgreSQL's `rangetypes.h`).
const RANGE_EMPTY: u8 = 0x01;
const RANGE_LB_INF: u8 = 0x08;
const RANGE_UB_INF: u8 = 0x10;

fn range_bounds(value: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
    let flags = *value.first()?;
    // Only the flags a range sent to a client can carry.
    if flags & !(RANGE_EMPTY | 0x02 | 0x04 | RANGE_LB_INF | RANGE_UB_INF) != 0 {
        return None;
    }
    if flags & RANGE_EMPTY != 0 {
        return (value.len() == 1).then(Vec::new);
    }
    let bounds = usize::from(flags & RANGE_LB_INF == 0) + usize::from(flags & RANGE_UB_INF == 0);
    if bounds == 0 {
        return (value.len() == 1).then(Vec::new);
    }
    length_prefixed(value, 1, bounds, 0)
}

/// Base of `numeric`'s digit groups.
const NUMERIC_BASE: i64 = 10_000;
/// `numeric` sign words for positive and negative values (`NUMERIC_POS`, `NUMERIC_NEG` in
/// PostgreSQL's `src/backend/utils/adt/numeric.c`).
const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;

/// Masks a binary `numeric` whose integer part is a card number. Returns `None` when the bytes
/// are not a well-formed numeric, so the caller falls back to another rule.
///
/// # Format
///
/// `ndigits: i16, weight: i16, sign: u16, dscale: u16`, then `ndigits` base-10000 groups, the
/// first one worth `10000^weight`. A value with a fraction is a decimal and never a PAN.
fn mask_numeric(value: &mut [u8], policy: &MaskPolicy) -> Option<usize> {
    if value.len() < 8 {
        return None;
    }
    let word = |index: usize| i16::from_be_bytes([value[index * 2], value[index * 2 + 1]]);
    let ndigits = usize::try_from(word(0)).ok()?;
    let weight = word(1);
    let sign = word(2) as u16;
    if value.len() != 8 + ndigits * 2 || !(sign == NUMERIC_POS || sign == NUMERIC_NEG) {
        return None;
    }
    let groups: Vec<i64> = (0..ndigits).map(|i| i64::from(word(4 + i))).collect();
    if groups
        .iter()
        .any(|group| !(0..NUMERIC_BASE).contains(group))
    {
        return None;
    }
    // Groups past the integer part, or a negative weight, mean a fraction: not a PAN.
    let integer_groups = usize::try_from(i32::from(weight) + 1).ok()?;
    if ndigits > integer_groups || integer_groups > 5 {
        return Some(0);
    }

    let mut digits = String::new();
    for index in 0..integer_groups {
        let group = groups.get(index).copied().unwrap_or(0);
        if index == 0 {
            digits.push_str(&group.to_string());
        } else {
            digits.push_str(&format!("{group:04}"));
        }
    }
    let mut scanned = digits.clone().into_bytes();
    let masked = mask_in_place(&mut scanned, policy);
    if masked == 0 {
        return Some(0);
    }

    // Zero the hidden digits, then write the groups back in place.
    let zeroed: String = scanned
        .iter()
        .zip(digits.bytes())
        .map(|(after, before)| {
            if after.is_ascii_digit() {
                char::from(before)
            } else {
                '0'
            }
        })
        .collect();
    let number: i128 = zeroed.parse().ok()?;
    for index in 0..ndigits {
        let power = integer_groups - 1 - index;
        let group =
            (number / i128::from(NUMERIC_BASE).pow(power as u32)) % i128::from(NUMERIC_BASE);
        let bytes = (group as i16).to_be_bytes();
        value[8 + index * 2] = bytes[0];
        value[8 + index * 2 + 1] = bytes[1];
    }
    Some(masked)
}

/// Masks a binary `int8` whose decimal form is a card number: the digits text masking would
/// hide become zeros, so the value keeps its type and width.
fn mask_int8(value: &mut [u8], policy: &MaskPolicy) -> usize {
    let masked = mask_int8_only(value, policy);
    if masked > 0 {
        return masked;
    }
    mask_float8(value, policy)
}

/// Masks a binary `float8` holding a whole number that is a card number: the hidden digits
/// become zero, as for `int8`. Only integers below 2^63 are exact enough to read as digits.
fn mask_float8(value: &mut [u8], policy: &MaskPolicy) -> usize {
    let number = f64::from_be_bytes(value.try_into().expect("8 bytes"));
    if !(number.is_finite()
        && number.fract() == 0.0
        && number.abs() >= 1e12
        && number.abs() < 9.2e18)
    {
        return 0;
    }
    let mut bytes = (number as i64).to_be_bytes();
    let masked = mask_int8_only(&mut bytes, policy);
    if masked > 0 {
        let zeroed = i64::from_be_bytes(bytes) as f64;
        value.copy_from_slice(&zeroed.to_be_bytes());
    }
    masked
}

/// Masks a binary `int8` whose decimal form is a card number.
fn mask_int8_only(value: &mut [u8], policy: &MaskPolicy) -> usize {
    let number = i64::from_be_bytes(value.try_into().expect("8 bytes"));
    // A negative number is masked on its digits, as its text form `-4111...` is.
    let mut digits = number.unsigned_abs().to_string().into_bytes();
    let original = digits.clone();
    let masked = mask_in_place(&mut digits, policy);
    if masked == 0 {
        return 0;
    }
    for (digit, before) in digits.iter_mut().zip(&original) {
        if !digit.is_ascii_digit() {
            *digit = b'0';
        } else {
            *digit = *before;
        }
    }
    let magnitude: i64 = std::str::from_utf8(&digits)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(0);
    let zeroed = if number < 0 { -magnitude } else { magnitude };
    value.copy_from_slice(&zeroed.to_be_bytes());
    masked
}

/// Masks a DataRow body that arrives in pieces, column by column.
#[derive(Debug)]
pub struct RowMasker {
    formats: Vec<i16>,
    /// Columns masked whole, by position.
    whole: Vec<bool>,
    /// Byte written over the current value when its column is masked whole.
    overwrite: Option<u8>,
    policy: MaskPolicy,
    /// Header bytes (column count or a length) gathered so far.
    header: Vec<u8>,
    columns_left: Option<usize>,
    column: usize,
    /// Bytes left in the current value, and its masker.
    value_left: usize,
    value: Option<StreamMasker>,
}

impl RowMasker {
    pub fn new(formats: Vec<i16>, policy: MaskPolicy) -> Self {
        Self {
            formats,
            whole: Vec::new(),
            overwrite: None,
            policy,
            header: Vec::with_capacity(4),
            columns_left: None,
            column: 0,
            value_left: 0,
            value: None,
        }
    }

    /// Masks the columns flagged in `whole` entirely.
    pub fn with_whole_columns(mut self, whole: Vec<bool>) -> Self {
        self.whole = whole;
        self
    }

    /// Appends the masked form of `input` to `out`, holding back what a split number needs.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
        while !input.is_empty() {
            if self.value_left > 0
                && let Some(byte) = self.overwrite
            {
                let take = self.value_left.min(input.len());
                out.extend(std::iter::repeat_n(byte, take));
                self.value_left -= take;
                input = &input[take..];
                if self.value_left == 0 {
                    self.overwrite = None;
                    self.column += 1;
                }
                continue;
            }
            if self.value_left > 0 {
                let take = self.value_left.min(input.len());
                let masker = self
                    .value
                    .get_or_insert_with(|| StreamMasker::new(self.policy.clone()).with_hex());
                masker.feed(&input[..take], out);
                self.value_left -= take;
                input = &input[take..];
                if self.value_left == 0 {
                    if let Some(mut masker) = self.value.take() {
                        masker.finish(out);
                    }
                    self.column += 1;
                }
                continue;
            }

            let wanted = if self.columns_left.is_none() { 2 } else { 4 };
            let take = (wanted - self.header.len()).min(input.len());
            self.header.extend_from_slice(&input[..take]);
            out.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.header.len() < wanted {
                continue;
            }
            match self.columns_left {
                None => {
                    let count = i16::from_be_bytes([self.header[0], self.header[1]]).max(0);
                    self.columns_left = Some(count as usize);
                }
                Some(left) => {
                    if left == 0 {
                        return Err(CodecError::Malformed {
                            message: "DataRow",
                            reason: "more bytes than its columns",
                        });
                    }
                    self.columns_left = Some(left - 1);
                    let len = i32::from_be_bytes(self.header[..4].try_into().expect("4 bytes"));
                    if len > 0 {
                        self.value_left = len as usize;
                        if self.whole.get(self.column).copied().unwrap_or(false) {
                            let format = if self.formats.len() == 1 {
                                self.formats.first()
                            } else {
                                self.formats.get(self.column)
                            };
                            let binary = format.copied() == Some(BINARY_FORMAT);
                            self.overwrite = Some(if binary { 0 } else { self.policy.mask_char });
                        }
                        // NOTE: streamed binary int8 values cannot occur (8 bytes never stream),
                        // so every streamed value is scanned as text.
                    } else {
                        self.column += 1;
                    }
                }
            }
            self.header.clear();
        }
        Ok(())
    }

    /// Flushes what is held back at the end of the row.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), CodecError> {
        if let Some(mut masker) = self.value.take() {
            masker.finish(out);
        }
        if self.value_left > 0 || !self.header.is_empty() {
            return Err(CodecError::Malformed {
                message: "DataRow",
                reason: "row ended inside a column",
            });
        }
        let _ = &self.formats;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_row(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut body = (values.len() as i16).to_be_bytes().to_vec();
        for value in values {
            match value {
                Some(bytes) => {
                    body.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
                    body.extend_from_slice(bytes);
                }
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        body
    }

    #[test]
    fn data_row_masks_text_columns() {
        let mut body = data_row(&[Some(b"4111 1111 1111 1111"), None, Some(b"1748503543012")]);
        let masked =
            mask_data_row(&mut body, &[0, 0, 0], &MaskPolicy::default()).expect("valid row");
        assert_eq!(masked, 1);
        let expected = data_row(&[Some(b"4111 11** **** 1111"), None, Some(b"1748503543012")]);
        assert_eq!(body, expected);
    }

    /// Builds binary COPY tuples of int8 and text fields, with the stream's header first.
    fn copy_binary(header: bool, tuples: &[&[Option<&[u8]>]]) -> Vec<u8> {
        let mut out = Vec::new();
        if header {
            out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
            out.extend_from_slice(&0u32.to_be_bytes());
            out.extend_from_slice(&2u32.to_be_bytes());
            out.extend_from_slice(b"ex");
        }
        for tuple in tuples {
            out.extend_from_slice(&data_row(tuple));
        }
        out
    }

    #[test]
    fn copy_binary_fields_follow_binary_rule() {
        let pan: i64 = 4_111_111_111_111_111;
        let masked: i64 = 4_111_110_000_001_111;
        let fields: [Option<&[u8]>; 3] =
            [Some(&pan.to_be_bytes()), None, Some(b"5555 5555 5555 4444")];
        let masked_fields: [Option<&[u8]>; 3] = [
            Some(&masked.to_be_bytes()),
            None,
            Some(b"5555 55** **** 4444"),
        ];
        let mut body = copy_binary(true, &[&fields]);
        assert_eq!(mask_copy_binary(&mut body, &MaskPolicy::default()), 2);
        assert_eq!(body, copy_binary(true, &[&masked_fields]));

        // Later tuples come without the header, and the trailer is left alone.
        let mut body = copy_binary(false, &[&fields, &fields]);
        assert_eq!(mask_copy_binary(&mut body, &MaskPolicy::default()), 4);
        assert_eq!(body, copy_binary(false, &[&masked_fields, &masked_fields]));
        let mut trailer = (-1i16).to_be_bytes().to_vec();
        assert_eq!(mask_copy_binary(&mut trailer, &MaskPolicy::default()), 0);
        assert_eq!(trailer, (-1i16).to_be_bytes());
    }

    #[test]
    fn copy_binary_torn_tuple_scanned_as_text() {
        // A tuple cut short does not parse, so the message is scanned as text.
        let fields: [Option<&[u8]>; 1] = [Some(b"4111111111111111 and more")];
        let mut body = copy_binary(false, &[&fields]);
        body.truncate(body.len() - 5);
        assert_eq!(mask_copy_binary(&mut body, &MaskPolicy::default()), 1);
        assert!(
            body.windows(16).any(|window| window == b"411111******1111"),
            "{body:?}"
        );
    }

    #[test]
    fn data_row_masks_binary_int8() {
        for sign in [1i64, -1] {
            let pan: i64 = sign * 4_111_111_111_111_111;
            let mut body = data_row(&[Some(&pan.to_be_bytes())]);
            mask_data_row(&mut body, &[1], &MaskPolicy::default()).expect("valid row");
            let expected: i64 = sign * 4_111_110_000_001_111;
            assert_eq!(body, data_row(&[Some(&expected.to_be_bytes())]));
        }
        // The smallest int8 has no positive counterpart, and no card number either.
        let mut body = data_row(&[Some(&i64::MIN.to_be_bytes())]);
        mask_data_row(&mut body, &[1], &MaskPolicy::default()).expect("valid row");
        assert_eq!(body, data_row(&[Some(&i64::MIN.to_be_bytes())]));
    }

    /// Encodes an integer as binary `numeric` the way PostgreSQL does: trailing zero groups
    /// dropped.
    fn numeric(value: u128) -> Vec<u8> {
        let mut groups = Vec::new();
        let mut rest = value;
        while rest > 0 {
            groups.push((rest % 10_000) as i16);
            rest /= 10_000;
        }
        groups.reverse();
        let weight = groups.len() as i16 - 1;
        while groups.last() == Some(&0) {
            groups.pop();
        }
        let mut out = Vec::new();
        for word in [groups.len() as i16, weight, 0, 0] {
            out.extend_from_slice(&word.to_be_bytes());
        }
        for group in groups {
            out.extend_from_slice(&group.to_be_bytes());
        }
        out
    }

    #[test]
    fn whole_columns_overwritten_same_width() {
        let row = data_row(&[
            Some(b"123"),
            Some(b"4111 1111 1111 1111"),
            None,
            Some(&7i64.to_be_bytes()),
        ]);
        let formats = [0, 0, 0, 1];
        let whole = [true, false, true, true];
        let mut body = row.clone();
        let masked = mask_data_row_with(&mut body, &formats, &whole, &MaskPolicy::default())
            .expect("valid row");
        assert_eq!(masked, 3, "cvv, PAN and the binary value");
        let expected = data_row(&[
            Some(b"***"),
            Some(b"4111 11** **** 1111"),
            None,
            Some(&[0; 8]),
        ]);
        assert_eq!(body, expected);

        // Streamed in pieces of every size, the row comes out the same.
        for piece in 1..row.len() {
            let mut masker = RowMasker::new(formats.to_vec(), MaskPolicy::default())
                .with_whole_columns(whole.to_vec());
            let mut out = Vec::new();
            for chunk in row.chunks(piece) {
                masker.feed(chunk, &mut out).expect("valid row");
            }
            masker.finish(&mut out).expect("complete row");
            assert_eq!(out, expected, "pieces of {piece}");
        }
    }

    #[test]
    fn row_description_flags_named_columns() {
        let mut body = 2i16.to_be_bytes().to_vec();
        for (name, format) in [("id", 0i16), ("CVV", 1)] {
            body.extend_from_slice(name.as_bytes());
            body.push(0);
            body.extend_from_slice(&[0; 4 + 2 + 4 + 2 + 4]);
            body.extend_from_slice(&format.to_be_bytes());
        }
        let (formats, whole) =
            row_description(&body, &["cvv".to_string()]).expect("valid RowDescription");
        assert_eq!(formats, [0, 1]);
        assert_eq!(whole, [false, true]);
    }

    #[test]
    fn data_row_masks_binary_numeric() {
        let mut body = data_row(&[Some(&numeric(4_111_111_111_111_111))]);
        mask_data_row(&mut body, &[1], &MaskPolicy::default()).expect("valid row");
        let value = &body[6..];
        let groups: Vec<i16> = value[8..]
            .chunks(2)
            .map(|pair| i16::from_be_bytes([pair[0], pair[1]]))
            .collect();
        assert_eq!(groups, [4111, 1100, 0, 1111], "4111 1100 0000 1111");
        assert_eq!(
            value.len(),
            numeric(4_111_111_111_111_111).len(),
            "same width"
        );
    }

    #[test]
    fn binary_numeric_without_pan_unchanged() {
        for number in [1_748_503_543_012u128, 42, 10_000_000_000_000_000] {
            let original = data_row(&[Some(&numeric(number))]);
            let mut body = original.clone();
            mask_data_row(&mut body, &[1], &MaskPolicy::default()).expect("valid row");
            assert_eq!(body, original, "{number} is no card number");
        }
    }

    #[test]
    fn binary_numeric_nineteen_digits_masked() {
        let mut body = data_row(&[Some(&numeric(6_212_345_678_901_234_569))]);
        mask_data_row(&mut body, &[1], &MaskPolicy::default()).expect("valid row");
        let groups: Vec<i16> = body[14..]
            .chunks(2)
            .map(|pair| i16::from_be_bytes([pair[0], pair[1]]))
            .collect();
        // 621234 567890123 4569 with the middle nine digits hidden: 621 2340 0000 0000 4569.
        assert_eq!(groups, [621, 2340, 0, 0, 4569]);
    }

    #[test]
    fn streamed_row_matches_whole_row_every_split() {
        let body = data_row(&[
            Some(b"card 5555-5555-5555-4444 end"),
            None,
            Some(b"4111111111111111"),
        ]);
        let mut whole = body.clone();
        mask_data_row(&mut whole, &[], &MaskPolicy::default()).expect("valid row");
        for split in 0..=body.len() {
            let mut masker = RowMasker::new(Vec::new(), MaskPolicy::default());
            let mut out = Vec::new();
            masker.feed(&body[..split], &mut out).expect("first piece");
            masker.feed(&body[split..], &mut out).expect("second piece");
            masker.finish(&mut out).expect("complete row");
            assert_eq!(out, whole, "split at {split}");
        }
    }

    #[test]
    fn data_row_truncated_rejected() {
        let mut body = data_row(&[Some(b"abc")]);
        body.truncate(body.len() - 1);
        assert!(mask_data_row(&mut body, &[], &MaskPolicy::default()).is_err());
    }

    /// Encodes `number` as a binary `int8` value with its length prefix.
    fn int8_element(number: i64) -> Vec<u8> {
        let mut element = 8i32.to_be_bytes().to_vec();
        element.extend_from_slice(&number.to_be_bytes());
        element
    }

    #[test]
    fn binary_containers_masked_inside() {
        const PAN: i64 = 4_111_111_111_111_111;
        const MASKED: i64 = 4_111_110_000_001_111;
        let policy = MaskPolicy::default();

        // int8[] with one dimension of two elements, lower bound 1, type OID 20.
        let mut array = [1i32, 0, 20, 2, 1]
            .iter()
            .flat_map(|word| word.to_be_bytes())
            .collect::<Vec<u8>>();
        array.extend(int8_element(PAN));
        array.extend(int8_element(7));
        let mut expected = array[..20].to_vec();
        expected.extend(int8_element(MASKED));
        expected.extend(int8_element(7));
        assert_eq!(mask_value(&mut array, true, &policy), 1);
        assert_eq!(array, expected);

        // A record of (int8, int8[]): each field has its type OID before its length.
        let inner: Vec<u8> = {
            let mut inner = [1i32, 0, 20, 1, 1]
                .iter()
                .flat_map(|word| word.to_be_bytes())
                .collect::<Vec<u8>>();
            inner.extend(int8_element(PAN));
            inner
        };
        let mut record = 2i32.to_be_bytes().to_vec();
        record.extend(20u32.to_be_bytes());
        record.extend(int8_element(PAN));
        record.extend(1016u32.to_be_bytes());
        record.extend((inner.len() as i32).to_be_bytes());
        record.extend(&inner);
        assert_eq!(mask_value(&mut record, true, &policy), 2);
        let text = format!("{record:?}");
        assert!(!record.windows(8).any(|w| w == PAN.to_be_bytes()), "{text}");

        // int8range [PAN, PAN + 1): inclusive lower bound, two bounds.
        let mut range = vec![0x02];
        range.extend(int8_element(PAN));
        range.extend(int8_element(PAN + 1));
        assert_eq!(mask_value(&mut range, true, &policy), 1);
        assert_eq!(&range[5..13], &MASKED.to_be_bytes());

        // Bytes that only look like a header are scanned as text.
        let mut text = b"\0\0\0\x01 4111111111111111".to_vec();
        assert_eq!(mask_value(&mut text, true, &policy), 1);
        assert!(text.ends_with(b"411111******1111"));
    }

    #[test]
    fn pgoutput_values_masked_apart_from_lengths() {
        // An insert of one text column of 49 bytes: the length's last byte is `1`, which a
        // scan of the whole message would join to the card number after it.
        let value = format!("4111111111111111{}", "x".repeat(33));
        let mut message = vec![b'I'];
        message.extend(16_384u32.to_be_bytes());
        message.push(b'N');
        message.extend(1i16.to_be_bytes());
        message.push(b't');
        message.extend((value.len() as i32).to_be_bytes());
        message.extend(value.as_bytes());
        assert_eq!(message[message.len() - value.len() - 1], b'1');
        assert_eq!(mask_pgoutput(&mut message, &MaskPolicy::default()), Some(1));
        assert!(String::from_utf8_lossy(&message).contains("411111******1111x"));

        // An update with its old key and new row, in a streamed transaction (with an xid).
        let mut update = vec![b'U'];
        update.extend(700u32.to_be_bytes());
        update.extend(16_384u32.to_be_bytes());
        for tuple in [b'K', b'N'] {
            update.push(tuple);
            update.extend(2i16.to_be_bytes());
            update.push(b'n');
            update.push(b't');
            update.extend(16i32.to_be_bytes());
            update.extend(b"5555555555554444");
        }
        assert_eq!(mask_pgoutput(&mut update, &MaskPolicy::default()), Some(2));
        assert!(!String::from_utf8_lossy(&update).contains("5555555555554444"));

        // Other messages, and bytes that do not parse whole, are left to the text scan.
        assert_eq!(
            mask_pgoutput(&mut b"R\0\0\0\x01".to_vec(), &MaskPolicy::default()),
            None
        );
        let mut truncated = message[..message.len() - 1].to_vec();
        assert_eq!(mask_pgoutput(&mut truncated, &MaskPolicy::default()), None);
    }

    #[test]
    fn binary_float8_card_number_masked() {
        let mut value = 4_111_111_111_111_111.0f64.to_be_bytes().to_vec();
        assert_eq!(mask_value(&mut value, true, &MaskPolicy::default()), 1);
        let masked = f64::from_be_bytes(value.as_slice().try_into().expect("8 bytes"));
        assert_eq!(masked, 4_111_110_000_001_111.0);
        // A fraction or a small number stays.
        for number in [4_111_111_111_111_111.5f64, 12.0, 1.0e-300] {
            let mut value = number.to_be_bytes().to_vec();
            assert_eq!(mask_value(&mut value, true, &MaskPolicy::default()), 0);
        }
    }
}
