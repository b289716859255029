//! The MySQL client/server packet format: the reader both directions share, the writer that
//! splits payloads back into packets, and the small field readers the handler needs.
//!
//! # Format
//!
//! A packet is a 3-byte little-endian payload length, a 1-byte sequence id, and the payload:
//! `09 00 00 00 03 "SELECT 1"` is a COM_QUERY (command byte `03`) of 9 bytes. A payload of
//! 16,777,215 bytes (`MAX_PACKET_LEN`) or more is sent as packets of exactly that length
//! followed by one shorter packet, which is empty when the payload is an exact multiple. Each
//! packet of an exchange carries the next sequence id, modulo 256.
//!
//! The reader checks every declared length against the limit of the current phase before it
//! reserves memory, counting the continuation packets of one payload together. Payloads are
//! read whole only by callers that must inspect them. Everything else is handed out in pieces
//! of at most `PIECE_LEN` bytes, so a payload of any size passes with bounded memory.

use std::{fmt, io};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// Largest payload of one packet (`0xffffff`); a packet this long is continued by the next.
pub const MAX_PACKET_LEN: usize = 0xff_ffff;
/// Largest piece of a streamed payload the reader hands out at once.
pub const PIECE_LEN: usize = 1024 * 1024;
/// Largest payload accepted before authentication ends. A greeting, a handshake response with
/// connection attributes, a scramble or an RSA public key are each a few KiB at most, so a
/// longer declared length is invalid input, and it is rejected before anything is allocated.
pub const MAX_AUTH_PAYLOAD: usize = 64 * 1024;
/// Largest payload accepted after authentication: 1 GiB is the highest `max_allowed_packet`
/// MySQL and MariaDB accept, so neither server can send or take a longer one.
pub const MAX_COMMAND_PAYLOAD: usize = 1024 * 1024 * 1024;

/// Errors of the packet reader and field parsers. Each one ends the session it happened in.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("connection closed in the middle of a packet ({received} of {expected} bytes)")]
    UnexpectedEof { received: usize, expected: usize },
    #[error(
        "payload of {length} bytes or more is longer than the {limit}-byte limit of the {phase} phase"
    )]
    TooLong {
        length: usize,
        limit: usize,
        phase: &'static str,
    },
    #[error("packet out of order: sequence id {received}, expected {expected}")]
    Sequence { received: u8, expected: u8 },
    #[error("malformed {packet}: {reason}")]
    Malformed {
        packet: &'static str,
        reason: &'static str,
    },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Header of one packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Payload length of this packet alone.
    pub len: usize,
    pub seq: u8,
}

impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Header({} bytes, seq {})", self.len, self.seq)
    }
}

impl Header {
    /// Tells whether another packet of the same payload follows this one.
    pub fn continues(&self) -> bool {
        self.len == MAX_PACKET_LEN
    }

    pub fn encode(&self) -> [u8; 4] {
        let len = (self.len as u32).to_le_bytes();
        [len[0], len[1], len[2], self.seq]
    }
}

/// Length limit of a protocol phase, with its name for error messages.
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    pub max: usize,
    pub phase: &'static str,
}

pub const AUTH_LIMIT: Limit = Limit {
    max: MAX_AUTH_PAYLOAD,
    phase: "authentication",
};
pub const COMMAND_LIMIT: Limit = Limit {
    max: MAX_COMMAND_PAYLOAD,
    phase: "command",
};

/// A whole payload read from one or more packets.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload {
    pub data: Bytes,
    /// Sequence id of the first packet.
    pub first_seq: u8,
    /// Sequence id of the last packet (the empty trailer, if there was one).
    pub last_seq: u8,
}

impl fmt::Debug for Payload {
    /// Shows the length and sequence ids, never the content: payloads carry statements, rows
    /// and passwords.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Payload({} bytes, seq {}..={})",
            self.data.len(),
            self.first_seq,
            self.last_seq
        )
    }
}

/// Reads MySQL packets from one direction of a connection.
pub struct PacketReader<R> {
    inner: R,
    buffer: BytesMut,
}

impl<R> fmt::Debug for PacketReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PacketReader")
            .field("buffered", &self.buffer.len())
            .finish()
    }
}

impl<R: AsyncRead + Unpin> PacketReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buffer: BytesMut::with_capacity(8 * 1024),
        }
    }

    /// Bytes already read from the socket and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Reads until `len` bytes are buffered; `Ok(false)` on a clean end of stream before the
    /// first byte.
    async fn fill(&mut self, len: usize) -> Result<bool, PacketError> {
        while self.buffer.len() < len {
            if self.buffer.capacity() - self.buffer.len() < len - self.buffer.len() {
                self.buffer.reserve(len - self.buffer.len());
            }
            let read = self.inner.read_buf(&mut self.buffer).await?;
            if read == 0 {
                if self.buffer.is_empty() {
                    return Ok(false);
                }
                return Err(PacketError::UnexpectedEof {
                    received: self.buffer.len(),
                    expected: len,
                });
            }
        }
        Ok(true)
    }

    /// Reads the next packet header; `None` on a clean end of stream between packets.
    /// `so_far` is the length of the payload read before this packet (0 for a new payload),
    /// so the limit covers the whole payload.
    pub async fn read_header(
        &mut self,
        limit: Limit,
        so_far: usize,
    ) -> Result<Option<Header>, PacketError> {
        if !self.fill(4).await? {
            return Ok(None);
        }
        let len = usize::from(self.buffer[0])
            | usize::from(self.buffer[1]) << 8
            | usize::from(self.buffer[2]) << 16;
        let seq = self.buffer[3];
        let total = so_far + len;
        // A full packet promises at least one more (possibly empty) packet, so it counts as one
        // byte longer.
        let at_least = total + usize::from(len == MAX_PACKET_LEN);
        if at_least > limit.max {
            return Err(PacketError::TooLong {
                length: at_least,
                limit: limit.max,
                phase: limit.phase,
            });
        }
        self.buffer.advance(4);
        Ok(Some(Header { len, seq }))
    }

    /// Reads the header of a continuation packet, which must follow a full packet with the next
    /// sequence id.
    pub async fn read_continuation(
        &mut self,
        previous: Header,
        limit: Limit,
        so_far: usize,
    ) -> Result<Header, PacketError> {
        let header = self
            .read_header(limit, so_far)
            .await?
            .ok_or(PacketError::UnexpectedEof {
                received: 0,
                expected: 4,
            })?;
        let expected = previous.seq.wrapping_add(1);
        if header.seq != expected {
            return Err(PacketError::Sequence {
                received: header.seq,
                expected,
            });
        }
        Ok(header)
    }

    /// Returns the first `len` bytes of the body ahead without consuming them; `len` must not
    /// exceed the packet's length.
    pub async fn peek(&mut self, len: usize) -> Result<Bytes, PacketError> {
        if !self.fill(len).await? {
            return Err(PacketError::UnexpectedEof {
                received: 0,
                expected: len,
            });
        }
        Ok(Bytes::copy_from_slice(&self.buffer[..len]))
    }

    /// Reads a packet body whole.
    pub async fn read_body(&mut self, len: usize) -> Result<Bytes, PacketError> {
        if !self.fill(len).await? {
            return Err(PacketError::UnexpectedEof {
                received: 0,
                expected: len,
            });
        }
        Ok(self.buffer.split_to(len).freeze())
    }

    /// Reads the next piece of a packet body: at most `left` bytes and at most `PIECE_LEN`,
    /// whatever is available once at least one byte is.
    pub async fn read_piece(&mut self, left: usize) -> Result<Bytes, PacketError> {
        if self.buffer.is_empty() && !self.fill(1).await? {
            return Err(PacketError::UnexpectedEof {
                received: 0,
                expected: left,
            });
        }
        let take = left.min(self.buffer.len()).min(PIECE_LEN);
        Ok(self.buffer.split_to(take).freeze())
    }

    /// Reads a whole payload, joining continuation packets. `None` on a clean end of stream
    /// before the first packet.
    pub async fn read_payload(&mut self, limit: Limit) -> Result<Option<Payload>, PacketError> {
        let Some(first) = self.read_header(limit, 0).await? else {
            return Ok(None);
        };
        self.read_payload_after(first, limit).await.map(Some)
    }

    /// Reads the rest of a payload whose first header was already read.
    pub async fn read_payload_after(
        &mut self,
        first: Header,
        limit: Limit,
    ) -> Result<Payload, PacketError> {
        let body = self.read_body(first.len).await?;
        if !first.continues() {
            return Ok(Payload {
                data: body,
                first_seq: first.seq,
                last_seq: first.seq,
            });
        }
        let mut data = BytesMut::from(&body[..]);
        let mut header = first;
        while header.continues() {
            header = self.read_continuation(header, limit, data.len()).await?;
            let body = self.read_body(header.len).await?;
            data.put_slice(&body);
        }
        Ok(Payload {
            data: data.freeze(),
            first_seq: first.seq,
            last_seq: header.seq,
        })
    }
}

/// Encodes `payload` as packets starting at sequence id `seq`, with the empty trailer after an
/// exact multiple of `MAX_PACKET_LEN`. Returns the sequence id of the last packet.
pub fn encode_payload(out: &mut BytesMut, mut seq: u8, payload: &[u8]) -> u8 {
    let mut rest = payload;
    loop {
        let len = rest.len().min(MAX_PACKET_LEN);
        out.put_slice(&Header { len, seq }.encode());
        out.put_slice(&rest[..len]);
        rest = &rest[len..];
        if len < MAX_PACKET_LEN {
            return seq;
        }
        seq = seq.wrapping_add(1);
    }
}

/// Writes `payload` as packets starting at sequence id `seq`; returns the last sequence id.
pub async fn write_payload<W: AsyncWrite + Unpin>(
    writer: &mut W,
    seq: u8,
    payload: &[u8],
) -> io::Result<u8> {
    let mut rest = payload;
    let mut seq = seq;
    loop {
        let len = rest.len().min(MAX_PACKET_LEN);
        writer.write_all(&Header { len, seq }.encode()).await?;
        writer.write_all(&rest[..len]).await?;
        rest = &rest[len..];
        if len < MAX_PACKET_LEN {
            return Ok(seq);
        }
        seq = seq.wrapping_add(1);
    }
}

/// Builds an ERR packet payload (protocol 4.1 form, with a SQLSTATE marker).
pub fn err_payload(code: u16, sqlstate: &str, message: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(9 + message.len());
    out.put_u8(ERR_HEADER);
    out.put_u16_le(code);
    out.put_u8(b'#');
    let mut state = [b'0'; 5];
    for (slot, byte) in state.iter_mut().zip(sqlstate.bytes()) {
        *slot = byte;
    }
    out.put_slice(&state);
    out.put_slice(message.as_bytes());
    out.freeze()
}

/// First payload byte of an OK packet.
pub const OK_HEADER: u8 = 0x00;
/// First payload byte of an ERR packet.
pub const ERR_HEADER: u8 = 0xff;
/// First payload byte of an EOF packet, and of the OK packet that ends a result set when
/// `CLIENT_DEPRECATE_EOF` is on.
pub const EOF_HEADER: u8 = 0xfe;
/// Lenenc marker of a NULL column in a text row, and first byte of a LOCAL INFILE request.
pub const NULL_MARKER: u8 = 0xfb;

/// Tells whether a server payload ends a result set or a column list: an EOF or OK packet with
/// the `0xfe` header. A row can start with `0xfe` too (a lenenc length of 2^24 or more), but then
/// it is at least 2^24 bytes long, so the length tells them apart.
pub fn is_eof(first_byte: u8, payload_len: usize) -> bool {
    first_byte == EOF_HEADER && payload_len < MAX_PACKET_LEN
}

/// A cursor over a payload with the reads the protocol needs, each failing with a `Malformed`
/// error instead of panicking on short input.
#[derive(Debug)]
pub struct FieldReader<'a> {
    data: &'a [u8],
    packet: &'static str,
}

impl<'a> FieldReader<'a> {
    pub fn new(data: &'a [u8], packet: &'static str) -> Self {
        Self { data, packet }
    }

    fn short(&self) -> PacketError {
        PacketError::Malformed {
            packet: self.packet,
            reason: "payload shorter than its fields",
        }
    }

    pub fn remaining(&self) -> usize {
        self.data.len()
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    pub fn bytes(&mut self, len: usize) -> Result<&'a [u8], PacketError> {
        if self.data.len() < len {
            return Err(self.short());
        }
        let (head, tail) = self.data.split_at(len);
        self.data = tail;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, PacketError> {
        Ok(self.bytes(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, PacketError> {
        let bytes = self.bytes(2)?;
        Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, PacketError> {
        let bytes = self.bytes(4)?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
    }

    /// Reads a NUL-terminated string, without the NUL.
    pub fn cstr(&mut self) -> Result<&'a [u8], PacketError> {
        let end = self
            .data
            .iter()
            .position(|&b| b == 0)
            .ok_or(PacketError::Malformed {
                packet: self.packet,
                reason: "string without its terminating NUL",
            })?;
        let value = &self.data[..end];
        self.data = &self.data[end + 1..];
        Ok(value)
    }

    /// Reads a length-encoded integer; `None` for the NULL marker `0xfb`.
    pub fn lenenc(&mut self) -> Result<Option<u64>, PacketError> {
        let first = self.u8()?;
        let value = match first {
            0..=0xfa => u64::from(first),
            NULL_MARKER => return Ok(None),
            0xfc => u64::from(self.u16()?),
            0xfd => {
                let bytes = self.bytes(3)?;
                u64::from(bytes[0]) | u64::from(bytes[1]) << 8 | u64::from(bytes[2]) << 16
            }
            0xfe => u64::from_le_bytes(self.bytes(8)?.try_into().expect("8 bytes")),
            _ => {
                return Err(PacketError::Malformed {
                    packet: self.packet,
                    reason: "0xff is not a length-encoded integer",
                });
            }
        };
        Ok(Some(value))
    }

    /// Reads a length-encoded string.
    pub fn lenenc_bytes(&mut self) -> Result<&'a [u8], PacketError> {
        let len = self.lenenc()?.ok_or(PacketError::Malformed {
            packet: self.packet,
            reason: "NULL where a string is required",
        })?;
        let len = usize::try_from(len).map_err(|_| self.short())?;
        self.bytes(len)
    }
}

/// Number of bytes of the length-encoded integer that starts with `first`, marker included.
pub fn lenenc_size(first: u8) -> usize {
    match first {
        0xfc => 3,
        0xfd => 4,
        0xfe => 9,
        _ => 1,
    }
}

/// Appends a length-encoded integer.
pub fn put_lenenc(out: &mut BytesMut, value: u64) {
    match value {
        0..=0xfa => out.put_u8(value as u8),
        0xfb..=0xffff => {
            out.put_u8(0xfc);
            out.put_u16_le(value as u16);
        }
        0x1_0000..=0xff_ffff => {
            out.put_u8(0xfd);
            out.put_slice(&(value as u32).to_le_bytes()[..3]);
        }
        _ => {
            out.put_u8(0xfe);
            out.put_u64_le(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(bytes: &[u8], limit: Limit) -> Result<Vec<Payload>, PacketError> {
        let mut reader = PacketReader::new(bytes);
        let mut payloads = Vec::new();
        while let Some(payload) = reader.read_payload(limit).await? {
            payloads.push(payload);
        }
        Ok(payloads)
    }

    #[tokio::test]
    async fn payload_sizes_round_trip() {
        for size in [
            0,
            1,
            MAX_PACKET_LEN - 1,
            MAX_PACKET_LEN,
            MAX_PACKET_LEN + 1,
            2 * MAX_PACKET_LEN,
        ] {
            let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let mut wire = BytesMut::new();
            let last = encode_payload(&mut wire, 3, &payload);
            let packets = size / MAX_PACKET_LEN + 1;
            assert_eq!(wire.len(), size + 4 * packets, "wire length for {size}");
            assert_eq!(usize::from(last), 3 + packets - 1, "last seq for {size}");

            let read = read_all(&wire, COMMAND_LIMIT).await.expect("valid packets");
            assert_eq!(read.len(), 1, "one payload for {size}");
            assert_eq!(read[0].data.len(), size);
            assert!(read[0].data[..] == payload[..], "content for {size}");
            assert_eq!(read[0].first_seq, 3);
            assert_eq!(read[0].last_seq, last);
        }
    }

    #[tokio::test]
    async fn exact_multiple_waits_for_trailer() {
        let payload = vec![b'x'; MAX_PACKET_LEN];
        let mut wire = BytesMut::new();
        encode_payload(&mut wire, 0, &payload);
        // Without the empty trailer the payload is incomplete.
        let cut = &wire[..wire.len() - 4];
        let error = read_all(cut, COMMAND_LIMIT)
            .await
            .expect_err("missing trailer");
        assert!(
            matches!(error, PacketError::UnexpectedEof { .. }),
            "{error}"
        );
    }

    #[tokio::test]
    async fn length_over_limit_rejected_before_reading() {
        // A header declaring a full packet in the authentication phase, with no body at all.
        let wire = [0xff, 0xff, 0xff, 1];
        let error = read_all(&wire, AUTH_LIMIT).await.expect_err("too long");
        assert!(matches!(error, PacketError::TooLong { .. }), "{error}");
    }

    #[tokio::test]
    async fn eof_mid_packet_reported() {
        let wire = [10, 0, 0, 0, b'a', b'b'];
        let error = read_all(&wire, COMMAND_LIMIT).await.expect_err("short");
        assert!(
            matches!(error, PacketError::UnexpectedEof { .. }),
            "{error}"
        );
    }

    #[tokio::test]
    async fn continuation_out_of_order_rejected() {
        let mut wire = BytesMut::new();
        encode_payload(&mut wire, 0, &vec![0u8; MAX_PACKET_LEN]);
        let trailer = wire.len() - 1;
        wire[trailer] = 7;
        let error = read_all(&wire, COMMAND_LIMIT).await.expect_err("bad seq");
        assert!(
            matches!(
                error,
                PacketError::Sequence {
                    received: 7,
                    expected: 1
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn eof_told_apart_from_rows_by_length() {
        assert!(is_eof(EOF_HEADER, 5));
        assert!(is_eof(EOF_HEADER, 40));
        assert!(!is_eof(EOF_HEADER, MAX_PACKET_LEN));
        assert!(!is_eof(0x03, 5));
    }

    #[test]
    fn lenenc_round_trip() {
        for value in [
            0,
            250,
            251,
            0xffff,
            0x1_0000,
            0xff_ffff,
            0x100_0000,
            u64::MAX,
        ] {
            let mut out = BytesMut::new();
            put_lenenc(&mut out, value);
            assert_eq!(out.len(), lenenc_size(out[0]), "size of {value}");
            let mut reader = FieldReader::new(&out, "test");
            assert_eq!(reader.lenenc().expect("valid"), Some(value));
        }
    }

    #[test]
    fn err_payload_layout() {
        let payload = err_payload(1142, "42000", "denied");
        assert_eq!(&payload[..3], &[0xff, 0x76, 0x04]);
        assert_eq!(&payload[3..9], b"#42000");
        assert_eq!(&payload[9..], b"denied");
    }
}
