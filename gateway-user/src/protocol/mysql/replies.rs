//! Masking of the server's packets other than rows: ERR messages, OK packets and column
//! definitions. Each text field is masked as a value of its own, so a length prefix or an
//! SQLSTATE next to it is never read as digits of a card number, and every length stays.

use crate::mask::MaskPolicy;

use super::packet::FieldReader;

/// Status flag of an OK packet that carries session state changes.
const SERVER_SESSION_STATE_CHANGED: u16 = 0x4000;

/// Session state entry type whose data starts with a one-byte encoding specification.
const SESSION_TRACK_GTIDS: u8 = 3;

/// Masks one text field as a whole value, in the session's result character set, which may be
/// a wide one.
fn mask_in_place(field: &mut [u8], policy: &MaskPolicy) -> usize {
    crate::mask::mask_in_place(field, policy) + crate::mask::wide::mask_wide_text(field, policy)
}

/// Returns the range of the length-encoded string at `at`, or `None` when `data` is too short.
fn lenenc_string(data: &[u8], at: usize) -> Option<(usize, usize)> {
    let mut reader = FieldReader::new(data.get(at..)?, "string");
    let text = reader.lenenc_bytes().ok()?;
    let end = data.len() - reader.remaining();
    Some((end - text.len(), end))
}

/// Masks the message of an ERR packet (`0xff`, code `u16`, `#` and SQLSTATE when present, then
/// the message). Returns how many PANs it masked.
pub fn mask_err(data: &mut [u8], policy: &MaskPolicy) -> usize {
    let start = if data.get(3) == Some(&b'#') { 9 } else { 3 };
    data.get_mut(start..)
        .map_or(0, |message| mask_in_place(message, policy))
}

/// Masks an OK packet: `last_insert_id` by the rule for binary numbers, the info text, and each
/// string of the session state changes. `session_track` is set when the legs agreed on
/// `CLIENT_SESSION_TRACK`, which makes the info a length-encoded string. A layout that does not
/// parse is masked as text from where it stops. Returns how many PANs it masked.
pub fn mask_ok(data: &mut [u8], session_track: bool, policy: &MaskPolicy) -> usize {
    let mut masked = 0;
    // Header byte, affected rows, last insert id, status, warnings.
    let mut reader = FieldReader::new(data.get(1..).unwrap_or_default(), "OK packet");
    if reader.lenenc().is_err() {
        return mask_in_place(data, policy);
    }
    let id_at = data.len() - reader.remaining();
    let Ok(Some(_)) = reader.lenenc() else {
        return mask_in_place(data, policy);
    };
    let id_end = data.len() - reader.remaining();
    let Ok(status) = reader.u16() else {
        return masked + mask_in_place(&mut data[id_end..], policy);
    };
    if reader.u16().is_err() {
        return masked + mask_in_place(&mut data[id_end..], policy);
    }
    let mut at = data.len() - reader.remaining();
    masked += mask_lenenc_integer(&mut data[id_at..id_end], policy);

    if !session_track {
        return masked + mask_in_place(&mut data[at..], policy);
    }
    if at == data.len() {
        return masked;
    }
    let Some((start, end)) = lenenc_string(data, at) else {
        return masked + mask_in_place(&mut data[at..], policy);
    };
    masked += mask_in_place(&mut data[start..end], policy);
    at = end;

    if status & SERVER_SESSION_STATE_CHANGED == 0 || at == data.len() {
        return masked + mask_in_place(&mut data[at..], policy);
    }
    let Some((start, end)) = lenenc_string(data, at) else {
        return masked + mask_in_place(&mut data[at..], policy);
    };
    masked += mask_session_state(&mut data[start..end], policy);
    masked + mask_in_place(&mut data[end..], policy)
}

/// Masks the entries of a session state block: each is a type byte and length-encoded data,
/// itself length-encoded strings (a variable's name and value, a schema name, a flag).
fn mask_session_state(block: &mut [u8], policy: &MaskPolicy) -> usize {
    let mut masked = 0;
    let mut at = 0;
    while at < block.len() {
        let kind = block[at];
        let Some((start, end)) = lenenc_string(block, at + 1) else {
            return masked + mask_in_place(&mut block[at..], policy);
        };
        let entry = &mut block[start..end];
        let mut inner = usize::from(kind == SESSION_TRACK_GTIDS);
        while inner < entry.len() {
            match lenenc_string(entry, inner) {
                Some((from, to)) => {
                    masked += mask_in_place(&mut entry[from..to], policy);
                    inner = to;
                }
                None => {
                    masked += mask_in_place(&mut entry[inner..], policy);
                    break;
                }
            }
        }
        at = end;
    }
    masked
}

/// Applies the rule for binary numbers to a length-encoded integer in place: when its decimal
/// form is a card number, the hidden digits become zero, and the encoding keeps its width.
fn mask_lenenc_integer(encoded: &mut [u8], policy: &MaskPolicy) -> usize {
    let Some((marker, bytes)) = encoded.split_first_mut() else {
        return 0;
    };
    // Values under 2^24 have at most 8 digits; only the 8-byte form can hold a card number.
    if *marker != 0xfe || bytes.len() != 8 {
        return 0;
    }
    let number = u64::from_le_bytes((&*bytes).try_into().expect("8 bytes"));
    let Some((zeroed, masked)) = super::rows::mask_integer(i128::from(number), policy) else {
        return 0;
    };
    bytes.copy_from_slice(&(zeroed as u64).to_le_bytes());
    masked
}

/// Masks the text fields of a column definition: catalog, schema, table, original table, name
/// and original name, and the default value that follows the fixed fields in COM_FIELD_LIST
/// responses. Returns how many PANs it masked.
pub fn mask_column_definition(data: &mut [u8], policy: &MaskPolicy) -> usize {
    let mut masked = 0;
    let mut at = 0;
    for _ in 0..6 {
        let Some((start, end)) = lenenc_string(data, at) else {
            return masked + mask_in_place(&mut data[at..], policy);
        };
        masked += mask_in_place(&mut data[start..end], policy);
        at = end;
    }
    // Length of the fixed fields (0x0c), then those fields.
    let Some(&fixed) = data.get(at) else {
        return masked;
    };
    at += 1 + usize::from(fixed);
    if at >= data.len() {
        return masked;
    }
    match lenenc_string(data, at) {
        Some((start, end)) => masked + mask_in_place(&mut data[start..end], policy),
        None => masked + mask_in_place(&mut data[at..], policy),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAN: &[u8] = b"4111111111111111";
    const MASKED: &[u8] = b"411111******1111";

    fn lenenc(text: &[u8]) -> Vec<u8> {
        let mut out = vec![u8::try_from(text.len()).expect("short text")];
        out.extend_from_slice(text);
        out
    }

    #[test]
    fn err_message_masked_apart_from_sqlstate() {
        let mut data = vec![0xff, 0x6c, 0x06, b'#'];
        data.extend_from_slice(b"45000");
        data.extend_from_slice(PAN);
        assert_eq!(mask_err(&mut data, &MaskPolicy::default()), 1);
        assert_eq!(&data[9..], MASKED);
        assert_eq!(&data[4..9], b"45000");
    }

    #[test]
    fn ok_insert_id_and_session_state_masked() {
        let mut data = vec![0x00, 0x01, 0xfe];
        data.extend_from_slice(&4_111_111_111_111_111_u64.to_le_bytes());
        data.extend_from_slice(&SERVER_SESSION_STATE_CHANGED.to_le_bytes());
        data.extend_from_slice(&[0, 0]);
        data.extend(lenenc(b""));
        // A variable whose value is a card number: its length byte `0x31` is a digit.
        let value = [b"x".repeat(33).as_slice(), PAN].concat();
        let variable = [lenenc(b"last_insert_id"), lenenc(&value)].concat();
        let schema = lenenc(PAN);
        let block = [vec![0], lenenc(&variable), vec![1], lenenc(&schema)].concat();
        data.extend(lenenc(&block));
        let length = data.len();

        assert_eq!(mask_ok(&mut data, true, &MaskPolicy::default()), 3);
        assert_eq!(data.len(), length);
        let id = u64::from_le_bytes(data[3..11].try_into().expect("8 bytes"));
        assert_eq!(id, 4_111_110_000_001_111);
        let text = String::from_utf8_lossy(&data);
        assert!(!text.contains("4111111111111111"), "{text}");
        assert_eq!(text.matches("411111******1111").count(), 2, "{text}");
    }

    #[test]
    fn ok_info_without_session_track_masked() {
        let mut data = vec![0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00];
        data.extend_from_slice(b"Rows matched: ");
        data.extend_from_slice(PAN);
        assert_eq!(mask_ok(&mut data, false, &MaskPolicy::default()), 1);
        assert!(data.ends_with(MASKED));
    }

    #[test]
    fn column_definition_names_and_default_masked() {
        let mut data = Vec::new();
        for field in [&b"def"[..], b"payments", b"t", b"t", PAN, b"c"] {
            data.extend(lenenc(field));
        }
        data.push(0x0c);
        data.extend_from_slice(&[0x21, 0x00, 0x28, 0, 0, 0, 0xfd, 0, 0, 0, 0, 0]);
        data.extend(lenenc(PAN));
        let fixed = data[data.len() - 30..data.len() - 17].to_vec();
        assert_eq!(mask_column_definition(&mut data, &MaskPolicy::default()), 2);
        let text = String::from_utf8_lossy(&data);
        assert!(!text.contains("4111111111111111"), "{text}");
        assert_eq!(&data[data.len() - 30..data.len() - 17], &fixed[..]);
    }

    #[test]
    fn wide_column_name_masked() {
        let wide =
            |text: &str| -> Vec<u8> { text.encode_utf16().flat_map(u16::to_be_bytes).collect() };
        let mut data = Vec::new();
        for field in [wide("def"), wide("payments"), wide("t"), wide("t")] {
            data.extend(lenenc(&field));
        }
        data.extend(lenenc(&wide("4111111111111111")));
        data.extend(lenenc(&wide("c")));
        data.push(0x0c);
        data.extend_from_slice(&[0x36, 0x00, 0x28, 0, 0, 0, 0xfd, 0, 0, 0, 0, 0]);
        assert_eq!(mask_column_definition(&mut data, &MaskPolicy::default()), 1);
        let name = wide("411111******1111");
        assert!(
            data.windows(name.len())
                .any(|window| window == name.as_slice())
        );
    }
}
