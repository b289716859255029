//! Masking of result rows. A DataRow is a column count, then per column a 4-byte length (-1
//! for NULL) and the value. Only values are scanned, never the length fields, so masking can
//! never change the framing.
//!
//! Text-format values are scanned as text. Binary values follow a rule per shape: `int8` (8
//! bytes) holding a card number has its middle digits zeroed, keeping the first six and last
//! four as text masking does, and any other binary value is scanned as text, which covers
//! `bytea` and the text-like types that clients fetch in binary.

use crate::mask::{MaskPolicy, StreamMasker, mask_in_place};

use super::codec::{BodyReader, CodecError};

/// Format code of binary columns in RowDescription and Bind.
const BINARY_FORMAT: i16 = 1;

/// Reads the format code of each column from a RowDescription body.
pub fn row_description_formats(body: &[u8]) -> Result<Vec<i16>, CodecError> {
    let mut reader = BodyReader::new(body, "RowDescription");
    let count = reader.i16()?.max(0) as usize;
    let mut formats = Vec::with_capacity(count);
    for _ in 0..count {
        reader.cstr()?;
        // Table OID, column number, type OID, type size, type modifier, then the format.
        reader.bytes(4 + 2 + 4 + 2 + 4)?;
        formats.push(reader.i16()?);
    }
    Ok(formats)
}

/// Masks every value of a DataRow body in place.
pub fn mask_data_row(
    body: &mut [u8],
    formats: &[i16],
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
        let binary = formats.get(column).copied() == Some(BINARY_FORMAT);
        masked += mask_value(value, binary, policy);
        offset = end;
    }
    Ok(masked)
}

fn mask_value(value: &mut [u8], binary: bool, policy: &MaskPolicy) -> usize {
    if binary && value.len() == 8 {
        return mask_int8(value, policy);
    }
    mask_in_place(value, policy)
}

/// Masks a binary `int8` whose decimal form is a card number: the digits text masking would
/// hide become zeros, so the value keeps its type and width.
fn mask_int8(value: &mut [u8], policy: &MaskPolicy) -> usize {
    let number = i64::from_be_bytes(value.try_into().expect("8 bytes"));
    if number <= 0 {
        return 0;
    }
    let mut digits = number.to_string().into_bytes();
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
    let zeroed: i64 = std::str::from_utf8(&digits)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(0);
    value.copy_from_slice(&zeroed.to_be_bytes());
    masked
}

/// Masks a DataRow body that arrives in pieces, column by column.
#[derive(Debug)]
pub struct RowMasker {
    formats: Vec<i16>,
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
            policy,
            header: Vec::with_capacity(4),
            columns_left: None,
            column: 0,
            value_left: 0,
            value: None,
        }
    }

    /// Appends the masked form of `input` to `out`, holding back what a split number needs.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
        while !input.is_empty() {
            if self.value_left > 0 {
                let take = self.value_left.min(input.len());
                let masker = self
                    .value
                    .get_or_insert_with(|| StreamMasker::new(self.policy.clone()));
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

    #[test]
    fn data_row_masks_binary_int8() {
        let pan: i64 = 4_111_111_111_111_111;
        let mut body = data_row(&[Some(&pan.to_be_bytes())]);
        mask_data_row(&mut body, &[1], &MaskPolicy::default()).expect("valid row");
        let expected: i64 = 4_111_110_000_001_111;
        assert_eq!(body, data_row(&[Some(&expected.to_be_bytes())]));
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
}
