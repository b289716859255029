//! Finding card numbers (PANs) in bytes and masking them in place.
//!
//! This module owns the PAN rule, the [`MaskPolicy`] that decides which digits stay readable,
//! and the [`StreamMasker`] that finds a number split across reads, chunks or rows. It leaves to
//! its callers which bytes pass through it and the masking of whole fields or columns by name.
//!
//! # What counts as a PAN
//!
//! The scanner reads the input as *runs*: maximal sequences of digits in which a single space or
//! dash between two digits joins them. Any other byte, two separators in a row, or a separator
//! with a non-digit on one side ends a run. A *candidate* is a part of a run that starts and ends
//! at a group of digits, uses one separator kind, and has 13 to 19 digits. A candidate is a PAN
//! when all of these hold:
//!
//! - its run has at most 19 digits, or it starts or ends its longer run. So a PAN followed by
//!   an expiry date and a CVV (`4111111111111111 0926 123`) or after an order number is
//!   masked. One in the middle of a longer grouped number (an IBAN, a list of numbers) is
//!   indistinguishable from a part of it and is not;
//! - it is not the fraction of a decimal number (a run that starts after a digit and a dot,
//!   `3.4111111111111111`) or its integer part (a run followed by a dot and a digit);
//! - its leading digits fall in an issuer range of Visa, Mastercard, American Express, Discover,
//!   JCB, UnionPay, Diners Club or Maestro, at any length from 13 to 19 digits;
//! - it passes the Luhn check.
//!
//! Masking replaces digits with the policy's mask character and never touches separators or
//! any other byte, so the output has the input's length. That keeps JSON, protobuf, text result
//! columns and chunked bodies valid without re-framing. When two PANs overlap inside one run,
//! each masks its own digits.
//!
//! NOTE: letters are ordinary bytes here, so 13 to 19 digits that pass the checks are masked even
//! inside a hex string or an identifier such as `id4111111111111111x`.
//!
//! # Hex-encoded bytes
//!
//! [`mask_in_place_with_hex`] and [`StreamMasker::with_hex`] also decode the hex runs that
//! follow `\x`, `0x` or `x'` (PostgreSQL prints `bytea` so), mask the PANs in the decoded
//! bytes, and write the masked bytes back in hex, keeping the length. The runs' hex digits are
//! not read as decimal digits, so masking never turns valid hex into invalid hex.
//!
//! # Base64 strings
//!
//! [`mask_base64_strings`] and [`StreamMasker::with_base64`] decode the base64 strings of JSON
//! text, where the Kubernetes API puts byte fields, and mask them the same way (see the
//! `base64` submodule).

use std::fmt;

use crate::operations::metrics::metrics;

mod base64;
pub mod wide;

pub use base64::mask_base64_strings;

/// Minimum digits in a PAN: the shortest numbers these schemes issue (older Visa cards) have 13.
const MIN_PAN_DIGITS: usize = 13;

/// Maximum digits in a PAN: ISO/IEC 7812-1 limits a primary account number to 19 digits.
const MAX_PAN_DIGITS: usize = 19;

/// Maximum bytes a [`StreamMasker`] holds back between calls. A run that may still contain a PAN
/// has at most 19 digits and the 18 single separators between them, and the space, dash or dot
/// after its last digit is held too, because only the byte after it decides whether the run goes
/// on or is the integer part of a decimal number. A longer run is held back whole while a PAN
/// that starts it could share digits with one that ends it: up to 38 digits, their separators
/// and the byte after them.
pub const MAX_CARRY: usize = 4 * MAX_PAN_DIGITS;

/// Bytes tested at once while skipping text without digits. 32 bytes fill two SSE2 registers, so
/// on the baseline x86-64 target each step compiles to two vector compares and one branch.
const DIGIT_SEARCH_BLOCK: usize = 32;

/// Digits of a PAN that stay readable after masking.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Keep {
    /// The first six digits and the last four. PCI DSS v4.0 requirement 3.4.1 allows at most the
    /// BIN and the last four digits to be displayed, and six digits never exceed the BIN, whether
    /// it has six or eight digits.
    #[default]
    FirstSixLastFour,
    /// The last four digits only.
    LastFour,
    /// None of the digits, so the whole number is masked.
    Nothing,
}

impl Keep {
    /// Returns how many leading and trailing digits stay readable.
    fn visible_digits(self) -> (usize, usize) {
        match self {
            Keep::FirstSixLastFour => (6, 4),
            Keep::LastFour => (0, 4),
            Keep::Nothing => (0, 0),
        }
    }
}

/// Masking rule for PAN digits: which stay readable and which byte replaces the others.
///
/// Choose as `mask_char` a printable ASCII character that is not a digit, a separator or a
/// quote, because a digit would read as part of a number and a byte of 0x80 or above would break
/// UTF-8 text such as JSON. The masking itself accepts any byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskPolicy {
    /// Digits that stay readable.
    pub keep: Keep,
    /// Byte written in place of each hidden digit.
    pub mask_char: u8,
}

impl Default for MaskPolicy {
    fn default() -> Self {
        Self {
            keep: Keep::default(),
            mask_char: b'*',
        }
    }
}

/// Masks every PAN in `buf`, a complete value, in place and returns how many PANs it masked.
///
/// The start and end of `buf` count as boundaries, so a digit run touching either end is taken
/// as whole. Use [`StreamMasker`] for data that arrives in pieces.
///
/// The count also goes into `gateway_masked_values_total`.
pub fn mask_in_place(buf: &mut [u8], policy: &MaskPolicy) -> usize {
    let masked = scan(buf, Context::Clear, true, policy).masked;
    metrics().values_masked(masked);
    masked
}

/// Returns `text` with its PANs masked, as [`mask_in_place`] masks them.
pub fn masked_text(text: String, policy: &MaskPolicy) -> String {
    let mut bytes = text.into_bytes();
    mask_in_place(&mut bytes, policy);
    crate::protocol::utf8_text(bytes)
}

/// Masks every PAN in `buf` like [`mask_in_place`], and also those inside hex-encoded bytes:
/// the pairs of hex digits after `\x` (PostgreSQL's `bytea` values and literals), `0x` or `x'`
/// (MySQL's hex literals). Such a run is decoded and masked like text, and the bytes that
/// changed are written back as lowercase hex, so the length and every other byte stay the same.
/// The run's own digits are hex, not decimal, so the text scan leaves them alone: it reads
/// the text between runs, each piece as a whole value. Returns how many PANs it masked.
pub fn mask_in_place_with_hex(buf: &mut [u8], policy: &MaskPolicy) -> usize {
    let mut masked = 0;
    let mut from = 0;
    while let Some(found) = find_hex_prefix(&buf[from..]) {
        // The text up to the run, prefix included.
        let start = from + found + 2;
        masked += mask_in_place(&mut buf[from..start], policy);
        let pairs = buf[start..]
            .chunks_exact(2)
            .take_while(|pair| pair.iter().all(u8::is_ascii_hexdigit))
            .count();
        let end = start + 2 * pairs;
        masked += mask_hex_run(&mut buf[start..end], policy);
        from = end;
    }
    masked + mask_in_place(&mut buf[from..], policy)
}

/// Masks a value that is a whole number written in exponent notation (`4.111111111111111e15`,
/// `4.111111111111111e+15`), as MySQL and PostgreSQL print large `DOUBLE` and `float8` values,
/// when the number it stands for is a PAN. The mantissa's digits are masked as the number's
/// digits would be, in place. Returns how many PANs it masked: 0 or 1.
pub fn mask_exponent_number(value: &mut [u8], policy: &MaskPolicy) -> usize {
    let Some(e) = value.iter().position(|&byte| byte | 0x20 == b'e') else {
        return 0;
    };

    let (mantissa, exponent) = value.split_at(e);
    let exponent = &exponent[1..];
    let exponent_digits = exponent.strip_prefix(b"+").unwrap_or(exponent);
    if exponent_digits.is_empty()
        || exponent_digits.len() > 2
        || !exponent_digits.iter().all(u8::is_ascii_digit)
    {
        return 0;
    }
    let exponent: usize = exponent_digits
        .iter()
        .fold(0, |value, &digit| value * 10 + usize::from(digit - b'0'));
    let unsigned = mantissa.strip_prefix(b"-").unwrap_or(mantissa);
    let (whole, fraction) = match unsigned.iter().position(|&byte| byte == b'.') {
        Some(dot) => (&unsigned[..dot], &unsigned[dot + 1..]),
        None => (unsigned, &[][..]),
    };
    let all_digits = |part: &[u8]| part.iter().all(u8::is_ascii_digit);
    if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) || whole[0] == b'0' {
        return 0;
    }
    // A whole number needs every fraction digit inside the exponent's shift.
    let Some(zeros) = exponent.checked_sub(fraction.len()) else {
        return 0;
    };
    let length = whole.len() + exponent;
    if !(MIN_PAN_DIGITS..=MAX_PAN_DIGITS).contains(&length) {
        return 0;
    }

    let mut digits: Vec<u8> = whole.iter().chain(fraction).copied().collect();
    digits.extend(std::iter::repeat_n(b'0', zeros));
    let original = digits.clone();
    let masked = mask_in_place(&mut digits, policy);
    if masked == 0 {
        return 0;
    }
    // Write the mantissa's digits back, skipping the sign and the point.
    let positions: Vec<usize> = (0..e)
        .filter(|&index| value[index].is_ascii_digit())
        .collect();
    for (index, (before, after)) in positions.into_iter().zip(original.iter().zip(&digits)) {
        if before != after {
            value[index] = *after;
        }
    }
    masked
}

/// Masks every number in exponent notation inside `text`, as [`mask_exponent_number`] does for
/// a whole value: the elements of an array (`{4.111111111111111e+15}`) or of a JSON document
/// (`[4.111111111111111e15]`). Returns how many PANs it masked.
pub fn mask_exponent_numbers(text: &mut [u8], policy: &MaskPolicy) -> usize {
    let in_number =
        |byte: u8| byte.is_ascii_digit() || matches!(byte, b'.' | b'e' | b'E' | b'+' | b'-');
    let mut masked = 0;
    let mut at = 0;
    while let Some(offset) = text[at..].iter().position(|&byte| byte | 0x20 == b'e') {
        let e = at + offset;
        // Only an `e` right after a digit can be an exponent's.
        if e == 0 || !text[e - 1].is_ascii_digit() {
            at = e + 1;
            continue;
        }
        let start = text[..e]
            .iter()
            .rposition(|&byte| !in_number(byte))
            .map_or(0, |before| before + 1);
        let end = text[e + 1..]
            .iter()
            .position(|&byte| !in_number(byte))
            .map_or(text.len(), |after| e + 1 + after);
        masked += mask_exponent_number(&mut text[start..end], policy);
        at = end.max(e + 1);
    }
    masked
}

/// Masks every number whose digits are grouped in thousands when its whole digits are a PAN:
/// `4,111,111,111,111,111` as MySQL's `FORMAT()` prints it, `$4,111,111,111,111,111.00` as
/// PostgreSQL prints `money`, and the same with `.` or `'` between the groups. Every group after
/// the first has exactly 3 digits, all behind the same separator, and a fraction after the last
/// one is allowed. The other digit rules do not see such numbers, because a comma ends a digit
/// run there. Returns how many PANs it masked.
pub fn mask_grouped_numbers(text: &mut [u8], policy: &MaskPolicy) -> usize {
    let is_separator = |byte: u8| matches!(byte, b',' | b'.' | b'\'');
    let mut masked = 0;
    let mut at = 0;
    while let Some(offset) = text[at..].iter().position(u8::is_ascii_digit) {
        let start = at + offset;
        let lead = text[start..]
            .iter()
            .take_while(|byte| byte.is_ascii_digit())
            .count();
        at = start + lead;
        // The first group has 1 to 3 digits and starts the number: a separator with a digit
        // before it would make this group a later one of a number already read.
        let continues =
            start >= 2 && is_separator(text[start - 1]) && text[start - 2].is_ascii_digit();
        let Some(&separator) = text.get(at) else {
            break;
        };
        if lead > 3 || continues || !is_separator(separator) {
            continue;
        }
        let mut end = at;
        let mut groups = 0;
        while text.get(end) == Some(&separator)
            && text
                .get(end + 1..end + 4)
                .is_some_and(|group| group.iter().all(u8::is_ascii_digit))
            && !text.get(end + 4).is_some_and(u8::is_ascii_digit)
        {
            end += 4;
            groups += 1;
        }
        at = at.max(end);
        // A shorter group after the same separator is not a grouping in thousands (`1,234,56`).
        let broken =
            text.get(end) == Some(&separator) && text.get(end + 1).is_some_and(u8::is_ascii_digit);
        let length = lead + 3 * groups;
        if broken || !(MIN_PAN_DIGITS..=MAX_PAN_DIGITS).contains(&length) {
            continue;
        }
        let offsets: Vec<usize> = (start..end)
            .filter(|&index| text[index].is_ascii_digit())
            .collect();
        let digits: Vec<u8> = offsets.iter().map(|&index| text[index] - b'0').collect();
        if passes_luhn(&digits) && issuer(&digits).is_some() {
            mask_digits(text, &offsets, policy);
            masked += 1;
        }
    }
    metrics().values_masked(masked);
    masked
}

/// Masks the numbers of a database value that the text scan cannot read as one digit run:
/// exponent notation ([`mask_exponent_numbers`]) and thousands grouping
/// ([`mask_grouped_numbers`]). Returns how many PANs it masked.
pub fn mask_formatted_numbers(text: &mut [u8], policy: &MaskPolicy) -> usize {
    mask_exponent_numbers(text, policy) + mask_grouped_numbers(text, policy)
}

/// Masks the PANs in one run of hex digit pairs, decoded.
fn mask_hex_run(run: &mut [u8], policy: &MaskPolicy) -> usize {
    if run.len() < 2 * MIN_PAN_DIGITS {
        return 0;
    }
    let original: Vec<u8> = run.chunks_exact(2).map(hex_byte).collect();
    let mut decoded = original.clone();
    let mut masked = mask_in_place(&mut decoded, policy);
    // Bytes a client or an application encoded from UTF-16 or UTF-32 text.
    if has_wide_digits(&decoded) {
        masked += wide::mask_wide_text(&mut decoded, policy);
    }
    if masked > 0 {
        for (index, (&before, &after)) in original.iter().zip(&decoded).enumerate() {
            if before != after {
                run[2 * index] = HEX_DIGITS[usize::from(after >> 4)];
                run[2 * index + 1] = HEX_DIGITS[usize::from(after & 0x0f)];
            }
        }
    }
    masked
}

/// Tells whether `bytes` has two ASCII digits in a row as UTF-16 (either byte order) or
/// UTF-32 code units: a cheap test that random binary data rarely passes.
fn has_wide_digits(bytes: &[u8]) -> bool {
    let digit = |byte: u8| byte.is_ascii_digit();
    bytes.windows(4).any(|w| {
        (w[0] == 0 && digit(w[1]) && w[2] == 0 && digit(w[3]))
            || (digit(w[0]) && w[1] == 0 && digit(w[2]) && w[3] == 0)
    }) || bytes
        .windows(8)
        .any(|w| w[..3] == [0, 0, 0] && digit(w[3]) && w[4..7] == [0, 0, 0] && digit(w[7]))
}

/// Lowercase hex digits by value.
const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Finds the next `\x`, `0x` or `x'` in `buf`, in either case. Blocks without an `x` are
/// skipped whole, as the scanner skips blocks without a digit.
fn find_hex_prefix(buf: &[u8]) -> Option<usize> {
    let is_x = |byte: u8| byte | 0x20 == b'x';
    let mut block_start = 0;
    while block_start < buf.len() {
        let block_end = (block_start + DIGIT_SEARCH_BLOCK).min(buf.len());
        // Tested without an early exit so that the compiler vectorizes the test.
        let has_x = buf[block_start..block_end]
            .iter()
            .fold(false, |found, &byte| found | is_x(byte));
        if has_x {
            for at in block_start..block_end {
                if !is_x(buf[at]) {
                    continue;
                }
                if at > 0 && matches!(buf[at - 1], b'\\' | b'0') {
                    return Some(at - 1);
                }
                if buf.get(at + 1) == Some(&b'\'') {
                    return Some(at);
                }
            }
        }
        block_start = block_end;
    }
    None
}

/// Decodes two hex digits, already checked to be hex digits, into their byte.
fn hex_byte(pair: &[u8]) -> u8 {
    let value = |digit: u8| match digit {
        b'0'..=b'9' => digit - b'0',
        _ => (digit | 0x20) - b'a' + 10,
    };
    (value(pair[0]) << 4) | value(pair[1])
}

/// Writes `byte` as two lowercase hex digits.
fn push_hex(byte: u8, out: &mut Vec<u8>) {
    out.push(HEX_DIGITS[usize::from(byte >> 4)]);
    out.push(HEX_DIGITS[usize::from(byte & 0x0f)]);
}

/// Tells whether `first` and `second` are a prefix that starts a hex run: `\x`, `0x` or `x'`.
fn is_hex_prefix(first: u8, second: u8) -> bool {
    matches!((first, second | 0x20), (b'\\' | b'0', b'x'))
        || (first | 0x20 == b'x' && second == b'\'')
}

/// [`mask_in_place_with_hex`] for data that arrives in pieces: it masks the hex runs itself
/// and passes the text between them to a [`StreamMasker`]. The bytes written over all calls
/// equal what that function makes of the whole input, wherever the input was split. Inside a
/// hex run, the digits of up to [`MAX_CARRY`] decoded bytes are held back.
struct HexStreamMasker {
    policy: MaskPolicy,
    /// The byte before the next input, for a prefix split between two inputs; 0 when none
    /// can start there.
    last: u8,
    run: Option<HexRun>,
}

/// A hex run being decoded.
struct HexRun {
    /// Masks the decoded bytes.
    masker: StreamMasker,
    /// The hex digits of the decoded bytes the masker holds back, so bytes it leaves unchanged
    /// go out as they came, in their case.
    unsettled_pairs: std::collections::VecDeque<[u8; 2]>,
    /// A hex digit waiting for its pair.
    half: Option<u8>,
    decoded: Vec<u8>,
    masked_out: Vec<u8>,
}

impl HexRun {
    fn new(policy: MaskPolicy) -> Self {
        Self {
            masker: StreamMasker::new(policy),
            unsettled_pairs: std::collections::VecDeque::new(),
            half: None,
            decoded: Vec::new(),
            masked_out: Vec::new(),
        }
    }

    /// Decodes `digits` (hex digits only) and writes out what the masker settles.
    fn push(&mut self, digits: &[u8], out: &mut Vec<u8>) -> usize {
        self.decoded.clear();
        for &digit in digits {
            match self.half.take() {
                None => self.half = Some(digit),
                Some(first) => {
                    let pair = [first, digit];
                    self.decoded.push(hex_byte(&pair));
                    self.unsettled_pairs.push_back(pair);
                }
            }
        }
        self.masked_out.clear();
        let masked = self.masker.feed(&self.decoded, &mut self.masked_out);
        self.write_settled(out);
        masked
    }

    /// Ends the run: writes out every byte held back. Returns the PAN count and the unpaired digit,
    /// which belongs to the text after the run.
    fn finish(&mut self, out: &mut Vec<u8>) -> (usize, Option<u8>) {
        self.masked_out.clear();
        let masked = self.masker.finish(&mut self.masked_out);
        self.write_settled(out);
        (masked, self.half.take())
    }

    fn write_settled(&mut self, out: &mut Vec<u8>) {
        for &byte in &self.masked_out {
            let pair = self
                .unsettled_pairs
                .pop_front()
                .expect("an unsettled pair per settled byte");
            if hex_byte(&pair) == byte {
                out.extend_from_slice(&pair);
            } else {
                push_hex(byte, out);
            }
        }
    }
}

impl HexStreamMasker {
    fn new(policy: MaskPolicy) -> Self {
        Self {
            policy,
            last: 0,
            run: None,
        }
    }

    /// Masks `input`: hex runs here, the text between them through `text`, which is finished
    /// at each run's start so that it reads each piece of text as a whole value.
    fn feed(&mut self, input: &[u8], text: &mut StreamMasker, out: &mut Vec<u8>) -> usize {
        let mut masked = 0;
        let mut at = 0;
        while at < input.len() {
            if let Some(run) = &mut self.run {
                let digits = input[at..]
                    .iter()
                    .take_while(|byte| byte.is_ascii_hexdigit())
                    .count();
                masked += run.push(&input[at..at + digits], out);
                at += digits;
                if at < input.len() {
                    masked += self.end_run(text, out);
                }
                continue;
            }
            let mut previous = self.last;
            let found = input[at..].iter().position(|&byte| {
                let prefix = is_hex_prefix(previous, byte);
                previous = byte;
                prefix
            });
            match found {
                Some(offset) => {
                    let end = at + offset + 1;
                    masked += text.flush_into(&input[at..end], false, out);
                    masked += text.finish_text(out);
                    self.run = Some(HexRun::new(self.policy.clone()));
                    at = end;
                }
                None => {
                    masked += text.flush_into(&input[at..], false, out);
                    self.last = previous;
                    at = input.len();
                }
            }
        }
        masked
    }

    /// Ends the current run. As in [`mask_in_place_with_hex`], an unpaired digit starts the
    /// text after the run, and the next prefix is looked for from there.
    fn end_run(&mut self, text: &mut StreamMasker, out: &mut Vec<u8>) -> usize {
        let Some(mut run) = self.run.take() else {
            return 0;
        };
        let (mut masked, half) = run.finish(out);
        self.last = half.unwrap_or(0);
        if let Some(digit) = half {
            masked += text.flush_into(&[digit], false, out);
        }
        masked
    }

    fn finish(&mut self, text: &mut StreamMasker, out: &mut Vec<u8>) -> usize {
        let masked = self.end_run(text, out);
        self.last = 0;
        masked
    }
}

impl fmt::Debug for HexStreamMasker {
    /// Shows whether a run is open, never the bytes held back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HexStreamMasker")
            .field("in_run", &self.run.is_some())
            .finish_non_exhaustive()
    }
}

/// Masks PANs in data that arrives in pieces: TCP reads, HTTP chunks, result rows.
///
/// Each [`feed`](Self::feed) appends to the output every byte that can no longer belong to an
/// unfinished PAN and holds back the rest, at most [`MAX_CARRY`] bytes. [`finish`](Self::finish)
/// flushes what is held back. The bytes written over all calls equal what [`mask_in_place`] makes
/// of the whole input, wherever the input was split.
pub struct StreamMasker {
    policy: MaskPolicy,
    /// Scan state at the first byte of `carry`.
    context: Context,
    /// Bytes of a run that may still turn out to hold a PAN, not yet masked.
    carry: Vec<u8>,
    /// The hex runs' masker, when made with [`with_hex`](Self::with_hex).
    hex: Option<Box<HexStreamMasker>>,
    /// The base64 strings' pass, when made with [`with_base64`](Self::with_base64). It reads
    /// what the digit scan settled.
    base64: Option<Box<base64::Base64Strings>>,
}

impl StreamMasker {
    /// Creates a masker for one stream.
    pub fn new(policy: MaskPolicy) -> Self {
        Self {
            policy,
            context: Context::Clear,
            carry: Vec::with_capacity(MAX_CARRY),
            hex: None,
            base64: None,
        }
    }

    /// Also masks the PANs inside base64 strings of JSON text, like [`mask_base64_strings`]
    /// after [`mask_in_place`]: the form the Kubernetes API gives byte fields such as a
    /// Secret's `data`.
    pub fn with_base64(mut self) -> Self {
        self.base64 = Some(Box::new(base64::Base64Strings::new(self.policy.clone())));
        self
    }

    /// Masks like [`mask_in_place_with_hex`] instead: the PANs inside hex-encoded runs too.
    pub fn with_hex(mut self) -> Self {
        self.hex = Some(Box::new(HexStreamMasker::new(self.policy.clone())));
        self
    }

    /// Scans `input` after the bytes held back by earlier calls, appends to `out` every byte that
    /// is settled (with PAN digits masked) and holds back the rest. Returns how many PANs it
    /// masked.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let Some(mut strings) = self.base64.take() else {
            return self.feed_digits(input, out);
        };
        let mut text = std::mem::take(&mut strings.text);
        text.clear();
        let mut masked = self.feed_digits(input, &mut text);
        masked += strings.feed(&text, out);
        strings.text = text;
        self.base64 = Some(strings);
        masked
    }

    /// Appends the bytes still held back to `out`, masking any PAN among them, and returns how
    /// many PANs it masked. The end of the stream counts as a boundary. Afterwards the masker is
    /// ready for a new stream.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> usize {
        let Some(mut strings) = self.base64.take() else {
            return self.finish_digits(out);
        };
        let mut text = std::mem::take(&mut strings.text);
        text.clear();
        let mut masked = self.finish_digits(&mut text);
        masked += strings.feed(&text, out);
        masked += strings.finish(out);
        strings.text = text;
        self.base64 = Some(strings);
        masked
    }

    /// [`feed`](Self::feed) before the base64 pass: digits and hex runs.
    fn feed_digits(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let Some(mut hex) = self.hex.take() else {
            return self.flush_into(input, false, out);
        };
        let masked = hex.feed(input, self, out);
        self.hex = Some(hex);
        masked
    }

    /// [`finish`](Self::finish) before the base64 pass.
    fn finish_digits(&mut self, out: &mut Vec<u8>) -> usize {
        let mut masked = 0;
        if let Some(mut hex) = self.hex.take() {
            masked += hex.finish(self, out);
            self.hex = Some(hex);
        }
        masked + self.finish_text(out)
    }

    /// Flushes the held-back text with its end as a boundary, ready for the next piece of text.
    fn finish_text(&mut self, out: &mut Vec<u8>) -> usize {
        let masked = self.flush_into(&[], true, out);
        self.context = Context::Clear;
        masked
    }

    /// Scans the carry followed by `input` in place at the end of `out`, then moves the part
    /// that is not settled back into the carry.
    fn flush_into(&mut self, input: &[u8], at_end: bool, out: &mut Vec<u8>) -> usize {
        let base = out.len();
        out.extend_from_slice(&self.carry);
        out.extend_from_slice(input);
        self.carry.clear();

        let scanned = scan(&mut out[base..], self.context, at_end, &self.policy);

        let settled_end = base + scanned.settled;
        self.carry.extend_from_slice(&out[settled_end..]);
        out.truncate(settled_end);
        self.context = scanned.context;
        debug_assert!(self.carry.len() <= MAX_CARRY);
        metrics().values_masked(scanned.masked);
        scanned.masked
    }
}

impl fmt::Debug for StreamMasker {
    /// Shows the policy and how many bytes are held back, never the bytes themselves.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamMasker")
            .field("policy", &self.policy)
            .field("context", &self.context)
            .field("carry_len", &self.carry.len())
            .finish()
    }
}

/// Card schemes whose issuer ranges make a digit sequence a PAN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scheme {
    Visa,
    Mastercard,
    AmericanExpress,
    Discover,
    Jcb,
    UnionPay,
    DinersClub,
    Maestro,
}

/// One issuer range: the number formed by the first `prefix_len` digits lies in `low..=high`.
struct IssuerRange {
    prefix_len: usize,
    low: u32,
    high: u32,
    scheme: Scheme,
}

const fn range(prefix_len: usize, low: u32, high: u32, scheme: Scheme) -> IssuerRange {
    IssuerRange {
        prefix_len,
        low,
        high,
        scheme,
    }
}

/// Issuer ranges of the schemes above. Discover's 622126-622925 lies inside UnionPay's 62 and is
/// listed first, so that it reports Discover.
const ISSUER_RANGES: &[IssuerRange] = &[
    range(1, 4, 4, Scheme::Visa),
    range(2, 51, 55, Scheme::Mastercard),
    range(4, 2221, 2720, Scheme::Mastercard),
    range(2, 34, 34, Scheme::AmericanExpress),
    range(2, 37, 37, Scheme::AmericanExpress),
    range(4, 6011, 6011, Scheme::Discover),
    range(3, 644, 649, Scheme::Discover),
    range(2, 65, 65, Scheme::Discover),
    range(6, 622126, 622925, Scheme::Discover),
    range(4, 3528, 3589, Scheme::Jcb),
    range(2, 62, 62, Scheme::UnionPay),
    range(3, 300, 305, Scheme::DinersClub),
    range(2, 36, 36, Scheme::DinersClub),
    range(2, 38, 39, Scheme::DinersClub),
    range(4, 5018, 5018, Scheme::Maestro),
    range(4, 5020, 5020, Scheme::Maestro),
    range(4, 5038, 5038, Scheme::Maestro),
    range(4, 5893, 5893, Scheme::Maestro),
    range(4, 6304, 6304, Scheme::Maestro),
    range(4, 6759, 6759, Scheme::Maestro),
    range(4, 6761, 6763, Scheme::Maestro),
];

/// Returns the scheme whose issuer range contains the leading digits, given as values 0-9.
fn issuer(digits: &[u8]) -> Option<Scheme> {
    ISSUER_RANGES.iter().find_map(|issuer_range| {
        let prefix = digits.get(..issuer_range.prefix_len)?;
        let value = prefix
            .iter()
            .fold(0u32, |value, &digit| value * 10 + u32::from(digit));
        (issuer_range.low..=issuer_range.high)
            .contains(&value)
            .then_some(issuer_range.scheme)
    })
}

/// Checks the Luhn checksum of digits given as values 0-9, the last one being the check digit.
fn passes_luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (index_from_right, &digit) in digits.iter().rev().enumerate() {
        let digit = u32::from(digit);
        sum += if index_from_right % 2 == 1 {
            let doubled = digit * 2;
            if doubled > 9 { doubled - 9 } else { doubled }
        } else {
            digit
        };
    }
    sum.is_multiple_of(10)
}

/// Scan state: the meaning of the bytes before a scan position for a digit found there. A scan
/// that stops at the end of a chunk records one, and the scan of the next chunk starts from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Context {
    /// A digit here starts a new run.
    #[default]
    Clear,
    /// The bytes before are a digit and a dot, so a run starting here is the fraction of a
    /// decimal number.
    AfterDecimalPoint,
    /// The byte before is a digit of a group of more than 19 digits in a run longer than 19
    /// digits, so no PAN ends in that group.
    InLongRun,
    /// The bytes before are a digit of such a run and one space or dash, so a digit here
    /// starts a group of the long run.
    AfterLongRunSeparator,
}

/// Outcome of scanning one buffer.
struct Scan {
    /// Length of the prefix whose masking is final. The rest must be scanned again with more
    /// input after it.
    settled: usize,
    /// Scan state at `settled`.
    context: Context,
    /// PANs masked in the settled prefix.
    masked: usize,
}

/// Masks the PANs in `buf` whose runs end inside it and returns how far the result is final.
///
/// `context` describes the bytes before `buf`. Unless `at_end` is set, a run that reaches the
/// end of `buf` and could still hold a PAN is left unmasked after the settled prefix.
fn scan(buf: &mut [u8], mut context: Context, at_end: bool, policy: &MaskPolicy) -> Scan {
    let mut run = Run::default();
    let mut pos = 0;
    let mut masked = 0;

    loop {
        // Find the next run, or the rest of a long run that the previous chunk ended in.
        let continues_long_run = match context {
            Context::InLongRun => true,
            Context::AfterLongRunSeparator => buf.get(pos).is_some_and(u8::is_ascii_digit),
            Context::Clear | Context::AfterDecimalPoint => false,
        };
        let start = if continues_long_run {
            pos
        } else {
            let Some(start) = find_digit(buf, pos) else {
                // No digit follows, so no byte is left that a later digit could join.
                let context = if pos == buf.len() {
                    context
                } else {
                    Context::Clear
                };
                return Scan {
                    settled: buf.len(),
                    context,
                    masked,
                };
            };
            start
        };
        // Only a digit right at `pos` can follow a decimal point, because the scan moves past a
        // run's last digit and past any byte it looked at after that run.
        let decimal_before = start == pos && context == Context::AfterDecimalPoint;

        run.clear(continues_long_run);
        // Resumed inside a group: the group began before `buf`, longer than 19 digits.
        run.partial_group = continues_long_run && context == Context::InLongRun;
        let end = read_run(buf, start, at_end, &mut run);
        if let RunEnd::Open { .. } = end
            && run.head_len > 0
            && run.len > 0
            && run.offsets[0] <= run.head_offsets[run.head_len - 1]
        {
            // The last groups, which may still end a PAN, share digits with the head: hold the
            // run back whole, unmasked, and read it again with more input.
            return held_from(start, decimal_before, masked);
        }
        // The run became long here: the PANs that start it are known now.
        if run.head_len > 0 && !decimal_before {
            masked += mask_head(buf, &run, policy);
        }
        match end {
            RunEnd::Finished {
                next,
                next_context,
                decimal_after,
            } => {
                if !run.long {
                    masked += mask_run(buf, &run, decimal_before, decimal_after, policy);
                } else if !decimal_after {
                    masked += mask_tail(buf, &run, policy);
                }
                pos = next;
                context = next_context;
            }
            RunEnd::Open { context_at_end } if run.long => {
                // The last groups may still end in a PAN when the run ends, so they are held
                // back from their first digit, which a separator of the run precedes.
                return if run.len > 0 {
                    Scan {
                        settled: run.offsets[0],
                        context: Context::AfterLongRunSeparator,
                        masked,
                    }
                } else {
                    Scan {
                        settled: buf.len(),
                        context: context_at_end,
                        masked,
                    }
                };
            }
            RunEnd::Open { .. } => {
                // The run can still become a PAN, so hold it back from its first digit.
                return held_from(start, decimal_before, masked);
            }
        }
    }
}

/// Returns the outcome of a scan that keeps everything from the run starting at `start` back.
fn held_from(start: usize, decimal_before: bool, masked: usize) -> Scan {
    let context = if decimal_before {
        Context::AfterDecimalPoint
    } else {
        Context::Clear
    };
    Scan {
        settled: start,
        context,
        masked,
    }
}

/// Returns the position of the first ASCII digit at or after `from`.
fn find_digit(buf: &[u8], from: usize) -> Option<usize> {
    let rest = &buf[from..];

    // Test whole blocks without an early exit so that the compiler vectorizes the test.
    let mut skipped = 0;
    for block in rest.chunks_exact(DIGIT_SEARCH_BLOCK) {
        let has_digit = block
            .iter()
            .fold(false, |found, byte| found | byte.is_ascii_digit());
        if has_digit {
            break;
        }
        skipped += DIGIT_SEARCH_BLOCK;
    }

    rest[skipped..]
        .iter()
        .position(u8::is_ascii_digit)
        .map(|offset| from + skipped + offset)
}

/// Digits of one run as values 0-9 with their positions in the buffer: all of them while the
/// run has at most 19, and once it is longer, its last whole groups that fit in 19 digits.
#[derive(Default)]
struct Run {
    digits: [u8; MAX_PAN_DIGITS],
    offsets: [usize; MAX_PAN_DIGITS],
    len: usize,
    /// The run has more than 19 digits. Only a PAN that starts or ends it counts, because
    /// one in the middle of a long grouped number is indistinguishable from a part of it.
    long: bool,
    /// The first group pushed continues a group that began before the buffer.
    partial_group: bool,
    /// When the run became long in this buffer, its first digits (`head_len` of them) before
    /// the group that made it long. Zero otherwise.
    head_digits: [u8; MAX_PAN_DIGITS],
    head_offsets: [usize; MAX_PAN_DIGITS],
    head_len: usize,
}

impl Run {
    fn clear(&mut self, long: bool) {
        self.len = 0;
        self.long = long;
        self.partial_group = false;
        self.head_len = 0;
    }

    /// Adds the digits `buf[start..end]`, a whole group or the rest of one. A run that grows
    /// past 19 digits becomes long: its digits so far become the head, and from then on it
    /// keeps its last groups that fit in 19 digits.
    fn push_group(&mut self, buf: &[u8], start: usize, end: usize) {
        let group = end - start;
        if !self.long && group > MAX_PAN_DIGITS - self.len {
            self.long = true;
            self.head_digits = self.digits;
            self.head_offsets = self.offsets;
            self.head_len = self.len;
        }
        if self.long {
            if std::mem::take(&mut self.partial_group) || group > MAX_PAN_DIGITS {
                self.len = 0;
                return;
            }
            // Drop whole groups from the front until this one fits.
            while self.len + group > MAX_PAN_DIGITS {
                let first_group = (1..self.len)
                    .find(|&index| self.starts_group(index))
                    .unwrap_or(self.len);
                self.digits.copy_within(first_group..self.len, 0);
                self.offsets.copy_within(first_group..self.len, 0);
                self.len -= first_group;
            }
        }
        for (offset, &byte) in (start..end).zip(&buf[start..end]) {
            self.digits[self.len] = byte - b'0';
            self.offsets[self.len] = offset;
            self.len += 1;
        }
    }

    /// Checks whether digit `index` starts a group, which is when a separator precedes it.
    fn starts_group(&self, index: usize) -> bool {
        index > 0 && self.offsets[index] != self.offsets[index - 1] + 1
    }
}

/// End of a run read by [`read_run`].
enum RunEnd {
    /// A byte after the run ends it.
    Finished {
        /// Position where scanning resumes.
        next: usize,
        /// Scan state at `next`.
        next_context: Context,
        /// The run is followed by a dot and a digit, so it is the integer part of a decimal.
        decimal_after: bool,
    },
    /// The buffer ends before anything ends the run.
    Open {
        /// Scan state after the last byte of the buffer, which a long run settles at.
        context_at_end: Context,
    },
}

/// Reads the run that starts at `start` into `run`. For a long run that an earlier chunk began,
/// `start` may be a non-digit right after one of its digits.
fn read_run(buf: &[u8], start: usize, at_end: bool, run: &mut Run) -> RunEnd {
    let finished = |next, next_context, decimal_after| RunEnd::Finished {
        next,
        next_context,
        decimal_after,
    };
    let mut pos = start;

    loop {
        let group_start = pos;
        while buf.get(pos).is_some_and(u8::is_ascii_digit) {
            pos += 1;
        }
        run.push_group(buf, group_start, pos);

        // The byte after a group, and for a separator or dot the byte after that, decide
        // whether the run goes on.
        let Some(&after_group) = buf.get(pos) else {
            return if at_end {
                finished(pos, Context::Clear, false)
            } else {
                RunEnd::Open {
                    context_at_end: Context::InLongRun,
                }
            };
        };
        if !matches!(after_group, b' ' | b'-' | b'.') {
            return finished(pos + 1, Context::Clear, false);
        }
        let Some(next_byte) = buf.get(pos + 1) else {
            return if at_end {
                finished(pos + 1, Context::Clear, false)
            } else if after_group == b'.' {
                RunEnd::Open {
                    context_at_end: Context::AfterDecimalPoint,
                }
            } else {
                RunEnd::Open {
                    context_at_end: Context::AfterLongRunSeparator,
                }
            };
        };
        match (after_group, next_byte.is_ascii_digit()) {
            (b'.', true) => return finished(pos + 1, Context::AfterDecimalPoint, true),
            (_, true) => pos += 1,
            (_, false) => return finished(pos + 1, Context::Clear, false),
        }
    }
}

/// Masks every PAN among the candidates of a finished run of at most 19 digits and returns how
/// many it masked.
fn mask_run(
    buf: &mut [u8],
    run: &Run,
    decimal_before: bool,
    decimal_after: bool,
    policy: &MaskPolicy,
) -> usize {
    if run.len < MIN_PAN_DIGITS {
        return 0;
    }
    let mut masked = 0;

    for first in 0..=run.len - MIN_PAN_DIGITS {
        if (first == 0 && decimal_before) || (first > 0 && !run.starts_group(first)) {
            continue;
        }
        for end in first + MIN_PAN_DIGITS..=run.len {
            let ends_group = end == run.len || run.starts_group(end);
            if !ends_group || (end == run.len && decimal_after) {
                continue;
            }
            if !uses_one_separator(buf, run, first, end) {
                continue;
            }
            let digits = &run.digits[first..end];
            if !passes_luhn(digits) || issuer(digits).is_none() {
                continue;
            }

            mask_digits(buf, &run.offsets[first..end], policy);
            masked += 1;
        }
    }
    masked
}

/// Masks the PANs that start a long run: those among its first digits (the head) that end
/// where a group ends.
fn mask_head(buf: &mut [u8], run: &Run, policy: &MaskPolicy) -> usize {
    let offsets = &run.head_offsets[..run.head_len];
    let starts_group = |index: usize| index > 0 && offsets[index] != offsets[index - 1] + 1;
    let mut masked = 0;
    for end in MIN_PAN_DIGITS..=run.head_len {
        // The group that made the run long starts after the head, past a separator.
        if end < run.head_len && !starts_group(end) {
            continue;
        }
        masked += mask_candidate(buf, &run.head_digits[..end], &offsets[..end], policy);
    }
    masked
}

/// Masks the PANs that end a finished long run: those among its last groups that start where
/// a group starts.
fn mask_tail(buf: &mut [u8], run: &Run, policy: &MaskPolicy) -> usize {
    let mut masked = 0;
    for first in 0..=run.len.saturating_sub(MIN_PAN_DIGITS) {
        if run.len < MIN_PAN_DIGITS || (first > 0 && !run.starts_group(first)) {
            continue;
        }
        masked += mask_candidate(
            buf,
            &run.digits[first..run.len],
            &run.offsets[first..run.len],
            policy,
        );
    }
    masked
}

/// Masks one candidate, given by its digits and their offsets, when it is a PAN: one kind of
/// separator, the Luhn check and an issuer prefix. Returns 1 when it masked it.
fn mask_candidate(buf: &mut [u8], digits: &[u8], offsets: &[usize], policy: &MaskPolicy) -> usize {
    let mut separators = (1..offsets.len())
        .filter(|&index| offsets[index] != offsets[index - 1] + 1)
        .map(|index| buf[offsets[index] - 1]);
    if let Some(kind) = separators.next()
        && !separators.all(|separator| separator == kind)
    {
        return 0;
    }
    if !passes_luhn(digits) || issuer(digits).is_none() {
        return 0;
    }
    mask_digits(buf, offsets, policy);
    1
}

/// Checks whether the separators between digits `first..end` of the run are all the same byte.
fn uses_one_separator(buf: &[u8], run: &Run, first: usize, end: usize) -> bool {
    let mut separators = (first + 1..end)
        .filter(|&index| run.starts_group(index))
        .map(|index| buf[run.offsets[index] - 1]);
    match separators.next() {
        Some(kind) => separators.all(|separator| separator == kind),
        None => true,
    }
}

/// Writes the mask character over the digits at `offsets` that the policy hides.
fn mask_digits(buf: &mut [u8], offsets: &[usize], policy: &MaskPolicy) {
    let (keep_first, keep_last) = policy.keep.visible_digits();
    let hidden_end = offsets.len().saturating_sub(keep_last);
    for &offset in offsets.iter().take(hidden_end).skip(keep_first) {
        buf[offset] = policy.mask_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Masks `input` whole with the default policy.
    fn masked(input: &str) -> String {
        masked_with(input, &MaskPolicy::default())
    }

    fn masked_with(input: &str, policy: &MaskPolicy) -> String {
        let mut buf = input.as_bytes().to_vec();
        mask_in_place(&mut buf, policy);
        String::from_utf8(buf).expect("masking writes only ASCII over ASCII digits")
    }

    /// Writes `text` as a PostgreSQL `bytea` literal: `\x` and lowercase hex.
    fn hex_of(text: &str) -> String {
        let digits: String = text.bytes().map(|byte| format!("{byte:02x}")).collect();
        format!("\\x{digits}")
    }

    fn hex_masked(input: &str) -> (String, usize) {
        let mut buf = input.as_bytes().to_vec();
        let count = mask_in_place_with_hex(&mut buf, &MaskPolicy::default());
        (String::from_utf8(buf).expect("hex stays ASCII"), count)
    }

    #[test]
    fn hex_encoded_pan_masked_in_place() {
        let value = hex_of("card 4111 1111 1111 1111 end");
        assert_eq!(
            hex_masked(&value),
            (hex_of("card 4111 11** **** 1111 end"), 1)
        );
        // Inside COPY text (a doubled backslash), a JSON string and next to other text.
        let input = format!(
            "7\t\\{} {{\"b\":\"{}\"}}",
            hex_of("4012888888881881"),
            hex_of("5555555555554444")
        );
        let expected = format!(
            "7\t\\{} {{\"b\":\"{}\"}}",
            hex_of("401288******1881"),
            hex_of("555555******4444")
        );
        assert_eq!(hex_masked(&input), (expected, 2));

        // At every offset around the search blocks' edges.
        for offset in 0..70 {
            let input = format!("{}{value}", "a".repeat(offset));
            let expected = format!(
                "{}{}",
                "a".repeat(offset),
                hex_of("card 4111 11** **** 1111 end")
            );
            assert_eq!(hex_masked(&input), (expected, 1), "offset {offset}");
        }

        // MySQL's hex literals.
        let digits = |text: &str| hex_of(text)[2..].to_string();
        let input = format!(
            "SELECT X'{}', 0x{}",
            digits("4111111111111111"),
            digits("5555555555554444")
        );
        let expected = format!(
            "SELECT X'{}', 0x{}",
            digits("411111******1111"),
            digits("555555******4444")
        );
        assert_eq!(hex_masked(&input), (expected, 2));
    }

    /// Masks `input` in `pieces`-sized steps with a hex-aware stream masker.
    fn hex_streamed(input: &[u8], piece: usize) -> (Vec<u8>, usize) {
        let mut masker = StreamMasker::new(MaskPolicy::default()).with_hex();
        let mut out = Vec::new();
        let mut count = 0;
        for chunk in input.chunks(piece.max(1)) {
            count += masker.feed(chunk, &mut out);
        }
        count += masker.finish(&mut out);
        (out, count)
    }

    /// Checks that masking `input` in `piece`-sized steps gives what masking it whole gives,
    /// and returns the whole result's PAN count.
    fn assert_streamed_like_whole(input: &str, piece: usize) -> usize {
        let mut whole = input.as_bytes().to_vec();
        let count = mask_in_place_with_hex(&mut whole, &MaskPolicy::default());
        let (streamed, streamed_count) = hex_streamed(input.as_bytes(), piece);
        assert_eq!(
            String::from_utf8_lossy(&streamed),
            String::from_utf8_lossy(&whole),
            "{input:?} in pieces of {piece}"
        );
        assert_eq!(streamed_count, count, "{input:?} in pieces of {piece}");
        count
    }

    #[test]
    fn hex_streamed_equals_whole() {
        let value = hex_of("card 4111 1111 1111 1111 end");
        let inputs = [
            format!(
                "a\\{value}\n{}",
                hex_of("5555555555554444")
                    .to_uppercase()
                    .replacen('X', "x", 1)
            ),
            format!(
                "0x{}x'{}' 4012888888881881",
                &hex_of("4012888888881881")[2..],
                &hex_of("x 4111111111111111")[2..]
            ),
            format!("{value}0x\\x0x'x'\\x3"),
            format!("{}1{}", &value[..value.len() - 1], value),
        ];
        for input in inputs {
            for piece in 1..=input.len() {
                let count = assert_streamed_like_whole(&input, piece);
                assert!(count > 0, "{input}");
            }
        }
    }

    #[test]
    fn hex_streamed_equals_whole_on_generated_input() {
        // Pieces of hex runs, prefixes, card numbers in hex and in digits, and other bytes,
        // in an order from a fixed xorshift sequence.
        let pan_hex = hex_of("4111111111111111")[2..].to_string();
        let parts = [
            "\\x",
            "0x",
            "X'",
            "x",
            "0",
            "3",
            "4",
            "a",
            "F",
            " ",
            "'",
            "\\",
            pan_hex.as_str(),
            "5555555555554444",
            "31313131",
        ];
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..500 {
            let mut input = String::new();
            for _ in 0..1 + next() % 12 {
                input.push_str(parts[(next() % parts.len() as u64) as usize]);
            }
            let piece = 1 + (next() % input.len() as u64) as usize;
            assert_streamed_like_whole(&input, piece);
        }
    }

    #[test]
    fn hex_digits_never_read_as_decimal() {
        // Masking puts `2a` into the run, which leaves `343131312031312` before it: 15 digits
        // that pass as an American Express number. They are hex, so they stay.
        let value = hex_of("4111 1111 1111 1111");
        assert_eq!(hex_masked(&value), (hex_of("4111 11** **** 1111"), 1));
        // Bytes whose hex looks like a card number are no card number.
        let bytes = "\\x4111111111111111".to_string();
        assert_eq!(hex_masked(&bytes), (bytes.clone(), 0));
        // Text around runs is still masked, each piece on its own.
        let input = format!("4111111111111111 {value} 5555555555554444");
        let expected = format!(
            "411111******1111 {} 555555******4444",
            hex_of("4111 11** **** 1111")
        );
        assert_eq!(hex_masked(&input), (expected, 3));
    }

    #[test]
    fn hex_masking_changes_only_masked_bytes() {
        // Upper-case hex digits stay upper case where no byte was masked.
        let input = "\\x7A3A343131313131313131313131313131313A7A";
        let expected = "\\x7A3A3431313131312a2a2a2a2a2a313131313A7A";
        assert_eq!(hex_masked(input), (expected.to_string(), 1));
    }

    #[test]
    fn hex_without_pan_left_alone() {
        for input in [
            hex_of("1748503543012"),
            hex_of("4111111111111112"),
            "\\x3431313131313131313131313131313".to_string(),
            "\\xzz 4111".to_string(),
            "plain \\ text".to_string(),
            String::new(),
        ] {
            assert_eq!(hex_masked(&input), (input.clone(), 0), "{input}");
        }
    }

    /// Appends the Luhn check digit to `body`. Written apart from `passes_luhn` so that the
    /// tests do not take the checksum from the code under test.
    fn with_check_digit(body: &str) -> String {
        // Once the check digit is appended, the body's last digit sits second from the right,
        // so the doubled digits are those at even distance from the body's end.
        let sum: u32 = body
            .bytes()
            .rev()
            .enumerate()
            .map(|(distance, byte)| {
                let digit = u32::from(byte - b'0');
                if distance % 2 == 0 {
                    let doubled = 2 * digit;
                    doubled / 10 + doubled % 10
                } else {
                    digit
                }
            })
            .sum();
        let check = (10 - sum % 10) % 10;
        format!("{body}{check}")
    }

    /// Checks a digit string against Luhn by comparing its check digit with a recomputed one.
    fn luhn_valid(number: &str) -> bool {
        let (body, _) = number.split_at(number.len() - 1);
        with_check_digit(body) == number
    }

    /// Returns the default masking of a plain digit string, with first six and last four kept.
    fn first_six_last_four(number: &str) -> String {
        let hidden = number.len() - 10;
        format!(
            "{}{}{}",
            &number[..6],
            "*".repeat(hidden),
            &number[number.len() - 4..]
        )
    }

    /// Masks `input` through a stream masker fed in the given pieces.
    fn streamed(pieces: &[&[u8]], policy: &MaskPolicy) -> (Vec<u8>, usize) {
        let mut masker = StreamMasker::new(policy.clone());
        let mut out = Vec::new();
        let mut count = 0;
        for piece in pieces {
            count += masker.feed(piece, &mut out);
            assert!(masker.carry.len() <= MAX_CARRY, "carry over the limit");
        }
        count += masker.finish(&mut out);
        (out, count)
    }

    fn whole(input: &[u8], policy: &MaskPolicy) -> (Vec<u8>, usize) {
        let mut buf = input.to_vec();
        let count = mask_in_place(&mut buf, policy);
        (buf, count)
    }

    #[test]
    fn masks_spaced_pan_in_json() {
        let input = r#"{"card":"4111 1111 1111 1111"}"#;
        let output = masked(input);

        assert_eq!(output, r#"{"card":"4111 11** **** 1111"}"#);
        let value: serde_json::Value =
            serde_json::from_str(&output).expect("masked JSON still parses");
        assert_eq!(value["card"], "4111 11** **** 1111");
        for (before, after) in input.bytes().zip(output.bytes()) {
            assert!(before == after || (before.is_ascii_digit() && after == b'*'));
        }
    }

    #[test]
    fn masks_dashed_pan_in_json() {
        let input = r#"{"card":"4111-1111-1111-1111"}"#;
        let output = masked(input);

        assert_eq!(output, r#"{"card":"4111-11**-****-1111"}"#);
        let value: serde_json::Value =
            serde_json::from_str(&output).expect("masked JSON still parses");
        assert_eq!(value["card"], "4111-11**-****-1111");
        for (before, after) in input.bytes().zip(output.bytes()) {
            assert!(before == after || (before.is_ascii_digit() && after == b'*'));
        }
    }

    #[test]
    fn masks_mastercard_two_series() {
        assert!(luhn_valid("2221000000000009"));

        assert_eq!(masked("2221000000000009"), "222100******0009");
    }

    #[test]
    fn masks_nineteen_digit_pans() {
        for body in [
            "620000000000000000",
            "411111111111111111",
            "650000000000000000",
        ] {
            let number = with_check_digit(body);
            assert_eq!(number.len(), 19);

            assert_eq!(masked(&number), first_six_last_four(&number), "{number}");
        }
    }

    #[test]
    fn masks_thirteen_digit_visa() {
        let number = with_check_digit("411111111111");

        assert_eq!(masked(&number), first_six_last_four(&number));
        assert_eq!(masked(&number).matches('*').count(), 3);
    }

    #[test]
    fn keeps_timestamp_without_issuer() {
        assert!(luhn_valid("1748503543012"));

        assert_eq!(masked("1748503543012"), "1748503543012");
        assert_eq!(masked(r#"{"ts":1748503543012}"#), r#"{"ts":1748503543012}"#);
    }

    #[test]
    fn masks_dashed_mastercard() {
        assert_eq!(masked("5555-5555-5555-4444"), "5555-55**-****-4444");
    }

    #[test]
    fn exponent_notation_masked() {
        let cases = [
            ("4.111111111111111e15", "4.11111******1111e15", 1),
            ("4.111111111111111e+15", "4.11111******1111e+15", 1),
            ("-4.111111111111111E15", "-4.11111******1111E15", 1),
            ("5.555555555554444e15", "5.55555******4444e15", 1),
            // Not whole numbers, not card numbers, or not exponent notation.
            ("4.1111111111111115e15", "4.1111111111111115e15", 0),
            ("1.748503543012e12", "1.748503543012e12", 0),
            ("4.111111111111111e-15", "4.111111111111111e-15", 0),
            ("4111111111111111", "4111111111111111", 0),
            ("4.5e15", "4.5e15", 0),
        ];
        for (input, expected, count) in cases {
            let mut value = input.as_bytes().to_vec();
            assert_eq!(
                mask_exponent_number(&mut value, &MaskPolicy::default()),
                count,
                "{input}"
            );
            assert_eq!(String::from_utf8_lossy(&value), expected, "{input}");
        }
    }

    #[test]
    fn exponent_numbers_inside_text_masked() {
        let mut text = b"{4.111111111111111e+15,1.5e3} [4.111111111111111e15] e 4e".to_vec();
        assert_eq!(mask_exponent_numbers(&mut text, &MaskPolicy::default()), 2);
        assert_eq!(
            String::from_utf8_lossy(&text),
            "{4.11111******1111e+15,1.5e3} [4.11111******1111e15] e 4e"
        );
    }

    #[test]
    fn wide_text_inside_hex_masked() {
        let hex = |bytes: &[u8]| -> String { bytes.iter().map(|b| format!("{b:02x}")).collect() };
        let encode = |text: &str, wide: wide::Wide| -> Vec<u8> {
            let mut out = Vec::new();
            for byte in text.bytes() {
                wide.encode(byte, &mut out);
            }
            out
        };
        let encodings = [
            wide::Wide::Utf16Be,
            wide::Wide::Utf16Le,
            wide::Wide::Utf32Be,
        ];
        for unit in encodings {
            let name = format!("{unit:?}");
            let input = format!(
                "INSERT INTO t VALUES (X'{}')",
                hex(&encode("4111111111111111", unit))
            );
            let expected = format!(
                "INSERT INTO t VALUES (X'{}')",
                hex(&encode("411111******1111", unit))
            );
            let mut buf = input.into_bytes();
            assert_eq!(
                mask_in_place_with_hex(&mut buf, &MaskPolicy::default()),
                1,
                "{name}"
            );
            assert_eq!(String::from_utf8_lossy(&buf), expected, "{name}");
        }
        // Binary data with digits and NUL bytes that are not wide text stays.
        let mut buf = format!(
            "\\x{}",
            hex(&[
                0, 4, 1, 1, 0x31, 0, 0x32, 7, 0, 0x33, 9, 0, 0x34, 0, 0x35, 1
            ])
        )
        .into_bytes();
        let before = buf.clone();
        assert_eq!(mask_in_place_with_hex(&mut buf, &MaskPolicy::default()), 0);
        assert_eq!(buf, before);
    }

    #[test]
    fn numbers_grouped_in_thousands_masked() {
        let cases = [
            ("4,111,111,111,111,111", "4,111,11*,***,**1,111", 1),
            ("$4,111,111,111,111,111.00", "$4,111,11*,***,**1,111.00", 1),
            (
                "-$5,555,555,555,554,444.00",
                "-$5,555,55*,***,**4,444.00",
                1,
            ),
            (
                "4.111.111.111.111.111,00 EUR",
                "4.111.11*.***.**1.111,00 EUR",
                1,
            ),
            ("CHF 4'111'111'111'111'111", "CHF 4'111'11*'***'**1'111", 1),
            ("[4,111,111,111,111,111]", "[4,111,11*,***,**1,111]", 1),
            // Amounts, not card numbers: too few digits, not Luhn-valid, broken groups,
            // mixed separators, or part of a longer grouping.
            ("$1,234,567.89", "$1,234,567.89", 0),
            ("4,111,111,111,111,112", "4,111,111,111,111,112", 0),
            ("4,111,111,111,111,11", "4,111,111,111,111,11", 0),
            ("4,111,111.111,111,111", "4,111,111.111,111,111", 0),
            ("1,4,111,111,111,111,111", "1,4,111,111,111,111,111", 0),
            ("4,111,111,111,111,111,000", "4,111,111,111,111,111,000", 0),
            ("4,111,111,111,111,1111", "4,111,111,111,111,1111", 0),
        ];
        for (input, expected, count) in cases {
            let mut value = input.as_bytes().to_vec();
            assert_eq!(
                mask_grouped_numbers(&mut value, &MaskPolicy::default()),
                count,
                "{input}"
            );
            assert_eq!(String::from_utf8_lossy(&value), expected, "{input}");
        }
    }

    #[test]
    fn keeps_pan_inside_longer_run() {
        assert!(!luhn_valid("41111111111111115"));

        assert_eq!(masked("41111111111111115"), "41111111111111115");
        assert_eq!(masked("041111111111111111"), "041111111111111111");
        // In the middle of a longer grouped number, a PAN is indistinguishable from a part of it.
        assert_eq!(
            masked("1234 4111 1111 1111 1111 5678"),
            "1234 4111 1111 1111 1111 5678"
        );
    }

    #[test]
    fn masks_pan_at_either_end_of_longer_run() {
        // A card number with its expiry and CVV, or after an order number: 20 digits or more
        // joined by separators, with the PAN at the start or the end.
        assert_eq!(masked("4111111111111111 1234"), "411111******1111 1234");
        assert_eq!(
            masked("4111111111111111 0926 123"),
            "411111******1111 0926 123"
        );
        assert_eq!(masked("1234-4111111111111111"), "1234-411111******1111");
        assert_eq!(
            masked("order 20241206 4111111111111111"),
            "order 20241206 411111******1111"
        );
        assert_eq!(
            masked("12345-4111-1111-1111-1111"),
            "12345-4111-11**-****-1111"
        );
        assert_eq!(
            masked("4111 1111 1111 1111 1111"),
            "4111 11** **** 1111 1111"
        );
        // The end of the run is a decimal's integer part, so only the start counts.
        assert_eq!(
            masked("4111111111111111 0926 123.5"),
            "411111******1111 0926 123.5"
        );
        assert_eq!(masked("0926 4111111111111111.5"), "0926 4111111111111111.5");
    }

    #[test]
    fn keeps_decimal_numbers() {
        assert_eq!(masked("3.4111111111111111"), "3.4111111111111111");
        assert_eq!(masked("4111111111111111.5"), "4111111111111111.5");
        assert_eq!(masked("4111111111111111."), "411111******1111.");
        assert_eq!(masked(".4111111111111111"), ".411111******1111");
    }

    #[test]
    fn masks_pan_after_short_number() {
        assert_eq!(masked("7 4111 1111 1111 1111"), "7 4111 11** **** 1111");
        assert_eq!(masked("qty 12 4111111111111111"), "qty 12 411111******1111");
        assert_eq!(masked("3.14 4111111111111111"), "3.14 411111******1111");
    }

    #[test]
    fn rejects_mixed_separators() {
        assert_eq!(masked("4111 1111-1111 1111"), "4111 1111-1111 1111");
    }

    #[test]
    fn rejects_doubled_separators() {
        assert_eq!(masked("4111  1111 1111 1111"), "4111  1111 1111 1111");
        assert_eq!(masked("4111--1111--1111--1111"), "4111--1111--1111--1111");
        assert_eq!(masked("4111 -1111 1111 1111"), "4111 -1111 1111 1111");
    }

    #[test]
    fn applies_last_four_policy() {
        let policy = MaskPolicy {
            keep: Keep::LastFour,
            ..MaskPolicy::default()
        };

        assert_eq!(
            masked_with("4111 1111 1111 1111", &policy),
            "**** **** **** 1111"
        );
    }

    #[test]
    fn applies_full_masking_policy() {
        let policy = MaskPolicy {
            keep: Keep::Nothing,
            mask_char: b'X',
        };

        assert_eq!(
            masked_with("card=5555-5555-5555-4444;", &policy),
            "card=XXXX-XXXX-XXXX-XXXX;"
        );
    }

    #[test]
    fn applies_custom_mask_char() {
        let policy = MaskPolicy {
            mask_char: b'#',
            ..MaskPolicy::default()
        };

        assert_eq!(masked_with("4111111111111111", &policy), "411111######1111");
    }

    #[test]
    fn counts_each_masked_pan() {
        let mut buf = b"a 4111111111111111, b 5555-5555-5555-4444, c 1748503543012".to_vec();

        assert_eq!(mask_in_place(&mut buf, &MaskPolicy::default()), 2);
        assert_eq!(mask_in_place(&mut Vec::new(), &MaskPolicy::default()), 0);
    }

    #[test]
    fn leaves_other_bytes_untouched() {
        let mut buf = vec![0xff, 0x00, b'4'];
        buf.extend_from_slice(b"111111111111111");
        buf.extend_from_slice(&[0xc3, 0xa9, b'\n']);
        let mut expected = buf.clone();
        expected[8..14].copy_from_slice(b"******");

        assert_eq!(mask_in_place(&mut buf, &MaskPolicy::default()), 1);
        assert_eq!(buf, expected);
    }

    #[test]
    fn issuer_range_bounds() {
        let inside = [
            ("4", Scheme::Visa),
            ("51", Scheme::Mastercard),
            ("55", Scheme::Mastercard),
            ("2221", Scheme::Mastercard),
            ("2720", Scheme::Mastercard),
            ("34", Scheme::AmericanExpress),
            ("37", Scheme::AmericanExpress),
            ("6011", Scheme::Discover),
            ("644", Scheme::Discover),
            ("649", Scheme::Discover),
            ("65", Scheme::Discover),
            ("622126", Scheme::Discover),
            ("622925", Scheme::Discover),
            ("3528", Scheme::Jcb),
            ("3589", Scheme::Jcb),
            ("62", Scheme::UnionPay),
            ("622125", Scheme::UnionPay),
            ("300", Scheme::DinersClub),
            ("305", Scheme::DinersClub),
            ("36", Scheme::DinersClub),
            ("38", Scheme::DinersClub),
            ("39", Scheme::DinersClub),
            ("5018", Scheme::Maestro),
            ("5020", Scheme::Maestro),
            ("5038", Scheme::Maestro),
            ("5893", Scheme::Maestro),
            ("6304", Scheme::Maestro),
            ("6759", Scheme::Maestro),
            ("6761", Scheme::Maestro),
            ("6763", Scheme::Maestro),
        ];
        for (prefix, scheme) in inside {
            let body = format!("{prefix:0<15}");
            let number = with_check_digit(&body);
            let digits: Vec<u8> = number.bytes().map(|byte| byte - b'0').collect();

            assert_eq!(issuer(&digits), Some(scheme), "{number}");
            assert_eq!(masked(&number), first_six_last_four(&number), "{number}");
        }
    }

    #[test]
    fn rejects_prefixes_outside_ranges() {
        let outside = [
            "0", "1", "2220", "2721", "306", "33", "3527", "3590", "50", "56", "57", "58", "5019",
            "5892", "6010", "6012", "63", "643", "66", "67", "6760", "6764", "7", "8", "9",
        ];
        for prefix in outside {
            let body = format!("{prefix:0<15}");
            let number = with_check_digit(&body);
            let digits: Vec<u8> = number.bytes().map(|byte| byte - b'0').collect();

            assert_eq!(issuer(&digits), None, "{number}");
            assert_eq!(masked(&number), number, "{number}");
        }
    }

    #[test]
    fn rejects_failed_luhn() {
        assert_eq!(masked("4111111111111112"), "4111111111111112");
        assert_eq!(masked("5555 5555 5555 4445"), "5555 5555 5555 4445");
    }

    #[test]
    fn rejects_short_and_long_lengths() {
        let twelve = with_check_digit("41111111111");
        let twenty = with_check_digit("4111111111111111111");

        assert_eq!(masked(&twelve), twelve);
        assert_eq!(masked(&twenty), twenty);
    }

    /// Inputs for the split tests: each has a PAN, a near miss or a boundary case near a split.
    const SPLIT_CASES: &[&str] = &[
        r#"{"card":"4111 1111 1111 1111"}"#,
        "x 5555-5555-5555-4444 y 2221000000000009\n",
        "3.4111111111111111 and 4111111111111111.5 and 4111111111111111.",
        "41111111111111115 4111111111111111 1234 7 4111 1111 1111 1111",
        "1748503543012 12.5 0.4111111111111111 4111111111111111",
        "99999999999999999999999 4111111111111111-4111111111111111",
        "12345678901234567890.4111111111111111 end",
        "4111111111111111",
    ];

    #[test]
    fn stream_every_split_point() {
        let policy = MaskPolicy::default();
        for case in SPLIT_CASES {
            let input = case.as_bytes();
            let expected = whole(input, &policy);
            for split in 0..=input.len() {
                let (head, tail) = input.split_at(split);

                assert_eq!(
                    streamed(&[head, tail], &policy),
                    expected,
                    "{case} at {split}"
                );
            }
        }
    }

    /// A PAN in a JSON string, spaced or dashed, split at every byte across two reads: masked
    /// digit for digit, with the separators, the quotes and the length kept.
    #[test]
    fn json_pan_masked_at_every_split() {
        let policy = MaskPolicy::default();
        for (input, expected) in [
            (
                r#"{"card":"4111 1111 1111 1111"}"#,
                r#"{"card":"4111 11** **** 1111"}"#,
            ),
            (
                r#"{"card":"4111-1111-1111-1111"}"#,
                r#"{"card":"4111-11**-****-1111"}"#,
            ),
        ] {
            for split in 0..=input.len() {
                let (head, tail) = input.as_bytes().split_at(split);
                let (masked, count) = streamed(&[head, tail], &policy);
                assert_eq!(
                    String::from_utf8_lossy(&masked),
                    expected,
                    "{input} at {split}"
                );
                assert_eq!(count, 1, "{input} at {split}");
            }
        }
    }

    #[test]
    fn stream_one_byte_at_a_time() {
        let policy = MaskPolicy::default();
        for case in SPLIT_CASES {
            let input = case.as_bytes();
            let pieces: Vec<&[u8]> = input.chunks(1).collect();

            assert_eq!(streamed(&pieces, &policy), whole(input, &policy), "{case}");
        }
    }

    #[test]
    fn stream_passes_long_run_through() {
        let mut masker = StreamMasker::new(MaskPolicy::default());
        let mut out = Vec::new();
        let digits = vec![b'7'; 100_000];

        for chunk in digits.chunks(1000) {
            masker.feed(chunk, &mut out);
            assert!(masker.carry.len() <= MAX_CARRY);
        }
        masker.feed(b" 4111111111111111 end", &mut out);
        masker.finish(&mut out);

        // The PAN ends the long run it joins through one space, so it is masked.
        assert_eq!(out.len(), 100_000 + 21);
        assert!(out.ends_with(b"7 411111******1111 end"));
    }

    #[test]
    fn stream_reusable_after_finish() {
        let mut masker = StreamMasker::new(MaskPolicy::default());
        let mut out = Vec::new();

        masker.feed(b"1.", &mut out);
        masker.finish(&mut out);
        masker.feed(b"4111111111111111", &mut out);
        masker.finish(&mut out);

        assert_eq!(out, b"1.411111******1111");
    }

    #[test]
    fn debug_hides_held_back_digits() {
        let mut masker = StreamMasker::new(MaskPolicy::default());
        let mut out = Vec::new();

        masker.feed(b"card 4111 1111 11", &mut out);
        let shown = format!("{masker:?}");

        assert_eq!(out, b"card ");
        assert!(!shown.contains("4111"), "{shown}");
        assert!(shown.contains("carry_len: 12"), "{shown}");
    }

    /// Small deterministic generator (xorshift64*), enough to vary the test inputs.
    struct Generator(u64);

    impl Generator {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, bound: usize) -> usize {
            (self.next() % bound as u64) as usize
        }

        fn digits(&mut self, count: usize) -> String {
            (0..count)
                .map(|_| char::from(b'0' + self.below(10) as u8))
                .collect()
        }

        /// Generates a Luhn-valid number with an issuer prefix, plain or grouped by fours.
        fn pan(&mut self) -> String {
            const PREFIXES: &[&str] = &["4", "51", "2720", "37", "6011", "3530", "62", "36"];
            let prefix = PREFIXES[self.below(PREFIXES.len())];
            let length = 13 + self.below(7);
            let body = format!("{prefix}{}", self.digits(length - 1 - prefix.len()));
            let number = with_check_digit(&body);
            let separator = match self.below(3) {
                0 => return number,
                1 => ' ',
                _ => '-',
            };
            let mut grouped = String::new();
            for (index, digit) in number.chars().enumerate() {
                if index > 0 && index % 4 == 0 {
                    grouped.push(separator);
                }
                grouped.push(digit);
            }
            grouped
        }

        /// Generates text from pieces that meet at the edges PAN detection cares about.
        fn input(&mut self) -> Vec<u8> {
            let mut text = String::new();
            for _ in 0..1 + self.below(10) {
                match self.below(9) {
                    0 | 1 => text += &self.pan(),
                    2 => {
                        let count = 1 + self.below(20);
                        text += &self.digits(count);
                    }
                    3 => text.push(' '),
                    4 => text.push('-'),
                    5 => text.push('.'),
                    6 => text += "\"card\":",
                    7 => text.push('x'),
                    _ => text += &self.digits(1),
                }
            }
            text.into_bytes()
        }
    }

    const POLICIES: [MaskPolicy; 3] = [
        MaskPolicy {
            keep: Keep::FirstSixLastFour,
            mask_char: b'*',
        },
        MaskPolicy {
            keep: Keep::LastFour,
            mask_char: b'#',
        },
        MaskPolicy {
            keep: Keep::Nothing,
            mask_char: b'X',
        },
    ];

    #[test]
    fn stream_matches_whole_generated() {
        let mut generator = Generator(0x9e37_79b9_7f4a_7c15);
        for round in 0..3000 {
            let input = generator.input();
            let policy = POLICIES[round % POLICIES.len()].clone();
            let mut pieces = Vec::new();
            let mut rest = input.as_slice();
            while !rest.is_empty() {
                let (piece, tail) = rest.split_at(generator.below(rest.len() + 1).max(1));
                pieces.push(piece);
                rest = tail;
            }

            assert_eq!(
                streamed(&pieces, &policy),
                whole(&input, &policy),
                "{}",
                String::from_utf8_lossy(&input)
            );
        }
    }

    /// Masks by the PAN rule read literally, trying every digit span of the input with no runs,
    /// no scan state and no carry. Slow, and only for comparing with the scanner.
    fn reference_mask(input: &[u8], policy: &MaskPolicy) -> (Vec<u8>, usize) {
        let is_digit = |index: usize| input.get(index).is_some_and(u8::is_ascii_digit);
        let is_separator = |index: usize| matches!(input.get(index), Some(b' ' | b'-'));
        let mut output = input.to_vec();
        let mut count = 0;

        for start in 0..input.len() {
            if !is_digit(start) || (start > 0 && is_digit(start - 1)) {
                continue;
            }
            for end in start + 1..=input.len() {
                if !is_digit(end - 1) || is_digit(end) {
                    continue;
                }
                let span = &input[start..end];

                // Digits with single separators of one kind between them.
                let separators: Vec<u8> = span
                    .iter()
                    .copied()
                    .filter(|byte| !byte.is_ascii_digit())
                    .collect();
                if separators.iter().any(|&byte| byte != b' ' && byte != b'-')
                    || separators.windows(2).any(|pair| pair[0] != pair[1])
                    || span
                        .windows(2)
                        .any(|pair| !pair[0].is_ascii_digit() && !pair[1].is_ascii_digit())
                {
                    continue;
                }
                let digits: Vec<u8> = span
                    .iter()
                    .filter(|byte| byte.is_ascii_digit())
                    .map(|byte| byte - b'0')
                    .collect();
                if !(13..=19).contains(&digits.len()) {
                    continue;
                }

                // Not part of a decimal number.
                if start >= 2 && input[start - 1] == b'.' && is_digit(start - 2) {
                    continue;
                }
                if input.get(end) == Some(&b'.') && is_digit(end + 1) {
                    continue;
                }

                // Part of more than 19 digits joined by single separators of any kind only at
                // the start or the end of them.
                let mut left = start;
                while left >= 2 && is_separator(left - 1) && is_digit(left - 2) {
                    left -= 2;
                    while left > 0 && is_digit(left - 1) {
                        left -= 1;
                    }
                }
                let mut right = end;
                while is_separator(right) && is_digit(right + 1) {
                    right += 2;
                    while is_digit(right) {
                        right += 1;
                    }
                }
                let joined = input[left..right]
                    .iter()
                    .filter(|byte| byte.is_ascii_digit())
                    .count();
                if joined > 19 && start != left && end != right {
                    continue;
                }

                // The issuer table is the code's own; `issuer_range_bounds` tests it.
                let number: String = digits
                    .iter()
                    .map(|&digit| char::from(b'0' + digit))
                    .collect();
                if issuer(&digits).is_none() || !luhn_valid(&number) {
                    continue;
                }

                let (keep_first, keep_last) = match policy.keep {
                    Keep::FirstSixLastFour => (6, 4),
                    Keep::LastFour => (0, 4),
                    Keep::Nothing => (0, 0),
                };
                let digit_positions = (start..end).filter(|&index| is_digit(index));
                for (rank, index) in digit_positions.enumerate() {
                    if rank >= keep_first && rank + keep_last < digits.len() {
                        output[index] = policy.mask_char;
                    }
                }
                count += 1;
            }
        }
        (output, count)
    }

    #[test]
    fn matches_reference_generated() {
        let mut generator = Generator(0x0123_4567_89ab_cdef);
        let mut total_masked = 0;
        for round in 0..3000 {
            let input = generator.input();
            let policy = POLICIES[round % POLICIES.len()].clone();
            let expected = reference_mask(&input, &policy);
            total_masked += expected.1;

            assert_eq!(
                whole(&input, &policy),
                expected,
                "{}",
                String::from_utf8_lossy(&input)
            );
        }
        // The generator must reach real PANs for the comparison to mean anything.
        assert!(total_masked > 500, "only {total_masked} PANs generated");
    }

    #[test]
    fn matches_reference_examples() {
        let policy = MaskPolicy::default();
        for case in SPLIT_CASES {
            assert_eq!(
                whole(case.as_bytes(), &policy),
                reference_mask(case.as_bytes(), &policy),
                "{case}"
            );
        }
    }
}
