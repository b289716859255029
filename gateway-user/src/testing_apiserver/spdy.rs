//! SPDY/3.1 framing, as kubectl's SPDY transport (moby/spdystream) speaks it for exec and
//! port-forward. The client opens every stream with SYN_STREAM and a `streamType` header,
//! and the server accepts each with SYN_REPLY. Data flows in DATA frames, and FIN closes a
//! direction.
//!
//! # Format
//! Control frame: `1` bit set, version (15 bits, 3), type (16 bits), flags (8 bits), length
//! (24 bits), payload. Data frame: `0` bit, stream id (31 bits), flags, length, payload.
//! Header blocks are a zlib stream per direction, primed with the SPDY/3 dictionary and
//! sync-flushed at the end of each block: a 32-bit pair count, then length-prefixed names
//! and values.
//!
//! NOTE: flow control (WINDOW_UPDATE) is read and ignored, and never sent: spdystream does
//! not enforce windows either.

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::protocol::kube::upgrade::spdy::header_dictionary;

const VERSION: u16 = 3;
pub const TYPE_SYN_STREAM: u16 = 1;
pub const TYPE_SYN_REPLY: u16 = 2;
pub const TYPE_RST_STREAM: u16 = 3;
pub const TYPE_PING: u16 = 6;
pub const TYPE_GOAWAY: u16 = 7;
pub const FLAG_FIN: u8 = 0x01;

/// Largest frame payload accepted. The format allows 16 MiB; kubectl's frames stay far below
/// this, so a larger declared length is a broken peer.
const MAX_FRAME: usize = 1024 * 1024;
/// Largest decompressed header block accepted.
const MAX_HEADER_BLOCK: usize = 256 * 1024;

/// One received frame.
#[derive(Debug)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        headers: Vec<(String, String)>,
    },
    RstStream {
        stream_id: u32,
    },
    Ping {
        id: u32,
    },
    GoAway,
    Data {
        stream_id: u32,
        flags: u8,
        data: Bytes,
    },
    /// SETTINGS, WINDOW_UPDATE, HEADERS, SYN_REPLY: nothing the server acts on.
    Ignored,
}

fn invalid(message: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message.to_string())
}

/// Reads frames from the client.
pub struct FrameReader<R> {
    io: R,
    inflater: Decompress,
}

impl<R> std::fmt::Debug for FrameReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader").finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R) -> Self {
        Self {
            io,
            inflater: Decompress::new(true),
        }
    }

    /// Reads the next frame; `None` at a clean end of the connection between frames.
    pub async fn read_frame(&mut self) -> std::io::Result<Option<Frame>> {
        let mut head = [0u8; 8];
        match self.io.read_exact(&mut head).await {
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(error) => return Err(error),
        }
        let flags = head[4];
        let length = usize::from(head[5]) << 16 | usize::from(head[6]) << 8 | usize::from(head[7]);
        if length > MAX_FRAME {
            return Err(invalid("SPDY frame longer than 1 MiB"));
        }
        let mut payload = vec![0u8; length];
        self.io.read_exact(&mut payload).await?;

        if head[0] & 0x80 == 0 {
            let stream_id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            return Ok(Some(Frame::Data {
                stream_id,
                flags,
                data: Bytes::from(payload),
            }));
        }
        let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
        if version != VERSION {
            return Err(invalid("SPDY control frame of a version other than 3"));
        }
        let frame_type = u16::from_be_bytes([head[2], head[3]]);
        let word = |offset: usize| -> std::io::Result<u32> {
            payload
                .get(offset..offset + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff)
                .ok_or_else(|| invalid("SPDY control frame too short"))
        };
        let frame = match frame_type {
            TYPE_SYN_STREAM => {
                let stream_id = word(0)?;
                let block = payload
                    .get(10..)
                    .ok_or_else(|| invalid("SYN_STREAM too short"))?;
                let headers = parse_header_block(&self.inflate(block)?)?;
                Frame::SynStream { stream_id, headers }
            }
            TYPE_SYN_REPLY | 8 => {
                // Header blocks share one zlib stream, so even ignored ones are inflated.
                if let Some(block) = payload.get(4..) {
                    self.inflate(block)?;
                }
                Frame::Ignored
            }
            TYPE_RST_STREAM => Frame::RstStream {
                stream_id: word(0)?,
            },
            TYPE_PING => Frame::Ping { id: word(0)? },
            TYPE_GOAWAY => Frame::GoAway,
            _ => Frame::Ignored,
        };
        Ok(Some(frame))
    }

    fn inflate(&mut self, input: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut output = Vec::with_capacity(input.len() * 4 + 64);
        let mut consumed = 0;
        loop {
            if output.capacity() - output.len() < 1024 {
                if output.len() >= MAX_HEADER_BLOCK {
                    return Err(invalid("SPDY header block larger than 256 KiB"));
                }
                output.reserve(output.len().max(1024));
            }
            let before_in = self.inflater.total_in();
            let before_out = output.len();
            let result = self.inflater.decompress_vec(
                &input[consumed..],
                &mut output,
                FlushDecompress::Sync,
            );
            consumed += (self.inflater.total_in() - before_in) as usize;
            match result {
                Ok(_) => {}
                Err(error) if error.needs_dictionary().is_some() => {
                    self.inflater
                        .set_dictionary(header_dictionary())
                        .map_err(|_| invalid("SPDY header dictionary does not match"))?;
                    continue;
                }
                Err(error) => return Err(invalid(&format!("SPDY header block: {error}"))),
            }
            let made_progress = output.len() > before_out || consumed < input.len();
            if consumed >= input.len() && output.capacity() > output.len() {
                return Ok(output);
            }
            if !made_progress {
                return Err(invalid("SPDY header block does not inflate"));
            }
        }
    }
}

fn parse_header_block(block: &[u8]) -> std::io::Result<Vec<(String, String)>> {
    let mut rest = block;
    let mut take = |len: usize| -> std::io::Result<&[u8]> {
        if rest.len() < len {
            return Err(invalid("SPDY header block truncated"));
        }
        let (head, tail) = rest.split_at(len);
        rest = tail;
        Ok(head)
    };
    let count_bytes = take(4)?;
    let count = u32::from_be_bytes([
        count_bytes[0],
        count_bytes[1],
        count_bytes[2],
        count_bytes[3],
    ]);
    let mut headers = Vec::new();
    for _ in 0..count {
        let mut pair = Vec::with_capacity(2);
        for _ in 0..2 {
            let len = take(4)?;
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            pair.push(String::from_utf8_lossy(take(len)?).into_owned());
        }
        let value = pair.pop().expect("two entries");
        let name = pair.pop().expect("two entries").to_ascii_lowercase();
        // Several values of one name are joined by NUL.
        for part in value.split('\0') {
            headers.push((name.clone(), part.to_string()));
        }
    }
    Ok(headers)
}

/// Writes frames to the client.
pub struct FrameWriter<W> {
    io: W,
    deflater: Compress,
}

impl<W> std::fmt::Debug for FrameWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameWriter").finish_non_exhaustive()
    }
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(io: W) -> Self {
        let mut deflater = Compress::new(Compression::default(), true);
        deflater
            .set_dictionary(header_dictionary())
            .expect("a fresh deflater accepts a dictionary");
        Self { io, deflater }
    }

    async fn write_control(
        &mut self,
        frame_type: u16,
        flags: u8,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let mut frame = Vec::with_capacity(8 + payload.len());
        frame.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
        frame.extend_from_slice(&frame_type.to_be_bytes());
        frame.push(flags);
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        frame.extend_from_slice(payload);
        self.io.write_all(&frame).await?;
        self.io.flush().await
    }

    /// Accepts a stream the client opened.
    pub async fn syn_reply(
        &mut self,
        stream_id: u32,
        headers: &[(&str, &str)],
    ) -> std::io::Result<()> {
        let mut block = Vec::new();
        block.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (name, value) in headers {
            for part in [name, value] {
                block.extend_from_slice(&(part.len() as u32).to_be_bytes());
                block.extend_from_slice(part.as_bytes());
            }
        }
        // A sync flush is complete once the deflater leaves output space unused.
        let mut compressed = Vec::new();
        let mut input = &block[..];
        loop {
            compressed.reserve(input.len() + 128);
            let before = self.deflater.total_in();
            self.deflater
                .compress_vec(input, &mut compressed, FlushCompress::Sync)
                .map_err(|error| invalid(&format!("compress SPDY headers: {error}")))?;
            input = &input[(self.deflater.total_in() - before) as usize..];
            if input.is_empty() && compressed.len() < compressed.capacity() {
                break;
            }
        }
        let mut payload = stream_id.to_be_bytes().to_vec();
        payload.extend_from_slice(&compressed);
        self.write_control(TYPE_SYN_REPLY, 0, &payload).await
    }

    pub async fn data(&mut self, stream_id: u32, data: &[u8], fin: bool) -> std::io::Result<()> {
        // Frames of at most 64 KiB, the size spdystream itself writes.
        let mut chunks: Vec<&[u8]> = data.chunks(64 * 1024).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let last = chunks.len() - 1;
        for (index, chunk) in chunks.into_iter().enumerate() {
            let mut frame = Vec::with_capacity(8 + chunk.len());
            frame.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
            frame.push(if fin && index == last { FLAG_FIN } else { 0 });
            frame.extend_from_slice(&(chunk.len() as u32).to_be_bytes()[1..]);
            frame.extend_from_slice(chunk);
            self.io.write_all(&frame).await?;
        }
        self.io.flush().await
    }

    pub async fn ping(&mut self, id: u32) -> std::io::Result<()> {
        self.write_control(TYPE_PING, 0, &id.to_be_bytes()).await
    }

    pub async fn go_away(&mut self, last_stream_id: u32) -> std::io::Result<()> {
        let mut payload = last_stream_id.to_be_bytes().to_vec();
        payload.extend_from_slice(&0u32.to_be_bytes());
        self.write_control(TYPE_GOAWAY, 0, &payload).await
    }

    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.io.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn header_block_round_trips() {
        let (client, server) = tokio::io::duplex(4096);
        let mut writer = FrameWriter::new(client);
        // A SYN_REPLY has the same header block as a SYN_STREAM but a shorter prefix, so
        // rebuild it as a SYN_STREAM for the reader.
        writer
            .syn_reply(1, &[("streamtype", "stdout"), ("x", "a")])
            .await
            .expect("write");
        drop(writer);
        let mut raw = Vec::new();
        let mut server = server;
        server.read_to_end(&mut raw).await.expect("read");
        let block = &raw[12..];
        let mut syn = vec![0x80, 0x03, 0x00, 0x01, 0x00];
        syn.extend_from_slice(&((block.len() + 10) as u32).to_be_bytes()[1..]);
        syn.extend_from_slice(&1u32.to_be_bytes());
        syn.extend_from_slice(&0u32.to_be_bytes());
        syn.extend_from_slice(&[0, 0]);
        syn.extend_from_slice(block);
        let mut reader = FrameReader::new(&syn[..]);
        let frame = reader.read_frame().await.expect("read").expect("a frame");
        let Frame::SynStream { headers, .. } = frame else {
            panic!("not a SYN_STREAM: {frame:?}");
        };
        assert_eq!(headers[0], ("streamtype".to_string(), "stdout".to_string()));
        assert_eq!(headers[1], ("x".to_string(), "a".to_string()));
    }
}
