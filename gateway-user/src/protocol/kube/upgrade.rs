//! Upgraded streams (exec, attach, port-forward) after the API server's `101 Switching
//! Protocols`: frames are relayed both ways as they arrive, data from the server is masked,
//! and exec and attach frames are recorded as they pass. Output is masked per stream across
//! frame boundaries (see [`exec_output`]), also port-forward data over SPDY, and over SPDY
//! tunneled in WebSocket (see [`tunnel`]). In the recording, trailing digits that may start a
//! PAN move to the stream's next frame.
//!
//! Two framings are read. WebSocket (RFC 6455) with the Kubernetes channel subprotocols
//! (`v4.channel.k8s.io` and `v5.channel.k8s.io`, also used by the kubelet for port-forward
//! over WebSocket), where the first payload
//! byte of each message names the stream: 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize, 255
//! close. And SPDY/3.1, where data frames carry a stream id whose meaning (stdin, stdout, ...)
//! sits in the zlib-compressed headers of the stream's SYN_STREAM. For exec and attach the
//! client's header blocks are decoded ([`spdy`]), so each SPDY stream is recorded under its
//! stream type, with its id in `spdy_stream`.

mod exec_output;
pub(crate) mod spdy;
mod tunnel;

use std::time::Instant;

use bytes::BytesMut;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use self::{
    exec_output::{MaskedOutput, OutputMasker, StreamKey},
    spdy::{HeaderDecoder, StreamNames},
    tunnel::{TunnelMasker, TunnelReader},
};
use super::Recording;
use crate::mask::{MaskPolicy, StreamMasker, mask_in_place};

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
    /// SPDY carried as a byte stream in binary WebSocket messages
    /// (`SPDY/3.1+portforward.k8s.io`).
    SpdyInWebSocket,
}

/// WebSocket subprotocol with which kubectl tunnels port-forward's SPDY connection.
pub const SPDY_TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";

/// What a relay direction does with its frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to server: forwarded unchanged, stdin (and over SPDY resize) recorded.
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
    /// Whether frames are written to the recording and output is masked across frames (exec
    /// and attach). Port-forward data is only counted.
    pub record_frames: bool,
    /// Maximum time exec and attach output that may start a PAN is held back.
    pub exec_output_hold: std::time::Duration,
    /// Whether the server's first message on each channel starts with the forwarded port, two
    /// bytes that are not stream data (port-forward over a WebSocket channel protocol).
    pub port_prefix: bool,
    /// Whether the server's WebSocket messages, which carry no channel byte, are pieces of one
    /// byte stream that may be cut anew (`binary.k8s.io`, which streams pod logs).
    pub byte_stream: bool,
    pub opened: Instant,
    /// Names of the SPDY streams, stored by the client-to-server relay from each SYN_STREAM
    /// and read by both directions. Empty for WebSocket framing and for port-forward.
    pub spdy_streams: StreamNames,
}

impl StreamContext {
    /// Returns the name under which the data of stream `key` is recorded.
    fn recorded_name(&self, key: StreamKey) -> &'static str {
        match key {
            StreamKey::Channel(channel) => stream_name(channel),
            StreamKey::Messages => "stdout",
            StreamKey::Spdy(stream_id) => self.spdy_streams.get(stream_id),
        }
    }
}

/// Totals of one direction.
#[derive(Debug, Default)]
pub struct DirectionTotals {
    pub bytes: u64,
    pub frames: u64,
    pub pans_masked: usize,
    /// Reason a peer left without a clean close, when it did: a reset connection, a write to a
    /// peer already gone, or TLS closed without `close_notify`.
    pub abrupt_end: Option<String>,
}

/// Returns whether `error` means the peer is gone. kubectl closes its connection as soon as it
/// has the exit status, often without TLS `close_notify` and while the server still sends,
/// so these end a direction like an EOF rather than as a failure.
fn peer_gone(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::NotConnected
    )
}

/// Errors that end an upgraded stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("read or write failed")]
    Io(#[from] std::io::Error),
    #[error("frame of {declared} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    FrameTooLarge { declared: u64 },
    /// RSV1-3 are set only by a negotiated extension, and the gateway negotiates none.
    #[error("WebSocket frame with reserved bits {bits:#05b} set, but no extension was negotiated")]
    ReservedBits { bits: u8 },
    #[error("failed to read a SPDY header block from the client")]
    SpdyHeaders(#[from] spdy::HeaderError),
    #[error(
        "the client opened more than {} SPDY streams on one connection",
        spdy::MAX_STREAMS
    )]
    TooManySpdyStreams,
}

/// Describes how a peer left, for `abrupt_end`.
fn abrupt_end(error: &std::io::Error) -> String {
    if error.kind() == std::io::ErrorKind::UnexpectedEof {
        // A TCP read returns 0 at its end, so only TLS reports an early end this way.
        "TLS closed without close_notify".to_string()
    } else {
        error.to_string()
    }
}

/// Relays one direction until its source ends, then half-closes the destination.
pub async fn pump<R, W>(
    from: R,
    to: W,
    direction: Direction,
    context: &StreamContext,
) -> Result<DirectionTotals, StreamError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut recording = RecordingMasker::new(context.mask.clone());
    let mut totals = DirectionTotals::default();
    let result = relay_frames(from, to, direction, context, &mut recording, &mut totals).await;
    // Bytes held back from the recording are written even when the relay failed.
    if context.record_frames {
        recording.finish(context);
    }
    match result {
        Ok(()) => Ok(totals),
        // The destination is gone, so nothing more can be delivered to it.
        Err(StreamError::Io(error)) if peer_gone(&error) => {
            totals.abrupt_end = Some(abrupt_end(&error));
            Ok(totals)
        }
        Err(error) => Err(error),
    }
}

async fn relay_frames<R, W>(
    mut from: R,
    mut to: W,
    direction: Direction,
    context: &StreamContext,
    recording: &mut RecordingMasker,
    totals: &mut DirectionTotals,
) -> Result<(), StreamError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = BytesMut::with_capacity(64 * 1024);
    let mut output = ServerOutput::new(direction, context);
    let mut port_forward = PortForwardLog::new(direction, context);
    // Only the client opens streams in exec and attach, so only its header blocks are read.
    let mut header_decoder = (direction == Direction::ToServer
        && context.framing == Framing::Spdy
        && context.record_frames)
        .then(HeaderDecoder::new);
    loop {
        let deadline = output.as_ref().and_then(ServerOutput::next_deadline);
        let read = tokio::select! {
            read = from.read_buf(&mut buffer) => match read {
                Ok(read) => read,
                // The source is gone: end this direction as at EOF.
                Err(error) if peer_gone(&error) => {
                    totals.abrupt_end = Some(abrupt_end(&error));
                    0
                }
                Err(error) => return Err(error.into()),
            },
            () = sleep_until_some(deadline) => {
                if let Some(output) = output.as_mut() {
                    let mut masked = MaskedOutput::default();
                    output.flush_expired(Instant::now(), &mut masked);
                    send_output(&mut to, masked, context, recording, totals).await?;
                }
                continue;
            }
        };
        if read == 0 {
            // Bytes of an unfinished frame at the end are passed on as they are; the peer
            // sees the same truncated frame it would have seen without the gateway.
            if !buffer.is_empty() && direction == Direction::ToServer {
                to.write_all(&buffer).await?;
            }
            if let Some(output) = output.as_mut() {
                let mut masked = MaskedOutput::default();
                output.flush_all(&mut masked);
                send_output(&mut to, masked, context, recording, totals).await?;
            }
            let _ = to.shutdown().await;
            return Ok(());
        }

        let mut wrote = false;
        let mut masked = MaskedOutput::default();
        while let Some(header) = parse_header(context.framing, &buffer)? {
            let mut frame = buffer.split_to(header.header_len + header.payload_len);
            if let Some(output) = output.as_mut() {
                output.push_frame(&frame, &header, Instant::now(), &mut masked)?;
                continue;
            }
            if let (FrameKind::SpdyControl, Some(decoder)) = (&header.kind, header_decoder.as_mut())
            {
                // The name is stored before the frame goes on, so before the server can use
                // the stream. A frame that cannot be read is not passed on.
                name_spdy_stream(decoder, &frame, context)?;
            }
            if let Some(log) = port_forward.as_mut() {
                log.observe(&frame, &header, context)?;
            }
            process_frame(&mut frame, &header, direction, context, recording, totals);
            to.write_all(&frame).await?;
            totals.bytes += frame.len() as u64;
            totals.frames += 1;
            wrote = true;
        }
        if !masked.is_empty() {
            send_output(&mut to, masked, context, recording, totals).await?;
        } else if wrote {
            to.flush().await?;
        }
        if buffer.capacity() - buffer.len() < 4096 {
            buffer.reserve(64 * 1024);
        }
    }
}

/// Masks what the server sends across frame boundaries, holding back per stream the bytes that
/// may start a PAN.
enum ServerOutput {
    /// Exec and attach output, and port-forward data over SPDY.
    Frames(OutputMasker),
    /// Port-forward data over SPDY tunneled in WebSocket.
    Tunnel(TunnelMasker),
}

impl ServerOutput {
    /// Returns the masker of the server-to-client direction, or `None` for frames that are
    /// masked one by one: the client's, and WebSocket messages of protocols the gateway does
    /// not know (applications behind the `proxy` subresource), whose message boundaries must
    /// stay where they are.
    fn new(direction: Direction, context: &StreamContext) -> Option<Self> {
        if direction != Direction::ToClient {
            return None;
        }
        let (policy, hold) = (context.mask.clone(), context.exec_output_hold);
        match context.framing {
            Framing::SpdyInWebSocket => Some(Self::Tunnel(TunnelMasker::new(policy, hold))),
            Framing::Spdy => Some(Self::Frames(OutputMasker::new(Framing::Spdy, policy, hold))),
            framing @ Framing::WebSocket { .. } if context.record_frames => {
                Some(Self::Frames(OutputMasker::new(framing, policy, hold)))
            }
            framing @ Framing::WebSocket { channels: true } if context.port_prefix => Some(
                Self::Frames(OutputMasker::new(framing, policy, hold).with_port_prefix()),
            ),
            framing @ Framing::WebSocket { channels: false } if context.byte_stream => {
                Some(Self::Frames(OutputMasker::new(framing, policy, hold)))
            }
            Framing::WebSocket { .. } => None,
        }
    }

    fn push_frame(
        &mut self,
        frame: &[u8],
        header: &FrameHeader,
        now: Instant,
        out: &mut MaskedOutput,
    ) -> Result<(), StreamError> {
        match self {
            Self::Frames(masker) => {
                masker.push_frame(frame, header, now, out);
                Ok(())
            }
            Self::Tunnel(masker) => masker.push_frame(frame, header, now, out),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        match self {
            Self::Frames(masker) => masker.next_deadline(),
            Self::Tunnel(masker) => masker.next_deadline(),
        }
    }

    fn flush_expired(&mut self, now: Instant, out: &mut MaskedOutput) {
        match self {
            Self::Frames(masker) => masker.flush_expired(now, out),
            Self::Tunnel(masker) => masker.flush_expired(now, out),
        }
    }

    fn flush_all(&mut self, out: &mut MaskedOutput) {
        match self {
            Self::Frames(masker) => masker.flush_all(out),
            Self::Tunnel(masker) => masker.flush_all(out),
        }
    }
}

/// Records each connection a port-forward stream opens, from the client's SPDY SYN_STREAMs:
/// `portforward.open` with the pod's port, once per forwarded connection (its data stream).
struct PortForwardLog {
    /// `None` once a header block could not be read, because the zlib stream shared by later
    /// blocks can then no longer be followed.
    decoder: Option<HeaderDecoder>,
    /// Set for SPDY tunneled in WebSocket, whose SPDY frames may span messages.
    tunnel: Option<TunnelReader>,
}

impl PortForwardLog {
    /// Returns the log of the client-to-server direction of a port-forward over SPDY.
    fn new(direction: Direction, context: &StreamContext) -> Option<Self> {
        if direction != Direction::ToServer || context.record_frames {
            return None;
        }
        let tunnel = match context.framing {
            Framing::Spdy => None,
            Framing::SpdyInWebSocket => Some(TunnelReader::default()),
            Framing::WebSocket { .. } => return None,
        };
        Some(Self {
            decoder: Some(HeaderDecoder::new()),
            tunnel,
        })
    }

    /// Reads the SPDY control frames in one frame from the client. A header block that
    /// cannot be read is noted in the recording and ends the log, not the stream.
    fn observe(
        &mut self,
        frame: &[u8],
        header: &FrameHeader,
        context: &StreamContext,
    ) -> Result<(), StreamError> {
        if self.decoder.is_none() {
            return Ok(());
        }
        match self.tunnel.as_mut() {
            Some(tunnel) => {
                for (inner, inner_frame) in tunnel.push(frame, header)? {
                    if inner.kind == FrameKind::SpdyControl {
                        log_control_frame(&mut self.decoder, &inner_frame, context);
                    }
                }
            }
            None if header.kind == FrameKind::SpdyControl => {
                log_control_frame(&mut self.decoder, frame, context);
            }
            None => {}
        }
        Ok(())
    }
}

/// Reads one SPDY control frame from a port-forward client and records the connection a data
/// stream opens. The first header block that cannot be read is recorded and clears `decoder`.
fn log_control_frame(decoder: &mut Option<HeaderDecoder>, frame: &[u8], context: &StreamContext) {
    let Some(reader) = decoder.as_mut() else {
        return;
    };
    match reader.read_control_frame(frame) {
        Ok(Some(opened)) if opened.name == "data" => super::record_event(
            &context.record,
            "portforward.open",
            json!({
                "port": opened.port,
                "request_id": opened.request_id,
                "spdy_stream": opened.stream_id,
                "offset_ms": context.opened.elapsed().as_millis() as u64,
            }),
        ),
        Ok(_) => {}
        Err(error) => {
            super::record_event(
                &context.record,
                "portforward.unreadable",
                json!({ "reason": crate::error_chain(&error) }),
            );
            *decoder = None;
        }
    }
}

/// Inflates the header block of a SPDY control frame from the client and stores the name of
/// the stream a SYN_STREAM opens.
fn name_spdy_stream(
    decoder: &mut HeaderDecoder,
    frame: &[u8],
    context: &StreamContext,
) -> Result<(), StreamError> {
    if let Some(opened) = decoder.read_control_frame(frame)?
        && !context.spdy_streams.insert(&opened)
    {
        return Err(StreamError::TooManySpdyStreams);
    }
    Ok(())
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// Writes frames from the [`OutputMasker`] to the client, records their stream data and adds
/// them to the totals.
async fn send_output<W>(
    to: &mut W,
    output: MaskedOutput,
    context: &StreamContext,
    recording: &mut RecordingMasker,
    totals: &mut DirectionTotals,
) -> Result<(), StreamError>
where
    W: AsyncWrite + Unpin,
{
    if output.is_empty() {
        return Ok(());
    }
    to.write_all(&output.bytes).await?;
    to.flush().await?;
    totals.bytes += output.bytes.len() as u64;
    totals.frames += output.frames;
    totals.pans_masked += output.pans_masked;
    if !context.record_frames {
        // Port-forward data is counted, not recorded.
        return Ok(());
    }
    for (stream, range) in &output.data {
        recording.record(
            context,
            *stream,
            context.recorded_name(*stream),
            &output.bytes[range.clone()],
        );
    }
    Ok(())
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
        Framing::WebSocket { .. } | Framing::SpdyInWebSocket => parse_websocket_header(buffer)?,
        Framing::Spdy => parse_spdy_header(buffer)?,
    };
    Ok(header.filter(|header| buffer.len() >= header.header_len + header.payload_len))
}

/// Removes the client's WebSocket masking from `data`, a payload from its first byte
/// (RFC 6455 section 5.3).
fn unmask(data: &mut [u8], key: [u8; 4]) {
    for (index, byte) in data.iter_mut().enumerate() {
        *byte ^= key[index % 4];
    }
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
    let reserved = (buffer[0] >> 4) & 0x07;
    if reserved != 0 {
        return Err(StreamError::ReservedBits { bits: reserved });
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

/// Masks a server frame that [`ServerOutput`] does not take in place, or records a frame from
/// the client (stdin and resize).
// NOTE: WebSocket messages of subprotocols the gateway does not know (applications behind the
// `proxy` subresource) are masked one by one, so a PAN split across two messages passes there.
fn process_frame(
    frame: &mut [u8],
    header: &FrameHeader,
    direction: Direction,
    context: &StreamContext,
    recording: &mut RecordingMasker,
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
                }
                Direction::ToServer => {
                    if context.record_frames && channels {
                        // Record an unmasked copy; the frame itself goes on unchanged.
                        let mut data = payload.to_vec();
                        if let Some(key) = masking_key {
                            unmask(&mut data, key);
                        }
                        // Channel 0 is stdin and channel 4 the terminal size.
                        if let Some(&channel @ (0 | 4)) = data.first() {
                            recording.record(
                                context,
                                StreamKey::Channel(channel),
                                stream_name(channel),
                                &data[1..],
                            );
                        }
                    }
                }
            }
        }
        FrameKind::SpdyData { stream_id } => match direction {
            Direction::ToClient => {
                totals.pans_masked += mask_in_place(payload, &context.mask);
            }
            Direction::ToServer => {
                if context.record_frames {
                    let key = StreamKey::Spdy(stream_id);
                    recording.record(context, key, context.recorded_name(key), payload);
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

/// Masks recorded stream data across frames, so that a PAN that crosses the wire in pieces
/// (typed into stdin key by key, or output sent after the hold time) is masked in the
/// recording. The recording is not interactive, so held bytes wait for more data on their
/// stream or the end of the connection, with no hold time.
struct RecordingMasker {
    policy: MaskPolicy,
    streams: Vec<(StreamKey, &'static str, StreamMasker)>,
}

impl RecordingMasker {
    fn new(policy: MaskPolicy) -> Self {
        Self {
            policy,
            streams: Vec::new(),
        }
    }

    /// Records the settled part of `data`, sent on stream `key` named `name`, and holds back
    /// a trailing run that may still become a PAN.
    fn record(&mut self, context: &StreamContext, key: StreamKey, name: &'static str, data: &[u8]) {
        if key == StreamKey::Messages {
            // Messages of a WebSocket protocol without channels name no stream, so they are
            // not recorded.
            return;
        }
        let index = match self
            .streams
            .iter()
            .position(|(stream, _, _)| *stream == key)
        {
            Some(index) => index,
            None => {
                let masker = StreamMasker::new(self.policy.clone());
                self.streams.push((key, name, masker));
                self.streams.len() - 1
            }
        };
        let mut settled = Vec::with_capacity(data.len() + crate::mask::MAX_CARRY);
        self.streams[index].2.feed(data, &mut settled);
        write_recorded_frame(context, key, name, &settled);
    }

    /// Records what every stream still holds back, masked as at the end of a stream.
    fn finish(&mut self, context: &StreamContext) {
        for (key, name, masker) in &mut self.streams {
            let mut held = Vec::new();
            masker.finish(&mut held);
            write_recorded_frame(context, *key, name, &held);
        }
    }
}

fn write_recorded_frame(context: &StreamContext, key: StreamKey, name: &str, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    match key {
        StreamKey::Spdy(stream_id) => record_spdy_frame(context, name, stream_id, data),
        StreamKey::Channel(_) | StreamKey::Messages => record_frame(context, name, data),
    }
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
    fn frames_of_an_extension_are_rejected() {
        // permessage-deflate marks a compressed message with RSV1; the gateway negotiates no
        // extension, so such a frame ends the stream instead of passing unscanned.
        for first in [0xc2, 0xa2, 0x92] {
            let frame = [first, 3, 1, b'4', b'1'];
            assert!(matches!(
                parse_header(Framing::WebSocket { channels: true }, &frame),
                Err(StreamError::ReservedBits { .. })
            ));
        }
        assert!(
            parse_header(Framing::WebSocket { channels: true }, &[0x82, 1, 1])
                .expect("valid frame")
                .is_some()
        );
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

    /// Opens a recorder in `dir` and starts a session of an exec stream in it.
    fn exec_context(
        dir: &std::path::Path,
        framing: Framing,
    ) -> (crate::record::Recorder, StreamContext, std::path::PathBuf) {
        let settings = crate::config::RecordingConfig {
            dir: dir.to_path_buf(),
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
            framing,
            mask: MaskPolicy::default(),
            record: std::sync::Arc::new(std::sync::Mutex::new(record)),
            record_frames: true,
            exec_output_hold: crate::config::DEFAULT_EXEC_OUTPUT_HOLD,
            port_prefix: false,
            byte_stream: false,
            opened: Instant::now(),
            spdy_streams: StreamNames::default(),
        };
        (recorder, context, path)
    }

    /// Output held back at the end of a frame reaches the client once the hold deadline
    /// passes, while the server stays silent, and a PAN split across frames is masked.
    #[tokio::test]
    async fn held_output_flushed_while_server_silent() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (recorder, context, path) =
            exec_context(dir.path(), Framing::WebSocket { channels: true });
        let (mut source, source_end) = tokio::io::duplex(1024);
        let (sink_end, mut sink) = tokio::io::duplex(1 << 20);
        let relay = async {
            pump(source_end, sink_end, Direction::ToClient, &context)
                .await
                .expect("relay")
        };
        let client = async {
            source
                .write_all(&websocket_frame(b"\x01pan 4111 1111 1111 1111", None))
                .await
                .expect("write the first frame");
            // Nothing else is written until the held PAN arrives, so only the deadline can
            // send it.
            let mut first = vec![0u8; 2 + 1 + 4];
            sink.read_exact(&mut first)
                .await
                .expect("read the text before the PAN");
            assert_eq!(&first, b"\x82\x05\x01pan ");
            let mut held = vec![0u8; 2 + 1 + 19];
            sink.read_exact(&mut held).await.expect("read the held PAN");
            assert_eq!(&held[..3], &[0x82, 20, 1]);
            assert_eq!(&held[3..], b"4111 11** **** 1111");

            // Two stderr frames in one write arrive in one read, before any deadline.
            let mut split = websocket_frame(b"\x024111 1111 ", None);
            split.extend(websocket_frame(b"\x021111 1111", None));
            source.write_all(&split).await.expect("write the split PAN");
            source.shutdown().await.expect("close input");
            let mut rest = Vec::new();
            sink.read_to_end(&mut rest).await.expect("read the rest");
            rest
        };
        let (totals, rest) = tokio::join!(relay, client);

        let stderr = sent_channel_data(&rest, 2);
        assert_eq!(String::from_utf8_lossy(&stderr), "4111 11** **** 1111");
        assert_eq!(totals.pans_masked, 2);
        drop(context);
        recorder.flush().expect("flush the recorder");
        let text = std::fs::read_to_string(path).expect("read recording");
        assert_eq!(recorded_stream(&text, "stdout"), "pan 4111 11** **** 1111");
        assert_eq!(recorded_stream(&text, "stderr"), "4111 11** **** 1111");
        assert!(!text.contains("1111 1111"), "{text}");
    }

    /// Relays `input` in `direction` until it ends, and returns the totals and what the other
    /// side got.
    async fn relay_all(
        context: &StreamContext,
        input: &[u8],
        direction: Direction,
    ) -> (DirectionTotals, Vec<u8>) {
        let (sink_end, mut sink) = tokio::io::duplex(1 << 20);
        let totals = pump(input, sink_end, direction, context)
            .await
            .expect("relay the frames");
        let mut sent = Vec::new();
        sink.read_to_end(&mut sent)
            .await
            .expect("read what the other side got");
        (totals, sent)
    }

    /// Port-forward over a WebSocket channel protocol masks a PAN split across two messages of a
    /// channel, and the port at the channel's start reaches the client unchanged.
    #[tokio::test]
    async fn port_forward_channel_masked_across_frames() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (_recorder, mut context, _path) =
            exec_context(dir.path(), Framing::WebSocket { channels: true });
        context.record_frames = false;
        context.port_prefix = true;
        let mut from_server = websocket_frame(b"\x00\x39\x30", None);
        from_server.extend(websocket_frame(b"\x00row 4111 1111 ", None));
        from_server.extend(websocket_frame(b"\x001111 1111\n", None));
        let (totals, sent) = relay_all(&context, &from_server, Direction::ToClient).await;
        assert_eq!(
            String::from_utf8_lossy(&sent_channel_data(&sent, 0)),
            "90row 4111 11** **** 1111\n"
        );
        assert_eq!(totals.pans_masked, 1);
    }

    /// Pod logs over `binary.k8s.io` are one byte stream, so a PAN split across two messages
    /// is masked.
    #[tokio::test]
    async fn log_stream_masked_across_messages() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let framing = Framing::WebSocket { channels: false };
        let (_recorder, mut context, _path) = exec_context(dir.path(), framing);
        context.record_frames = false;
        context.byte_stream = true;
        let mut from_server = websocket_frame(b"paid with 4111 1111 ", None);
        from_server.extend(websocket_frame(b"1111 1111\n", None));
        let (totals, sent) = relay_all(&context, &from_server, Direction::ToClient).await;
        let mut data = Vec::new();
        let mut rest = &sent[..];
        while let Some(header) = parse_header(framing, rest).expect("valid output frame") {
            let (frame, after) = rest.split_at(header.header_len + header.payload_len);
            data.extend_from_slice(&frame[header.header_len..]);
            rest = after;
        }
        assert!(rest.is_empty(), "output ends inside a frame");
        assert_eq!(
            String::from_utf8_lossy(&data),
            "paid with 4111 11** **** 1111\n"
        );
        assert_eq!(totals.pans_masked, 1);
    }

    /// With no hold time, output is sent as it arrives, so a PAN written in two parts reaches
    /// the client in clear. The recording still masks it, and stdin typed one key per frame.
    #[tokio::test]
    async fn recording_masks_pan_sent_in_pieces() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (recorder, mut context, path) =
            exec_context(dir.path(), Framing::WebSocket { channels: true });
        context.exec_output_hold = std::time::Duration::ZERO;

        let (mut server, server_end) = tokio::io::duplex(1024);
        let (client_end, mut client) = tokio::io::duplex(1 << 20);
        let output = async {
            pump(server_end, client_end, Direction::ToClient, &context)
                .await
                .expect("relay output")
        };
        let server_writes = async {
            server
                .write_all(&websocket_frame(b"\x014111 1111 ", None))
                .await
                .expect("write the first part");
            // The first part reaches the client before the second is written.
            let mut first = vec![0u8; 2 + 1 + 10];
            client
                .read_exact(&mut first)
                .await
                .expect("read the first part");
            assert_eq!(&first[3..], b"4111 1111 ");
            server
                .write_all(&websocket_frame(b"\x011111 1111\n", None))
                .await
                .expect("write the second part");
            server.shutdown().await.expect("close output");
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.expect("read the rest");
        };
        tokio::join!(output, server_writes);

        let mut stdin = Vec::new();
        for key in b"5555 5555 5555 4444\r" {
            stdin.extend(websocket_frame(&[0, *key], Some([9, 8, 7, 6])));
        }
        let (totals, forwarded) = relay_all(&context, &stdin, Direction::ToServer).await;
        assert_eq!(forwarded, stdin, "stdin is forwarded unchanged");
        assert_eq!(totals.frames, 20);

        drop(context);
        recorder.flush().expect("flush the recorder");
        let text = std::fs::read_to_string(path).expect("read recording");
        assert_eq!(recorded_stream(&text, "stdout"), "4111 11** **** 1111\n");
        assert_eq!(recorded_stream(&text, "stdin"), "5555 55** **** 4444\r");
        assert!(!text.contains("1111 1111"), "{text}");
    }

    /// Joins the data of the recorded frames of `stream` in the recording `text`.
    fn recorded_stream(text: &str, stream: &str) -> String {
        text.lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("JSON record"))
            .filter(|record| record["event"] == "stream.frame" && record["stream"] == stream)
            .map(|record| record["data"].as_str().expect("frame data").to_string())
            .collect()
    }

    /// Joins the data of the WebSocket messages on `channel` in `bytes`.
    fn sent_channel_data(bytes: &[u8], channel: u8) -> Vec<u8> {
        let mut data = Vec::new();
        let mut rest = bytes;
        while let Some(header) =
            parse_header(Framing::WebSocket { channels: true }, rest).expect("valid output frame")
        {
            let (frame, after) = rest.split_at(header.header_len + header.payload_len);
            let payload = &frame[header.header_len..];
            if header.kind != FrameKind::WebSocketControl && payload.first() == Some(&channel) {
                data.extend_from_slice(&payload[1..]);
            }
            rest = after;
        }
        assert!(rest.is_empty(), "output ends inside a frame");
        data
    }

    #[tokio::test]
    async fn server_frames_masked_and_recorded() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (recorder, context, path) =
            exec_context(dir.path(), Framing::WebSocket { channels: true });

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

    /// Builds a SPDY data frame.
    fn spdy_data_frame(stream_id: u32, flags: u8, data: &[u8]) -> Vec<u8> {
        let mut frame = stream_id.to_be_bytes().to_vec();
        frame.push(flags);
        frame.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        frame.extend_from_slice(data);
        frame
    }

    /// Returns the distinct `spdy_stream` ids of the recorded frames of `stream` in the
    /// recording `text`, in ascending order.
    fn recorded_spdy_ids(text: &str, stream: &str) -> Vec<u64> {
        let mut ids: Vec<u64> = text
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("JSON record"))
            .filter(|record| record["event"] == "stream.frame" && record["stream"] == stream)
            .map(|record| record["spdy_stream"].as_u64().expect("SPDY stream id"))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The client's SYN_STREAMs name the streams, and both directions record their data under
    /// those names: stdin and resize from the client, stdout, stderr and error from the server.
    #[tokio::test]
    async fn spdy_streams_recorded_by_type() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (recorder, context, path) = exec_context(dir.path(), Framing::Spdy);

        let mut encoder = spdy::HeaderEncoder::new();
        let mut from_client = Vec::new();
        for (stream_id, stream_type) in [
            (1, "error"),
            (3, "stdin"),
            (5, "stdout"),
            (7, "stderr"),
            (9, "resize"),
        ] {
            from_client.extend(encoder.syn_stream(stream_id, &[("streamtype", stream_type)]));
        }
        from_client.extend(spdy_data_frame(9, 0, br#"{"Width":100,"Height":30}"#));
        from_client.extend(spdy_data_frame(3, 0, b"in 4111 1111 "));
        from_client.extend(spdy_data_frame(3, 1, b"1111 1111\n"));
        let (totals, forwarded) = relay_all(&context, &from_client, Direction::ToServer).await;
        assert_eq!(
            forwarded, from_client,
            "client frames are forwarded unchanged"
        );
        assert_eq!(totals.frames, 8);

        let mut from_server = spdy_data_frame(5, 0, b"out 5555 5555 5555 4444\n");
        from_server.extend(spdy_data_frame(7, 0, b"err 4111 1111 1111 1111\n"));
        from_server.extend(spdy_data_frame(1, 1, b"{}"));
        relay_all(&context, &from_server, Direction::ToClient).await;

        drop(context);
        recorder.flush().expect("flush the recorder");
        let text = std::fs::read_to_string(path).expect("read recording");
        assert_eq!(recorded_stream(&text, "stdin"), "in 4111 11** **** 1111\n");
        assert_eq!(
            recorded_stream(&text, "resize"),
            r#"{"Width":100,"Height":30}"#
        );
        assert_eq!(
            recorded_stream(&text, "stdout"),
            "out 5555 55** **** 4444\n"
        );
        assert_eq!(
            recorded_stream(&text, "stderr"),
            "err 4111 11** **** 1111\n"
        );
        assert_eq!(recorded_stream(&text, "error"), "{}");
        assert_eq!(recorded_stream(&text, spdy::UNKNOWN_STREAM), "");
        assert_eq!(recorded_spdy_ids(&text, "stdin"), [3]);
        assert_eq!(recorded_spdy_ids(&text, "resize"), [9]);
        assert_eq!(recorded_spdy_ids(&text, "stdout"), [5]);
        assert_eq!(recorded_spdy_ids(&text, "stderr"), [7]);
        assert_eq!(recorded_spdy_ids(&text, "error"), [1]);
    }

    /// Data on a stream whose SYN_STREAM was never seen is recorded as `unknown`.
    #[tokio::test]
    async fn spdy_stream_without_syn_stream_unknown() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (recorder, context, path) = exec_context(dir.path(), Framing::Spdy);
        let from_server = spdy_data_frame(11, 0, b"late\n");
        pump(
            &from_server[..],
            tokio::io::sink(),
            Direction::ToClient,
            &context,
        )
        .await
        .expect("relay the server's frames");
        drop(context);
        recorder.flush().expect("flush the recorder");
        let text = std::fs::read_to_string(path).expect("read recording");
        assert_eq!(recorded_stream(&text, spdy::UNKNOWN_STREAM), "late\n");
        assert_eq!(recorded_stream(&text, "stdout"), "");
    }

    /// A header block over the limit ends the upgraded stream: the frames before it are
    /// relayed, it is not, both connections close and `stream.close` records why.
    #[tokio::test]
    async fn oversized_header_block_ends_stream() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (recorder, context, path) = exec_context(dir.path(), Framing::Spdy);
        let mut encoder = spdy::HeaderEncoder::new();
        let mut from_client = encoder.syn_stream(1, &[("streamtype", "stdout")]);
        let first_len = from_client.len();
        let value = "a".repeat(spdy::MAX_HEADER_BLOCK);
        from_client.extend(encoder.syn_stream(3, &[("streamtype", "stderr"), ("x", &value)]));
        from_client.extend(spdy_data_frame(3, 0, b"after"));

        let (mut client, client_end) = tokio::io::duplex(1 << 20);
        let (server_end, mut server) = tokio::io::duplex(1 << 20);
        client
            .write_all(&from_client)
            .await
            .expect("write the client's frames");
        // The client's side stays open: the relay ends because of the header block alone.
        super::super::relay_upgraded(client_end, server_end, &context).await;

        let mut forwarded = Vec::new();
        server
            .read_to_end(&mut forwarded)
            .await
            .expect("read the forwarded frames");
        assert_eq!(forwarded, &from_client[..first_len]);
        let mut sent = Vec::new();
        client
            .read_to_end(&mut sent)
            .await
            .expect("read what the client got");
        assert!(sent.is_empty(), "{sent:?}");

        drop(context);
        recorder.flush().expect("flush the recorder");
        let text = std::fs::read_to_string(path).expect("read recording");
        let close: serde_json::Value = text
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("JSON record"))
            .find(|record| record["event"] == "stream.close")
            .expect("stream.close recorded");
        let error = close["error"].as_str().expect("close error");
        assert!(error.contains("SPDY header block"), "{error}");
        assert!(error.contains("exceeds the 65536-byte limit"), "{error}");
    }

    #[tokio::test]
    async fn corrupt_header_block_ends_stream() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (_recorder, context, _path) = exec_context(dir.path(), Framing::Spdy);
        let mut encoder = spdy::HeaderEncoder::new();
        let mut from_client = encoder.syn_stream(1, &[("streamtype", "stdin")]);
        let mut corrupt = 3u32.to_be_bytes().to_vec();
        corrupt.extend_from_slice(&[0; 6]);
        corrupt.extend_from_slice(&[0xff; 32]);
        from_client.extend(spdy::control_frame(1, &corrupt));
        let result = pump(
            &from_client[..],
            tokio::io::sink(),
            Direction::ToServer,
            &context,
        )
        .await;
        assert!(
            matches!(
                result,
                Err(StreamError::SpdyHeaders(spdy::HeaderError::Inflate(_)))
            ),
            "{result:?}"
        );
        assert_eq!(context.spdy_streams.get(1), "stdin");
        assert_eq!(context.spdy_streams.get(3), spdy::UNKNOWN_STREAM);
    }

    #[tokio::test]
    async fn too_many_spdy_streams_end_stream() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (_recorder, context, _path) = exec_context(dir.path(), Framing::Spdy);
        let mut encoder = spdy::HeaderEncoder::new();
        let mut from_client = Vec::new();
        for stream_id in (1..).step_by(2).take(spdy::MAX_STREAMS) {
            from_client.extend(encoder.syn_stream(stream_id, &[("streamtype", "stdout")]));
        }
        let allowed_len = from_client.len();
        from_client.extend(encoder.syn_stream(1001, &[("streamtype", "stdout")]));

        let (upstream_end, mut upstream) = tokio::io::duplex(1 << 20);
        let result = pump(
            &from_client[..],
            upstream_end,
            Direction::ToServer,
            &context,
        )
        .await;
        assert!(
            matches!(result, Err(StreamError::TooManySpdyStreams)),
            "{result:?}"
        );
        let mut forwarded = Vec::new();
        upstream
            .read_to_end(&mut forwarded)
            .await
            .expect("read the forwarded frames");
        assert_eq!(forwarded, &from_client[..allowed_len]);
        assert_eq!(context.spdy_streams.get(1001), spdy::UNKNOWN_STREAM);
    }

    /// A port-forward header block the gateway cannot read is noted in the recording and does
    /// not end the stream, whose data is not recorded.
    #[tokio::test]
    async fn port_forward_header_blocks_not_read() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (_recorder, mut context, _path) = exec_context(dir.path(), Framing::Spdy);
        context.record_frames = false;
        let mut corrupt = 1u32.to_be_bytes().to_vec();
        corrupt.extend_from_slice(&[0; 6]);
        corrupt.extend_from_slice(&[0xff; 32]);
        let from_client = spdy::control_frame(1, &corrupt);
        let (_, forwarded) = relay_all(&context, &from_client, Direction::ToServer).await;
        assert_eq!(forwarded, from_client);
    }
}
