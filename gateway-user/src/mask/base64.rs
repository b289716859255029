//! PANs inside base64 strings of JSON documents.
//!
//! The Kubernetes API encodes byte fields in JSON as standard base64 with padding: a Secret's
//! `data`, a ConfigMap's `binaryData`, a webhook's `caBundle`. A card number stored there is
//! no run of digits in the body, so the text scan misses it. This pass reads every run of base64
//! characters that starts right after a `"`, decodes runs long enough to hold a PAN, masks the
//! decoded bytes like text, and writes the 4-character groups whose bytes changed back in
//! base64. Every other character, and the length, stay the same.
//!
//! The pass runs on text that the digit scan has already masked, so a `*` it wrote ends a run.
//! Any JSON string made of base64 characters is decoded, names and values alike. Text that is
//! not base64 decodes to bytes that almost never hold 13 ASCII digits in a row, let alone
//! digits that pass the issuer and Luhn checks, so it is left alone.

use std::fmt;

use super::{MaskPolicy, StreamMasker, mask_in_place};

/// Characters a run needs before it is decoded: 18 characters carry 13 bytes, the shortest PAN.
const MIN_RUN_CHARS: usize = 18;

/// The standard base64 alphabet by value.
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Marks a byte outside the alphabet in [`VALUES`].
const NOT_BASE64: u8 = 0xff;

/// The value of each alphabet character, and [`NOT_BASE64`] for every other byte.
const VALUES: [u8; 256] = {
    let mut values = [NOT_BASE64; 256];
    let mut index = 0;
    while index < ALPHABET.len() {
        values[ALPHABET[index] as usize] = index as u8;
        index += 1;
    }
    values
};

fn is_base64(byte: u8) -> bool {
    VALUES[usize::from(byte)] != NOT_BASE64
}

/// Decodes a group of 2 to 4 base64 characters into 1 to 3 bytes. Bits left over in the last
/// character of a short group are dropped.
fn decode_group(chars: &[u8], out: &mut Vec<u8>) {
    let mut bits: u32 = 0;
    for (index, &char) in chars.iter().enumerate() {
        bits |= u32::from(VALUES[usize::from(char)]) << (18 - 6 * index);
    }
    let bytes = bits.to_be_bytes();
    out.extend_from_slice(&bytes[1..chars.len()]);
}

/// Encodes 1 to 3 bytes as 2 to 4 base64 characters, without padding.
fn encode_group(bytes: &[u8], out: &mut Vec<u8>) {
    let mut bits: u32 = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        bits |= u32::from(byte) << (16 - 8 * index);
    }
    for index in 0..=bytes.len() {
        out.push(ALPHABET[((bits >> (18 - 6 * index)) & 0x3f) as usize]);
    }
}

/// Writes one group: its characters as they came when masking left its bytes unchanged, else
/// the masked bytes in base64.
fn write_group(chars: &[u8], original: &[u8], masked: &[u8], out: &mut Vec<u8>) {
    if original == masked {
        out.extend_from_slice(chars);
    } else {
        encode_group(masked, out);
    }
}

/// Masks the PANs in base64 strings of `buf` in place: every run of base64 characters that
/// starts right after a `"` and has at least [`MIN_RUN_CHARS`] characters is decoded, masked,
/// and written back. Returns how many PANs it masked.
pub fn mask_base64_strings(buf: &mut [u8], policy: &MaskPolicy) -> usize {
    let mut masked = 0;
    let mut from = 0;
    let mut decoded = Vec::new();
    let mut encoded = Vec::new();
    while let Some(quote) = memchr::memchr(b'"', &buf[from..]) {
        let start = from + quote + 1;
        let length = buf[start..]
            .iter()
            .take_while(|&&byte| is_base64(byte))
            .count();
        let end = start + length;
        from = end;
        if length < MIN_RUN_CHARS {
            continue;
        }
        let run = &mut buf[start..end];
        // A single character left after the last whole group carries no byte.
        let usable = if length % 4 == 1 { length - 1 } else { length };
        decoded.clear();
        for group in run[..usable].chunks(4) {
            decode_group(group, &mut decoded);
        }
        let original = decoded.clone();
        let found = mask_in_place(&mut decoded, policy);
        if found == 0 {
            continue;
        }
        masked += found;
        encoded.clear();
        for ((chars, before), after) in run[..usable]
            .chunks(4)
            .zip(original.chunks(3))
            .zip(decoded.chunks(3))
        {
            write_group(chars, before, after, &mut encoded);
        }
        run[..usable].copy_from_slice(&encoded);
    }
    masked
}

/// [`mask_base64_strings`] for text that arrives in pieces. The bytes written over all calls
/// equal what that function makes of the whole text, wherever it was split. It holds back the
/// first characters of a run until the run is long enough to decode, and in a decoded run the
/// groups whose bytes the decoded masker still holds.
pub(super) struct Base64Strings {
    /// Masks the decoded bytes of the current run.
    masker: StreamMasker,
    /// Whether the last byte seen was a `"`, so a run starts at the next byte.
    after_quote: bool,
    /// Whether a run is being read.
    in_run: bool,
    /// The current run, kept between runs for its buffers.
    run: Run,
    /// Scratch space for the text stage's output, kept between calls.
    pub(super) text: Vec<u8>,
}

/// A run of base64 characters being read.
#[derive(Default)]
struct Run {
    /// Whether the run reached [`MIN_RUN_CHARS`] and is being decoded. Until then, `chars`
    /// contains the run's characters.
    decoding: bool,
    /// Characters of the groups not yet written out.
    chars: Vec<u8>,
    /// Characters of the group still being read, at most 3.
    partial: Vec<u8>,
    /// Decoded bytes of the groups in `chars`, as they came.
    original: Vec<u8>,
    /// Bytes the masker settled, in order, not yet written out.
    settled: Vec<u8>,
    /// Decoded bytes of the current call, before masking.
    decoded: Vec<u8>,
}

impl Base64Strings {
    pub(super) fn new(policy: MaskPolicy) -> Self {
        Self {
            masker: StreamMasker::new(policy),
            after_quote: false,
            in_run: false,
            run: Run::default(),
            text: Vec::new(),
        }
    }

    /// Masks `input`, text whose digits are already masked, and appends the settled bytes to
    /// `out`. Returns how many PANs it masked.
    pub(super) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let mut masked = 0;
        let mut at = 0;
        while at < input.len() {
            if !self.in_run {
                if self.after_quote && is_base64(input[at]) {
                    self.in_run = true;
                } else {
                    let rest = &input[at..];
                    let next = match memchr::memchr(b'"', rest) {
                        Some(quote) if quote + 1 < rest.len() => {
                            if is_base64(rest[quote + 1]) {
                                quote + 1
                            } else {
                                quote + 2
                            }
                        }
                        Some(quote) => quote + 1,
                        None => rest.len(),
                    };
                    out.extend_from_slice(&rest[..next]);
                    self.after_quote = rest[next - 1] == b'"';
                    at += next;
                    continue;
                }
            }
            let length = input[at..]
                .iter()
                .take_while(|&&byte| is_base64(byte))
                .count();
            masked += self.push_run(&input[at..at + length], out);
            at += length;
            if at < input.len() {
                masked += self.end_run(out);
                self.after_quote = false;
            }
        }
        masked
    }

    /// Ends the text: writes out every byte held back.
    pub(super) fn finish(&mut self, out: &mut Vec<u8>) -> usize {
        let masked = self.end_run(out);
        self.after_quote = false;
        masked
    }

    /// Takes characters of the current run.
    fn push_run(&mut self, chars: &[u8], out: &mut Vec<u8>) -> usize {
        let run = &mut self.run;
        if !run.decoding {
            run.chars.extend_from_slice(chars);
            if run.chars.len() < MIN_RUN_CHARS {
                return 0;
            }
            run.decoding = true;
            let first = std::mem::take(&mut run.chars);
            return decode_more(run, &mut self.masker, &first, out);
        }
        decode_more(run, &mut self.masker, chars, out)
    }

    /// Ends the current run: decodes its last short group, flushes the masker and writes out
    /// every character held back.
    fn end_run(&mut self, out: &mut Vec<u8>) -> usize {
        if !self.in_run {
            return 0;
        }
        self.in_run = false;
        let run = &mut self.run;
        if !run.decoding {
            out.extend_from_slice(&run.chars);
            run.chars.clear();
            return 0;
        }
        run.decoding = false;
        let mut masked = 0;
        // A single leftover character carries no byte and goes out as it came.
        let dangling = (run.partial.len() == 1).then(|| run.partial[0]);
        if run.partial.len() >= 2 {
            run.decoded.clear();
            decode_group(&run.partial, &mut run.decoded);
            run.chars.append(&mut run.partial);
            run.original.extend_from_slice(&run.decoded);
            masked += self.masker.feed(&run.decoded, &mut run.settled);
        }
        masked += self.masker.finish(&mut run.settled);
        write_settled(run, true, out);
        run.partial.clear();
        out.extend(dangling);
        masked
    }
}

/// Decodes `chars`, the next characters of a decoded run, feeds the bytes to the masker, and
/// writes out the groups it settled.
fn decode_more(run: &mut Run, masker: &mut StreamMasker, chars: &[u8], out: &mut Vec<u8>) -> usize {
    run.decoded.clear();
    let mut rest = chars;
    if !run.partial.is_empty() {
        let needed = (4 - run.partial.len()).min(rest.len());
        run.partial.extend_from_slice(&rest[..needed]);
        rest = &rest[needed..];
        if run.partial.len() < 4 {
            return 0;
        }
        decode_group(&run.partial, &mut run.decoded);
        run.chars.append(&mut run.partial);
    }
    let whole = rest.len() / 4 * 4;
    for group in rest[..whole].chunks_exact(4) {
        decode_group(group, &mut run.decoded);
    }
    run.chars.extend_from_slice(&rest[..whole]);
    run.partial.extend_from_slice(&rest[whole..]);
    run.original.extend_from_slice(&run.decoded);
    let masked = masker.feed(&run.decoded, &mut run.settled);
    write_settled(run, false, out);
    masked
}

/// Writes out each group whose bytes are all settled. At the end of a run, the last group may be
/// short: `n` bytes in `n + 1` characters.
fn write_settled(run: &mut Run, at_end: bool, out: &mut Vec<u8>) {
    let mut groups = run.settled.len() / 3;
    if at_end && !run.settled.len().is_multiple_of(3) {
        groups += 1;
    }
    let mut byte = 0;
    let mut char = 0;
    for _ in 0..groups {
        let bytes = (run.settled.len() - byte).min(3);
        let chars = bytes + 1;
        write_group(
            &run.chars[char..char + chars],
            &run.original[byte..byte + bytes],
            &run.settled[byte..byte + bytes],
            out,
        );
        byte += bytes;
        char += chars;
    }
    run.chars.drain(..char);
    run.original.drain(..byte);
    run.settled.drain(..byte);
}

impl fmt::Debug for Base64Strings {
    /// Shows whether a run is open, never the bytes held back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Base64Strings")
            .field("in_run", &self.in_run)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use ::base64::{Engine as _, engine::general_purpose::STANDARD};

    use super::*;

    /// Runs the digit scan and then this pass on a whole input.
    fn whole(input: &str) -> (String, usize) {
        let policy = MaskPolicy::default();
        let mut bytes = input.as_bytes().to_vec();
        let mut masked = mask_in_place(&mut bytes, &policy);
        masked += mask_base64_strings(&mut bytes, &policy);
        (String::from_utf8(bytes).expect("ASCII stays ASCII"), masked)
    }

    /// Runs the same through a [`StreamMasker`], fed `piece` bytes at a time.
    fn streamed(input: &str, piece: usize) -> (String, usize) {
        let mut masker = StreamMasker::new(MaskPolicy::default()).with_base64();
        let mut out = Vec::new();
        let mut masked = 0;
        for chunk in input.as_bytes().chunks(piece) {
            masked += masker.feed(chunk, &mut out);
        }
        masked += masker.finish(&mut out);
        (String::from_utf8(out).expect("ASCII stays ASCII"), masked)
    }

    fn assert_streamed_like_whole(input: &str) {
        let expected = whole(input);
        for piece in 1..=input.len() {
            assert_eq!(
                streamed(input, piece),
                expected,
                "{input:?} in pieces of {piece}"
            );
        }
    }

    fn decoded(text: &str) -> String {
        String::from_utf8(STANDARD.decode(text).expect("valid base64")).expect("UTF-8")
    }

    #[test]
    fn secret_value_masked_in_base64() {
        let value = STANDARD.encode("4111 1111 1111 1111");
        let input = format!(r#"{{"kind":"Secret","data":{{"card":"{value}","user":"YWRtaW4="}}}}"#);
        let (output, masked) = whole(&input);
        assert_eq!(masked, 1);
        assert_eq!(output.len(), input.len());
        let object: serde_json::Value = serde_json::from_str(&output).expect("still JSON");
        let card = object["data"]["card"].as_str().expect("card is a string");
        assert_eq!(decoded(card), "4111 11** **** 1111");
        assert_eq!(object["data"]["user"], "YWRtaW4=");
    }

    #[test]
    fn every_padding_length_masked() {
        // 16, 17 and 18 bytes: padded with `==`, `=` and not at all.
        for text in [
            "4111111111111111",
            "x4111111111111111",
            "xy4111111111111111",
        ] {
            let value = STANDARD.encode(text);
            let (output, masked) = whole(&format!(r#""{value}""#));
            assert_eq!(masked, 1, "{text}");
            let masked_text = decoded(output.trim_matches('"'));
            assert_eq!(
                masked_text,
                text.replace("4111111111111111", "411111******1111")
            );
        }
    }

    #[test]
    fn unpadded_run_masked() {
        let value = STANDARD.encode("5555555555554444x");
        let unpadded = value.trim_end_matches('=');
        let (output, masked) = whole(&format!(r#""{unpadded}""#));
        assert_eq!(masked, 1);
        let restored = format!("{}=", output.trim_matches('"'));
        assert_eq!(decoded(&restored), "555555******4444x");
    }

    #[test]
    fn only_changed_groups_rewritten() {
        let value = STANDARD.encode("header text 4111111111111111 trailer text");
        let (output, _) = whole(&format!(r#""{value}""#));
        let output = output.trim_matches('"');
        let changed: Vec<usize> = value
            .bytes()
            .zip(output.bytes())
            .enumerate()
            .filter(|(_, (before, after))| before != after)
            .map(|(index, _)| index)
            .collect();
        // The hidden digits are bytes 18 to 23, in the groups of bytes 18-20 and 21-23.
        assert!(!changed.is_empty());
        assert!(
            changed.iter().all(|&index| (24..32).contains(&index)),
            "{changed:?}"
        );
    }

    #[test]
    fn text_and_short_runs_left_alone() {
        for input in [
            r#"{"metadata":{"name":"payments-config","uid":"6f1c2d9e-1b2a-4c3d-9e8f-0a1b2c3d4e5f"}}"#,
            // Too short to hold 13 bytes.
            r#""NDExMTExMTExMTEx""#,
            // Not after a quote.
            &format!("data: {}", STANDARD.encode("4111111111111111")),
            // Base64 of bytes without a card number.
            &format!(r#""{}""#, STANDARD.encode("order 1748503543012 paid")),
        ] {
            assert_eq!(whole(input), (input.to_string(), 0), "{input}");
        }
    }

    #[test]
    fn digits_in_string_masked_as_text() {
        // The digits form valid base64 too, but the digit scan masks them first, and the `*`
        // ends the run, so the string is not decoded.
        let (output, masked) = whole(r#"{"card":"4111111111111111"}"#);
        assert_eq!(output, r#"{"card":"411111******1111"}"#);
        assert_eq!(masked, 1);
    }

    #[test]
    fn streamed_equals_whole() {
        let card = STANDARD.encode("card 4111-1111-1111-1111 end");
        let long = STANDARD.encode("x".repeat(40) + "5555555555554444" + &"y".repeat(40));
        for input in [
            format!(r#"{{"a":"{card}","b":"{long}"}}"#),
            format!(r#""{card}""{long}"x"{card}"#),
            format!(r#"{{"n":"4111111111111111","m":"{card}"}}"#),
            format!("\"{}", card.trim_end_matches('=')),
            format!("\"{}A\"", card.trim_end_matches('=')),
        ] {
            assert_streamed_like_whole(&input);
        }
    }

    #[test]
    fn streamed_equals_whole_on_generated_input() {
        // Quotes, base64 of card numbers, clear card numbers, padding and other bytes, in an
        // order from a fixed xorshift sequence.
        let card = STANDARD.encode("4111111111111111");
        let shifted = STANDARD.encode("-5555555555554444");
        let parts = [
            "\"",
            "=",
            ",",
            "A",
            "4",
            "/",
            card.as_str(),
            card.trim_end_matches('='),
            shifted.as_str(),
            "4111111111111111",
            "NDEx",
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..300 {
            let mut input = String::new();
            for _ in 0..1 + next() % 10 {
                input.push_str(parts[(next() % parts.len() as u64) as usize]);
            }
            let expected = whole(&input);
            let piece = 1 + (next() % input.len() as u64) as usize;
            assert_eq!(
                streamed(&input, piece),
                expected,
                "{input:?} in pieces of {piece}"
            );
        }
    }
}
