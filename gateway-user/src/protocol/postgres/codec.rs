//! The PostgreSQL v3 wire format: the frame reader both directions share, the message tags, and
//! the few encoders the proxy needs for messages it writes itself.
//!
//! # Format
//!
//! Every message after startup is a one-byte tag, a big-endian `i32` length that counts itself
//! but not the tag, and the body: `Q 00 00 00 0d "SELECT 1\0"`. Startup-phase packets
//! (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest) have no tag: a length, then a
//! 4-byte code, then the body.
//!
//! The reader checks every declared length against a limit before it reserves memory. Bodies up
//! to `HOLD_LIMIT` are read whole so the proxy can inspect them. Longer ones are handed out in
//! pieces of at most `HOLD_LIMIT` bytes, so a message of any size passes with bounded memory.

use std::{fmt, io};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// Largest body the proxy reads whole for inspection (statements, rows, errors). Larger
/// messages are streamed in pieces of this size.
pub const HOLD_LIMIT: usize = 1024 * 1024;
/// Largest startup packet accepted, the same limit PostgreSQL applies
/// (`MAX_STARTUP_PACKET_LENGTH` in `src/include/libpq/pqcomm.h`).
pub const MAX_STARTUP_LEN: u32 = 10_000;
/// Largest regular message accepted: PostgreSQL itself cannot allocate more than 1 GiB - 1
/// for one value (`MaxAllocSize`), so a longer declared length is invalid input.
pub const MAX_MESSAGE_LEN: u32 = 0x3fff_ffff;
/// Largest message accepted during authentication: SASL exchanges and passwords are small, and
/// PostgreSQL caps them at 10,000 bytes too (`PQ_SMALL_MESSAGE_LIMIT`).
pub const MAX_AUTH_MESSAGE_LEN: u32 = 10_000;

/// Startup codes, the first four body bytes of an untagged packet.
pub const PROTOCOL_3_0: u32 = 196_608;
pub const PROTOCOL_3_2: u32 = 196_610;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// Cancel keys are 4 bytes in protocol 3.0 and up to 256 bytes in 3.2.
pub const MIN_CANCEL_KEY_LEN: usize = 4;
pub const MAX_CANCEL_KEY_LEN: usize = 256;

/// Errors of the frame reader. Each one ends the session it happened in.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("connection closed in the middle of a message ({received} of {expected} bytes)")]
    UnexpectedEof { received: usize, expected: usize },
    #[error("declared message length {length} is invalid: {reason}")]
    InvalidLength { length: i64, reason: &'static str },
    #[error("malformed {message}: {reason}")]
    Malformed {
        message: &'static str,
        reason: &'static str,
    },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Header of a tagged message.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// Body length, without the tag and the length field itself.
    pub body_len: usize,
}

impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Header({:?}, {} bytes)",
            char::from(self.tag),
            self.body_len
        )
    }
}

impl Header {
    /// Tells whether the body fits under `HOLD_LIMIT` and is read whole.
    pub fn is_held(&self) -> bool {
        self.body_len <= HOLD_LIMIT
    }

    /// Encodes the tag and length field.
    pub fn encode(&self) -> [u8; 5] {
        let mut out = [0u8; 5];
        out[0] = self.tag;
        out[1..].copy_from_slice(&((self.body_len + 4) as u32).to_be_bytes());
        out
    }
}

/// Reads PostgreSQL frames from one direction of a connection.
pub struct FrameReader<R> {
    inner: R,
    buffer: BytesMut,
}

impl<R> fmt::Debug for FrameReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameReader")
            .field("buffered", &self.buffer.len())
            .finish()
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
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
    async fn fill(&mut self, len: usize) -> Result<bool, CodecError> {
        while self.buffer.len() < len {
            if self.buffer.capacity() - self.buffer.len() < len - self.buffer.len() {
                self.buffer.reserve(len - self.buffer.len());
            }
            let read = self.inner.read_buf(&mut self.buffer).await?;
            if read == 0 {
                if self.buffer.is_empty() {
                    return Ok(false);
                }
                return Err(CodecError::UnexpectedEof {
                    received: self.buffer.len(),
                    expected: len,
                });
            }
        }
        Ok(true)
    }

    /// Reads an untagged startup packet whole and returns its body (code included); `None` on
    /// a clean end of stream.
    pub async fn read_startup(&mut self) -> Result<Option<Bytes>, CodecError> {
        if !self.fill(4).await? {
            return Ok(None);
        }
        let declared = i32::from_be_bytes(self.buffer[..4].try_into().expect("4 bytes"));
        if declared < 8 || declared as u32 > MAX_STARTUP_LEN {
            return Err(CodecError::InvalidLength {
                length: i64::from(declared),
                reason: "a startup packet is 8 to 10000 bytes long",
            });
        }
        let total = declared as usize;
        self.fill_body(total).await?;
        self.buffer.advance(4);
        Ok(Some(self.buffer.split_to(total - 4).freeze()))
    }

    async fn fill_body(&mut self, total: usize) -> Result<(), CodecError> {
        if !self.fill(total).await? {
            return Err(CodecError::UnexpectedEof {
                received: 0,
                expected: total,
            });
        }
        Ok(())
    }

    /// Reads the next message header; `None` on a clean end of stream between messages.
    /// `max_len` bounds the declared length (the body plus the length field).
    pub async fn read_header(&mut self, max_len: u32) -> Result<Option<Header>, CodecError> {
        self.read_header_within(|| max_len).await
    }

    /// Reads the next message header like [`Self::read_header`], with the bound taken once the
    /// header has arrived, so it follows the protocol phase the peer is in at that moment, not
    /// the one it was in when the wait began.
    pub async fn read_header_within(
        &mut self,
        max_len: impl FnOnce() -> u32,
    ) -> Result<Option<Header>, CodecError> {
        if !self.fill(5).await? {
            return Ok(None);
        }
        let max_len = max_len();
        let tag = self.buffer[0];
        let declared = i32::from_be_bytes(self.buffer[1..5].try_into().expect("4 bytes"));
        if declared < 4 {
            return Err(CodecError::InvalidLength {
                length: i64::from(declared),
                reason: "the length field counts itself, so it is at least 4",
            });
        }
        if declared as u32 > max_len {
            return Err(CodecError::InvalidLength {
                length: i64::from(declared),
                reason: "longer than the limit for this phase of the protocol",
            });
        }
        self.buffer.advance(5);
        Ok(Some(Header {
            tag,
            body_len: declared as usize - 4,
        }))
    }

    /// Reads a body whole. Callers read bodies over `HOLD_LIMIT` whole only where they must
    /// inspect them (statements), under a limit of their own.
    pub async fn read_body(&mut self, header: Header) -> Result<Bytes, CodecError> {
        self.fill_body(header.body_len).await?;
        Ok(self.buffer.split_to(header.body_len).freeze())
    }

    /// Reads the next piece of a streamed body: at most `left` bytes and at most `HOLD_LIMIT`,
    /// whatever is available once at least one byte is.
    pub async fn read_piece(&mut self, left: usize) -> Result<Bytes, CodecError> {
        if self.buffer.is_empty() && !self.fill(1).await? {
            return Err(CodecError::UnexpectedEof {
                received: 0,
                expected: left,
            });
        }
        let take = left.min(self.buffer.len()).min(HOLD_LIMIT);
        Ok(self.buffer.split_to(take).freeze())
    }
}

/// A cursor over a message body with the reads the protocol needs, each failing with a
/// `Malformed` error instead of panicking on short input.
#[derive(Debug)]
pub struct BodyReader<'a> {
    body: &'a [u8],
    message: &'static str,
}

impl<'a> BodyReader<'a> {
    pub fn new(body: &'a [u8], message: &'static str) -> Self {
        Self { body, message }
    }

    fn short(&self) -> CodecError {
        CodecError::Malformed {
            message: self.message,
            reason: "body shorter than its fields",
        }
    }

    pub fn remaining(&self) -> usize {
        self.body.len()
    }

    pub fn u8(&mut self) -> Result<u8, CodecError> {
        let (&first, rest) = self.body.split_first().ok_or_else(|| self.short())?;
        self.body = rest;
        Ok(first)
    }

    pub fn i16(&mut self) -> Result<i16, CodecError> {
        let bytes = self.bytes(2)?;
        Ok(i16::from_be_bytes([bytes[0], bytes[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, CodecError> {
        let bytes = self.bytes(4)?;
        Ok(i32::from_be_bytes(bytes.try_into().expect("4 bytes")))
    }

    pub fn bytes(&mut self, len: usize) -> Result<&'a [u8], CodecError> {
        if self.body.len() < len {
            return Err(self.short());
        }
        let (taken, rest) = self.body.split_at(len);
        self.body = rest;
        Ok(taken)
    }

    /// Reads a NUL-terminated string, without the NUL.
    pub fn cstr(&mut self) -> Result<&'a [u8], CodecError> {
        let end = self
            .body
            .iter()
            .position(|&b| b == 0)
            .ok_or(CodecError::Malformed {
                message: self.message,
                reason: "string without its NUL terminator",
            })?;
        let text = &self.body[..end];
        self.body = &self.body[end + 1..];
        Ok(text)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.body)
    }
}

/// Encodes an ErrorResponse (`E`) with severity ERROR, the SQLSTATE and the message.
pub fn error_response(sqlstate: &str, message: &str) -> Bytes {
    let mut body = BytesMut::new();
    for (field, value) in [
        (b'S', "ERROR"),
        (b'V', "ERROR"),
        (b'C', sqlstate),
        (b'M', message),
    ] {
        body.put_u8(field);
        body.put_slice(value.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    frame(b'E', &body)
}

/// Encodes a tagged message from its body.
pub fn frame(tag: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(tag);
    out.put_u32((body.len() + 4) as u32);
    out.put_slice(body);
    out.freeze()
}

/// Reads the fields of an ErrorResponse or NoticeResponse body as (code, value) pairs.
pub fn error_fields(body: &[u8]) -> Vec<(u8, &[u8])> {
    let mut fields = Vec::new();
    let mut reader = BodyReader::new(body, "ErrorResponse");
    while let Ok(code) = reader.u8() {
        if code == 0 {
            break;
        }
        match reader.cstr() {
            Ok(value) => fields.push((code, value)),
            Err(_) => break,
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reader_same_frames_any_split() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&frame(b'Q', b"SELECT 1\0"));
        stream.extend_from_slice(&frame(b'S', b""));
        stream.extend_from_slice(&frame(b'X', b""));
        for piece in 1..=stream.len() {
            let (client, mut server) = tokio::io::duplex(64);
            let data = stream.clone();
            let writer = tokio::spawn(async move {
                for chunk in data.chunks(piece) {
                    tokio::io::AsyncWriteExt::write_all(&mut server, chunk)
                        .await
                        .expect("write");
                }
            });
            let mut reader = FrameReader::new(client);
            let mut tags = Vec::new();
            while let Some(header) = reader.read_header(MAX_MESSAGE_LEN).await.expect("header") {
                let body = reader.read_body(header).await.expect("body");
                tags.push((header.tag, body.len()));
            }
            writer.await.expect("writer");
            assert_eq!(
                tags,
                [(b'Q', 9), (b'S', 0), (b'X', 0)],
                "piece size {piece}"
            );
        }
    }

    #[tokio::test]
    async fn reader_rejects_huge_length() {
        let bytes = [b'Q', 0x7f, 0xff, 0xff, 0xff];
        let mut reader = FrameReader::new(&bytes[..]);
        let error = reader
            .read_header(MAX_MESSAGE_LEN)
            .await
            .expect_err("too long");
        assert!(
            matches!(
                error,
                CodecError::InvalidLength {
                    length: 2_147_483_647,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[tokio::test]
    async fn reader_rejects_negative_length() {
        let bytes = [b'Q', 0xff, 0xff, 0xff, 0xf0];
        let mut reader = FrameReader::new(&bytes[..]);
        assert!(reader.read_header(MAX_MESSAGE_LEN).await.is_err());
    }

    #[tokio::test]
    async fn reader_eof_mid_message() {
        let bytes = [b'Q', 0, 0, 0, 20, b'S', b'E'];
        let mut reader = FrameReader::new(&bytes[..]);
        let header = reader
            .read_header(MAX_MESSAGE_LEN)
            .await
            .expect("header")
            .expect("message");
        let error = reader.read_body(header).await.expect_err("truncated");
        assert!(matches!(error, CodecError::UnexpectedEof { .. }), "{error}");
    }

    #[tokio::test]
    async fn reader_clean_eof_between_messages() {
        let bytes = frame(b'S', b"");
        let mut reader = FrameReader::new(&bytes[..]);
        assert!(
            reader
                .read_header(MAX_MESSAGE_LEN)
                .await
                .expect("header")
                .is_some()
        );
        assert!(
            reader
                .read_header(MAX_MESSAGE_LEN)
                .await
                .expect("clean end")
                .is_none()
        );
    }

    #[tokio::test]
    async fn startup_rejects_garbage() {
        let bytes = b"GET / HTTP/1.1\r\n\r\n";
        let mut reader = FrameReader::new(&bytes[..]);
        assert!(reader.read_startup().await.is_err());
    }

    #[tokio::test]
    async fn large_body_streams_in_pieces() {
        let body = vec![b'x'; HOLD_LIMIT * 3 + 17];
        let bytes = frame(b'd', &body);
        let mut reader = FrameReader::new(&bytes[..]);
        let header = reader
            .read_header(MAX_MESSAGE_LEN)
            .await
            .expect("header")
            .expect("message");
        assert!(!header.is_held());
        let mut left = header.body_len;
        let mut total = 0;
        while left > 0 {
            let piece = reader.read_piece(left).await.expect("piece");
            assert!(piece.len() <= HOLD_LIMIT);
            left -= piece.len();
            total += piece.len();
        }
        assert_eq!(total, body.len());
    }

    #[test]
    fn error_response_round_trip() {
        let message = error_response("42501", "denied by rule no-drop");
        let fields = error_fields(&message[5..]);
        assert!(fields.contains(&(b'C', &b"42501"[..])));
        assert!(fields.contains(&(b'M', &b"denied by rule no-drop"[..])));
    }
}
