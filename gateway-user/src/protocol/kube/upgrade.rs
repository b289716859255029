//! Upgraded streams (exec, attach, port-forward) after the API server's `101 Switching
//! Protocols`: frames are relayed both ways as they arrive, data from the server is masked
//! frame by frame, and exec and attach frames are recorded as they pass.
//!
//! Two framings are read. WebSocket (RFC 6455) with the Kubernetes channel subprotocols
//! (`v4.channel.k8s.io`, `v5.channel.k8s.io`, `portforward.k8s.io`), where the first payload
//! byte of each message names the stream: 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize, 255
//! close. And SPDY/3.1, where data frames carry a stream id whose meaning (stdin, stdout, ...)
//! sits in the zlib-compressed headers of the stream's SYN_STREAM.

use std::time::Instant;

use bytes::BytesMut;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::Recording;
use crate::mask::{MaskPolicy, mask_in_place};

/// Largest frame relayed. Kubernetes clients and the API server write frames of at most
/// 32 KiB of stream data; a peer declaring more than this is not one of them.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;
/// Bytes of each recorded frame kept in the recording; the rest is counted, not stored.
const MAX_RECORDED_FRAME: usize = 64 * 1024;

/// Framing of an upgraded stream, from the `Upgrade` header the server accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// WebSocket messages; `channels` is true for the Kubernetes channel subprotocols, whose
    /// payloads start with a stream byte.
    WebSocket {
        channels: bool,
    },
    Spdy,
}

/// What a relay direction does with its frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to server: forwarded unchanged, stdin recorded.
    ToServer,
    /// Server to client: payloads masked, stdout and stderr recorded.
    ToClient,
}

/// Per-stream settings shared by both directions.
#[derive(Debug)]
pub struct StreamContext {
    pub framing: Framing,
    pub mask: MaskPolicy,
    pub record: Recording,
    /// Whether frames are written to the recording (exec and attach); port-forward data is
    /// only counted.
    pub record_frames: bool,
    pub opened: Instant,
}

/// Totals of one direction.
#[derive(Debug, Default)]
pub struct DirectionTotals {
    pub bytes: u64,
    pub frames: u64,
    pub pans_masked: usize,
}

/// Errors that end an upgraded stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("read or write failed")]
    Io(#[from] std::io::Error),
    #[error("frame of {declared} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    FrameTooLarge { declared: u64 },
}

/// Relays one direction until its source ends, then half-closes the destination.
pub async fn pump<R, W>(
    mut from: R,
    mut to: W,
    direction: Direction,
    context: &StreamContext,
) -> Result<DirectionTotals, StreamError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut totals = DirectionTotals::default();
    let mut buffer = BytesMut::with_capacity(64 * 1024);
    loop {
        let read = from.read_buf(&mut buffer).await?;
        if read == 0 {
            // Bytes of an unfinished frame at the end are passed on as they are; the peer
            // sees the same truncated frame it would have seen without the gateway.
            if !buffer.is_empty() && direction == Direction::ToServer {
                to.write_all(&buffer).await?;
            }
            let _ = to.shutdown().await;
            return Ok(totals);
        }

        let mut wrote = false;
        while let Some(header) = parse_header(context.framing, &buffer)? {
            let mut frame = buffer.split_to(header.header_len + header.payload_len);
            process_frame(&mut frame, &header, direction, context, &mut totals);
            to.write_all(&frame).await?;
            totals.bytes += frame.len() as u64;
            totals.frames += 1;
            wrote = true;
        }
        if wrote {
            to.flush().await?;
        }
        if buffer.capacity() - buffer.len() < 4096 {
            buffer.reserve(64 * 1024);
        }
    }
}

/// The parsed header of one frame.
#[derive(Debug)]
struct FrameHeader {
    header_len: usize,
    payload_len: usize,
    kind: FrameKind,
}

#[derive(Debug, PartialEq, Eq)]
enum FrameKind {
    /// WebSocket text, binary or continuation frame, with the client's masking key if any.
    WebSocketData {
        masking_key: Option<[u8; 4]>,
    },
    /// WebSocket control frame (close, ping, pong).
    WebSocketControl,
    SpdyData {
        stream_id: u32,
    },
    SpdyControl,
}

/// Reads the header of the frame at the start of `buffer`; `None` until the whole frame is
/// buffered.
fn parse_header(framing: Framing, buffer: &[u8]) -> Result<Option<FrameHeader>, StreamError> {
    let header = match framing {
        Framing::WebSocket { .. } => parse_websocket_header(buffer)?,
        Framing::Spdy => parse_spdy_header(buffer)?,
    };
    Ok(header.filter(|header| buffer.len() >= header.header_len + header.payload_len))
}

fn check_len(declared: u64) -> Result<usize, StreamError> {
    if declared > MAX_FRAME_LEN as u64 {
        return Err(StreamError::FrameTooLarge { declared });
    }
    Ok(declared as usize)
}

/// # Format
/// `FIN|RSV1-3|opcode(4)`, `MASK|len(7)`, then a 16-bit length when len is 126 or a 64-bit
/// length when it is 127, then the 4-byte masking key when MASK is set, then the payload.
fn parse_websocket_header(buffer: &[u8]) -> Result<Option<FrameHeader>, StreamError> {
    if buffer.len() < 2 {
        return Ok(None);
    }
    let opcode = buffer[0] & 0x0f;
    let masked = buffer[1] & 0x80 != 0;
    let (declared, mut header_len) = match buffer[1] & 0x7f {
        126 => {
            if buffer.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buffer[2], buffer[3]])), 4)
        }
        127 => {
            if buffer.len() < 10 {
                return Ok(None);
            }
            let mut length = [0u8; 8];
            length.copy_from_slice(&buffer[2..10]);
            (u64::from_be_bytes(length), 10)
        }
        short => (u64::from(short), 2),
    };
    let payload_len = check_len(declared)?;
    let masking_key = if masked {
        if buffer.len() < header_len + 4 {
            return Ok(None);
        }
        let mut key = [0u8; 4];
        key.copy_from_slice(&buffer[header_len..header_len + 4]);
        header_len += 4;
        Some(key)
    } else {
        None
    };
    let kind = if opcode & 0x08 != 0 {
        FrameKind::WebSocketControl
    } else {
        FrameKind::WebSocketData { masking_key }
    };
    Ok(Some(FrameHeader {
        header_len,
        payload_len,
        kind,
    }))
}

/// # Format
/// Data frame: `0|stream id(31)`, `flags(8)`, `length(24)`, data. Control frame:
/// `1|version(15)`, `type(16)`, `flags(8)`, `length(24)`, data.
fn parse_spdy_header(buffer: &[u8]) -> Result<Option<FrameHeader>, StreamError> {
    if buffer.len() < 8 {
        return Ok(None);
    }
    let declared = u64::from(u32::from_be_bytes([0, buffer[5], buffer[6], buffer[7]]));
    let payload_len = check_len(declared)?;
    let kind = if buffer[0] & 0x80 != 0 {
        FrameKind::SpdyControl
    } else {
        FrameKind::SpdyData {
            stream_id: u32::from_be_bytes([buffer[0] & 0x7f, buffer[1], buffer[2], buffer[3]]),
        }
    };
    Ok(Some(FrameHeader {
        header_len: 8,
        payload_len,
        kind,
    }))
}

/// Masks a server frame's payload in place and records exec and attach data.
// NOTE: each frame is masked on its own, so a PAN split across two frames of the same stream
// passes unmasked. Holding the tail of a frame back would delay interactive output.
fn process_frame(
    frame: &mut [u8],
    header: &FrameHeader,
    direction: Direction,
    context: &StreamContext,
    totals: &mut DirectionTotals,
) {
    let payload = &mut frame[header.header_len..];
    match header.kind {
        FrameKind::WebSocketControl | FrameKind::SpdyControl => {}
        FrameKind::WebSocketData { masking_key } => {
            let channels = matches!(context.framing, Framing::WebSocket { channels: true });
            match direction {
                Direction::ToClient => {
                    // Server frames are never masked with a key (RFC 6455 section 5.1).
                    let data = if channels && !payload.is_empty() {
                        &mut payload[1..]
                    } else {
                        &mut payload[..]
                    };
                    totals.pans_masked += mask_in_place(data, &context.mask);
                    if context.record_frames && channels && !payload.is_empty() {
                        record_frame(context, stream_name(payload[0]), &payload[1..]);
                    }
                }
                Direction::ToServer => {
                    if context.record_frames && channels {
                        // Record an unmasked copy; the frame itself goes on unchanged.
                        let mut data = payload.to_vec();
                        if let Some(key) = masking_key {
                            for (index, byte) in data.iter_mut().enumerate() {
                                *byte ^= key[index % 4];
                            }
                        }
                        if data.first() == Some(&0) {
                            mask_in_place(&mut data[1..], &context.mask);
                            record_frame(context, "stdin", &data[1..]);
                        }
                    }
                }
            }
        }
        FrameKind::SpdyData { stream_id } => match direction {
            Direction::ToClient => {
                totals.pans_masked += mask_in_place(payload, &context.mask);
                if context.record_frames && !payload.is_empty() {
                    // NOTE: SPDY stream types sit in zlib-compressed SYN_STREAM headers, which
                    // are not decoded, so every server data frame is recorded as stdout.
                    record_spdy_frame(context, "stdout", stream_id, payload);
                }
            }
            Direction::ToServer => {
                if context.record_frames && !payload.is_empty() {
                    let mut data = payload.to_vec();
                    mask_in_place(&mut data, &context.mask);
                    record_spdy_frame(context, "stdin", stream_id, &data);
                }
            }
        },
    }
}

fn stream_name(channel: u8) -> &'static str {
    match channel {
        0 => "stdin",
        1 => "stdout",
        2 => "stderr",
        3 => "error",
        4 => "resize",
        255 => "close",
        _ => "unknown",
    }
}

fn record_frame(context: &StreamContext, stream: &str, data: &[u8]) {
    if stream == "close" {
        return;
    }
    super::record_event(
        &context.record,
        "stream.frame",
        json!({
            "stream": stream,
            "offset_ms": context.opened.elapsed().as_millis() as u64,
            "data": recorded_text(data),
            "bytes": data.len(),
        }),
    );
}

fn record_spdy_frame(context: &StreamContext, stream: &str, stream_id: u32, data: &[u8]) {
    super::record_event(
        &context.record,
        "stream.frame",
        json!({
            "stream": stream,
            "spdy_stream": stream_id,
            "offset_ms": context.opened.elapsed().as_millis() as u64,
            "data": recorded_text(data),
            "bytes": data.len(),
        }),
    );
}

/// Text of an already masked frame for the recording, cut at `MAX_RECORDED_FRAME`.
fn recorded_text(data: &[u8]) -> String {
    let kept = &data[..data.len().min(MAX_RECORDED_FRAME)];
    String::from_utf8_lossy(kept).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn websocket_frame(payload: &[u8], key: Option<[u8; 4]>) -> Vec<u8> {
        let mut frame = vec![0x82];
        let mask_bit = if key.is_some() { 0x80 } else { 0 };
        match payload.len() {
            len if len < 126 => frame.push(mask_bit | len as u8),
            len if len <= 0xffff => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        match key {
            Some(key) => {
                frame.extend_from_slice(&key);
                frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => frame.extend_from_slice(payload),
        }
        frame
    }

    #[test]
    fn websocket_header_waits_for_whole_frame() {
        let payload = vec![b'x'; 300];
        let frame = websocket_frame(&payload, Some([1, 2, 3, 4]));
        let framing = Framing::WebSocket { channels: true };
        for cut in 0..frame.len() {
            assert!(
                parse_header(framing, &frame[..cut])
                    .expect("valid prefix")
                    .is_none(),
                "cut at {cut}"
            );
        }
        let header = parse_header(framing, &frame)
            .expect("valid frame")
            .expect("complete frame");
        assert_eq!(header.header_len, 8);
        assert_eq!(header.payload_len, 300);
    }

    #[test]
    fn oversized_frames_are_rejected() {
        let mut frame = vec![0x82, 127];
        frame.extend_from_slice(&(u64::MAX).to_be_bytes());
        assert!(matches!(
            parse_header(Framing::WebSocket { channels: true }, &frame),
            Err(StreamError::FrameTooLarge { .. })
        ));
        // SPDY's 24-bit length stays just under the limit, so its largest frame is waited for.
        let spdy = [0, 0, 0, 1, 0, 0xff, 0xff, 0xff];
        assert!(
            parse_header(Framing::Spdy, &spdy)
                .expect("valid header")
                .is_none()
        );
    }

    #[tokio::test]
    async fn server_frames_masked_and_recorded() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let settings = crate::config::RecordingConfig {
            dir: dir.path().to_path_buf(),
            min_free_mib: 0,
            ..crate::config::RecordingConfig::default()
        };
        let recorder = crate::record::Recorder::open(&settings, "node".into()).expect("open store");
        let record = recorder
            .start(
                &crate::identity::Subject::default(),
                "10.0.0.1:1".parse().expect("address"),
                &crate::record::TargetInfo {
                    id: 0,
                    name: "api".into(),
                    class: "kube_api".into(),
                    addr: "10.96.0.1:443".parse().expect("address"),
                },
            )
            .expect("start recording");
        let path = record.path().to_path_buf();
        let context = StreamContext {
            framing: Framing::WebSocket { channels: true },
            mask: MaskPolicy::default(),
            record: std::sync::Arc::new(std::sync::Mutex::new(record)),
            record_frames: true,
            opened: Instant::now(),
        };

        let mut input = websocket_frame(b"\x01card 4111-1111-1111-1111\n", None);
        input.extend(websocket_frame(&vec![b'a'; 70_000], None));
        let (mut source, source_end) = tokio::io::duplex(1024);
        let (sink_end, mut sink) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            source.write_all(&input).await.expect("write input");
            source.shutdown().await.expect("close input");
        });
        let totals = pump(source_end, sink_end, Direction::ToClient, &context)
            .await
            .expect("relay");
        writer.await.expect("writer task");
        let mut output = Vec::new();
        sink.read_to_end(&mut output).await.expect("read output");

        assert_eq!(totals.frames, 2);
        assert_eq!(totals.pans_masked, 1);
        assert_eq!(&output[..3], &[0x82, 26, 1]);
        assert_eq!(&output[3..28], b"card 4111-11**-****-1111\n");
        assert_eq!(output.len() as u64, totals.bytes);
        drop(context);
        recorder.flush().expect("flush the recorder");
        let text = std::fs::read_to_string(path).expect("read recording");
        assert!(text.contains(r#""stream":"stdout""#));
        assert!(text.contains("4111-11**-****-1111"));
        assert!(!text.contains("4111-1111-1111-1111"));
    }
}
