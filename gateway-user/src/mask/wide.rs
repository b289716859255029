//! Text in encodings whose ASCII characters take more than one byte (UTF-16, UTF-32), masked
//! one code unit per character.

use super::{MaskPolicy, StreamMasker};

/// A character encoding whose ASCII characters take more than one byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wide {
    /// `ucs2` and `utf16`: 2-byte big-endian code units.
    Utf16Be,
    /// `utf16le`.
    Utf16Le,
    /// `utf32`: 4-byte big-endian code units.
    Utf32Be,
}

impl Wide {
    pub(crate) fn unit_len(self) -> usize {
        match self {
            Wide::Utf16Be | Wide::Utf16Le => 2,
            Wide::Utf32Be => 4,
        }
    }

    /// Returns the ASCII character a code unit encodes, or `0x80` (an ordinary byte to the
    /// scanner) for any other character.
    pub(crate) fn ascii(self, unit: &[u8]) -> u8 {
        let value = match self {
            Wide::Utf16Be => u32::from(u16::from_be_bytes([unit[0], unit[1]])),
            Wide::Utf16Le => u32::from(u16::from_le_bytes([unit[0], unit[1]])),
            Wide::Utf32Be => u32::from_be_bytes([unit[0], unit[1], unit[2], unit[3]]),
        };
        u8::try_from(value)
            .ok()
            .filter(u8::is_ascii)
            .unwrap_or(0x80)
    }

    /// Appends the code unit of the ASCII character `byte`.
    pub(crate) fn encode(self, byte: u8, out: &mut Vec<u8>) {
        match self {
            Wide::Utf16Be => out.extend_from_slice(&[0, byte]),
            Wide::Utf16Le => out.extend_from_slice(&[byte, 0]),
            Wide::Utf32Be => out.extend_from_slice(&[0, 0, 0, byte]),
        }
    }
}

/// Masks a text value in a wide encoding as it streams: each code unit is read as the ASCII
/// character it encodes, the scanner masks those, and a masked digit goes back as the code
/// unit of the mask character. The output has the input's length.
pub struct WideText {
    wide: Wide,
    masker: StreamMasker,
    /// Bytes of a code unit cut by the end of the input.
    partial: Vec<u8>,
    /// Code units the masker has not settled yet.
    units: std::collections::VecDeque<u8>,
    projected: Vec<u8>,
    settled: Vec<u8>,
}

impl WideText {
    pub fn new(wide: Wide, policy: MaskPolicy) -> Self {
        Self {
            wide,
            masker: StreamMasker::new(policy),
            partial: Vec::new(),
            units: std::collections::VecDeque::new(),
            projected: Vec::new(),
            settled: Vec::new(),
        }
    }

    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let unit = self.wide.unit_len();
        self.projected.clear();
        for &byte in input {
            self.partial.push(byte);
            if self.partial.len() == unit {
                self.projected.push(self.wide.ascii(&self.partial));
                self.units.extend(self.partial.drain(..));
            }
        }
        self.settled.clear();
        let masked = self.masker.feed(&self.projected, &mut self.settled);
        self.write_settled(out);
        masked
    }

    /// Writes out what is held back, and a cut-off code unit as it came.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> usize {
        self.settled.clear();
        let masked = self.masker.finish(&mut self.settled);
        self.write_settled(out);
        out.append(&mut self.partial);
        masked
    }

    fn write_settled(&mut self, out: &mut Vec<u8>) {
        let unit = self.wide.unit_len();
        for index in 0..self.settled.len() {
            let original: Vec<u8> = self.units.drain(..unit).collect();
            if self.wide.ascii(&original) == self.settled[index] {
                out.extend_from_slice(&original);
            } else {
                self.wide.encode(self.settled[index], out);
            }
        }
    }
}

/// Masks `value`, text whose character set is not known, in each wide encoding in turn, when
/// it has a NUL byte: the names and messages of a session whose `character_set_results` is a
/// wide one. A pass changes only code units that are ASCII digits in its own encoding.
pub fn mask_wide_text(value: &mut [u8], policy: &MaskPolicy) -> usize {
    if !value.contains(&0) {
        return 0;
    }
    let mut masked = 0;
    for wide in [Wide::Utf16Be, Wide::Utf16Le, Wide::Utf32Be] {
        let mut text = WideText::new(wide, policy.clone());
        let mut out = Vec::with_capacity(value.len());
        let found = text.feed(value, &mut out) + text.finish(&mut out);
        if found > 0 && out.len() == value.len() {
            value.copy_from_slice(&out);
            masked += found;
        }
    }
    masked
}

impl std::fmt::Debug for WideText {
    /// Shows the encoding, never the bytes held back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WideText")
            .field("wide", &self.wide)
            .finish_non_exhaustive()
    }
}
