//! Masking of exec and attach output across frame boundaries.
//!
//! The API server sends a process's output in frames as the process writes it, so one frame
//! may end with `4111 1111 ` and the next start with `1111 1111`. Each output stream (a
//! WebSocket channel, a SPDY stream id) therefore gets a [`StreamMasker`]. A frame carries on
//! only the bytes that can no longer be part of a PAN, and the trailing run that still could
//! (at most [`crate::mask::MAX_CARRY`] bytes) is prepended to the stream's next frame. Held
//! bytes are sent in a frame of their own once they have waited the hold time
//! (`proxy.exec_output_hold`), or when their stream or the connection ends, masked if by then
//! they form a PAN. Only data that could start a PAN waits, so interactive output is delayed
//! by at most the hold time. A PAN whose parts are written further apart passes unmasked.
//!
//! Frames are rebuilt with new lengths. WebSocket messages repeat their channel byte, and a
//! fragmented message keeps its fragments, whose held bytes move into the next fragment.
//!
//! Port-forward over a WebSocket channel protocol (`v4.channel.k8s.io`) is masked the same
//! way. There the server's first message on each channel starts with the forwarded port as
//! two bytes, which are passed on in place and never scanned.

use std::{
    ops::Range,
    time::{Duration, Instant},
};

use super::{FrameHeader, FrameKind, Framing};
use crate::mask::{MaskPolicy, StreamMasker};

/// WebSocket opcode of a continuation frame.
const OPCODE_CONTINUATION: u8 = 0x0;
/// WebSocket opcode of a close frame.
const OPCODE_CLOSE: u8 = 0x8;
/// WebSocket FIN bit: the frame ends its message.
const WEBSOCKET_FIN: u8 = 0x80;
/// Channel of the Kubernetes channel protocols that carries the exit `Status`.
const CHANNEL_ERROR: u8 = 3;
/// Channel of `v5.channel.k8s.io` whose messages close the channel named in their second byte.
const CHANNEL_CLOSE: u8 = 255;
/// SPDY data frame flag that ends the sender's side of the stream.
const SPDY_FLAG_FIN: u8 = 0x01;
/// SPDY control frame types that end streams.
const SPDY_RST_STREAM: u16 = 3;
const SPDY_GOAWAY: u16 = 7;

/// One output stream of an upgraded connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKey {
    /// A channel of the Kubernetes WebSocket channel protocols.
    Channel(u8),
    /// The single stream of a WebSocket subprotocol without channels.
    Messages,
    /// A SPDY stream id.
    Spdy(u32),
}

/// Frames for the client, produced by one call of [`OutputMasker`].
#[derive(Debug, Default)]
pub struct MaskedOutput {
    /// Complete frames, ready to write.
    pub bytes: Vec<u8>,
    /// Position of each data frame's stream data in `bytes`, without the channel byte, for the
    /// recording.
    pub data: Vec<(StreamKey, Range<usize>)>,
    pub frames: u64,
    pub pans_masked: usize,
}

impl MaskedOutput {
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Masking state of one output stream.
struct HeldStream {
    key: StreamKey,
    masker: StreamMasker,
    /// Bytes the masker holds back.
    held: usize,
    /// When the oldest held byte arrived.
    held_since: Option<Instant>,
    /// WebSocket opcode (text or binary) of the stream's last message, reused for a frame of
    /// held bytes.
    opcode: u8,
    /// Bytes of the port prefix still to come at the start of the stream.
    prefix_left: usize,
}

/// Length of the port at the start of each port-forward channel.
const PORT_PREFIX_LEN: usize = 2;

/// Masks the server-to-client frames of an exec or attach stream, holding back per stream the
/// bytes that may be the start of a PAN.
pub struct OutputMasker {
    framing: Framing,
    policy: MaskPolicy,
    /// Maximum time bytes that may still start a PAN are held back.
    hold: Duration,
    streams: Vec<HeldStream>,
    /// Stream of a fragmented WebSocket message that has not ended. Its continuation frames
    /// belong to it, and no other data message may start before it ends (RFC 6455 section 5.4).
    open_message: Option<StreamKey>,
    /// Whether each channel starts with the forwarded port, as in port-forward streams.
    port_prefix: bool,
}

impl std::fmt::Debug for OutputMasker {
    /// Shows the streams and how much each holds back, never the held bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held: Vec<(StreamKey, usize)> = self
            .streams
            .iter()
            .map(|stream| (stream.key, stream.held))
            .collect();
        f.debug_struct("OutputMasker")
            .field("framing", &self.framing)
            .field("hold", &self.hold)
            .field("held", &held)
            .field("open_message", &self.open_message)
            .finish()
    }
}

impl OutputMasker {
    pub fn new(framing: Framing, policy: MaskPolicy, hold: Duration) -> Self {
        Self {
            framing,
            policy,
            hold,
            streams: Vec::new(),
            open_message: None,
            port_prefix: false,
        }
    }

    /// Passes the port at the start of each WebSocket channel through unscanned, as
    /// port-forward streams require.
    pub fn with_port_prefix(mut self) -> Self {
        self.port_prefix = true;
        self
    }

    /// Masks one complete frame from the server, received at `now`, and appends what can be
    /// sent to `out`: the frame rebuilt without its held tail, and before a frame that ends
    /// streams, the bytes those streams held.
    pub fn push_frame(
        &mut self,
        frame: &[u8],
        header: &FrameHeader,
        now: Instant,
        out: &mut MaskedOutput,
    ) {
        match header.kind {
            FrameKind::WebSocketData { .. } => self.push_websocket_data(frame, header, now, out),
            FrameKind::WebSocketControl => {
                if frame[0] & 0x0f == OPCODE_CLOSE {
                    self.flush_all(out);
                }
                push_unchanged(frame, out);
            }
            FrameKind::SpdyData { stream_id } => {
                self.push_spdy_data(frame, header, stream_id, now, out);
            }
            FrameKind::SpdyControl => {
                let frame_type = u16::from_be_bytes([frame[2], frame[3]]);
                let payload = &frame[header.header_len..];
                if frame_type == SPDY_RST_STREAM && payload.len() >= 4 {
                    let stream_id =
                        u32::from_be_bytes([payload[0] & 0x7f, payload[1], payload[2], payload[3]]);
                    let key = StreamKey::Spdy(stream_id);
                    self.flush_stream(key, out);
                    // A reset stream carries no more data. Port-forward opens two streams per
                    // connection, so ended ones must not pile up.
                    self.streams.retain(|stream| stream.key != key);
                } else if frame_type == SPDY_GOAWAY {
                    self.flush_all(out);
                }
                push_unchanged(frame, out);
            }
        }
    }

    /// Returns when the oldest held bytes are due, or `None` when no stream has held bytes.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.streams
            .iter()
            .filter_map(|stream| stream.held_since)
            .min()
            .map(|since| since + self.hold)
    }

    /// Sends the held bytes of every stream whose deadline has passed at `now`. While a
    /// fragmented WebSocket message is open, only its own stream is sent, because another
    /// message cannot start before it ends.
    pub fn flush_expired(&mut self, now: Instant, out: &mut MaskedOutput) {
        let due: Vec<StreamKey> = self
            .streams
            .iter()
            .filter(|stream| {
                stream
                    .held_since
                    .is_some_and(|since| since + self.hold <= now)
            })
            .map(|stream| stream.key)
            .filter(|key| self.open_message.is_none_or(|open| open == *key))
            .collect();
        for key in due {
            self.flush_stream(key, out);
        }
    }

    /// Sends the held bytes of every stream, as at the end of the connection.
    // NOTE: if a fragmented WebSocket message is still open, the held bytes of other channels
    // go out as messages of their own inside it, which a strict client rejects. The API server
    // sends each write as one unfragmented message, so this only happens on a broken stream.
    pub fn flush_all(&mut self, out: &mut MaskedOutput) {
        let keys: Vec<StreamKey> = self.streams.iter().map(|stream| stream.key).collect();
        for key in keys {
            self.flush_stream(key, out);
        }
    }

    fn stream(&mut self, key: StreamKey) -> &mut HeldStream {
        let index = match self.streams.iter().position(|stream| stream.key == key) {
            Some(index) => index,
            None => {
                let prefix_left = match key {
                    StreamKey::Channel(_) if self.port_prefix => PORT_PREFIX_LEN,
                    _ => 0,
                };
                // Messages of a WebSocket without channels are a watch's JSON events or a
                // log: JSON strings in base64 are decoded as in response bodies.
                let masker = match key {
                    StreamKey::Messages => StreamMasker::new(self.policy.clone()).with_base64(),
                    _ => StreamMasker::new(self.policy.clone()),
                };
                self.streams.push(HeldStream {
                    key,
                    masker,
                    held: 0,
                    held_since: None,
                    opcode: 0x2,
                    prefix_left,
                });
                self.streams.len() - 1
            }
        };
        &mut self.streams[index]
    }

    /// Scans `data` on stream `key` after the bytes held back, and returns the settled bytes.
    fn feed(
        &mut self,
        key: StreamKey,
        data: &[u8],
        end: bool,
        now: Instant,
        out: &mut MaskedOutput,
    ) -> Vec<u8> {
        let stream = self.stream(key);
        let mut settled = Vec::with_capacity(stream.held + data.len());
        out.pans_masked += stream.masker.feed(data, &mut settled);
        if end {
            out.pans_masked += stream.masker.finish(&mut settled);
        }
        stream.held = stream.held + data.len() - settled.len();
        if stream.held == 0 {
            stream.held_since = None;
        } else if stream.held_since.is_none() {
            stream.held_since = Some(now);
        }
        settled
    }

    fn push_websocket_data(
        &mut self,
        frame: &[u8],
        header: &FrameHeader,
        now: Instant,
        out: &mut MaskedOutput,
    ) {
        let first_byte = frame[0];
        let fin = first_byte & WEBSOCKET_FIN != 0;
        let opcode = first_byte & 0x0f;
        let payload = &frame[header.header_len..];
        let channels = matches!(self.framing, Framing::WebSocket { channels: true });

        let (key, channel_byte, data) = if opcode == OPCODE_CONTINUATION {
            let Some(key) = self.open_message else {
                // A continuation without a message to continue violates RFC 6455. It is
                // masked on its own and passed on for the client to reject.
                let mut copy = frame.to_vec();
                out.pans_masked +=
                    crate::mask::mask_in_place(&mut copy[header.header_len..], &self.policy);
                push_unchanged(&copy, out);
                return;
            };
            (key, None, payload)
        } else if channels {
            let Some((&channel, data)) = payload.split_first() else {
                push_unchanged(frame, out);
                return;
            };
            if channel == CHANNEL_CLOSE {
                if let Some(&closed) = data.first() {
                    self.flush_stream(StreamKey::Channel(closed), out);
                }
                push_unchanged(frame, out);
                return;
            }
            if channel == CHANNEL_ERROR {
                // The exit status follows all output, so the output held back goes first.
                self.flush_all(out);
            }
            (StreamKey::Channel(channel), Some(channel), data)
        } else {
            (StreamKey::Messages, None, payload)
        };

        if opcode != OPCODE_CONTINUATION {
            self.stream(key).opcode = opcode;
            if !fin {
                self.open_message = Some(key);
            }
        }
        // The port comes before any stream data, so nothing is held back yet and it keeps its
        // place at the start of the payload.
        let stream = self.stream(key);
        let prefix_len = stream.prefix_left.min(data.len());
        stream.prefix_left -= prefix_len;
        let (prefix, data) = data.split_at(prefix_len);
        let mut settled = self.feed(key, data, false, now, out);
        if !prefix.is_empty() {
            settled.splice(0..0, prefix.iter().copied());
        }

        // A frame that starts or ends a fragmented message is sent even when empty, so the
        // client sees the message's opcode and its end.
        let starts_fragments = opcode != OPCODE_CONTINUATION && !fin;
        let ends_fragments = opcode == OPCODE_CONTINUATION && fin;
        if ends_fragments {
            self.open_message = None;
        }
        if settled.is_empty() && !starts_fragments && !ends_fragments {
            return;
        }
        push_websocket_frame(first_byte, key, channel_byte, &settled, out);
    }

    fn push_spdy_data(
        &mut self,
        frame: &[u8],
        header: &FrameHeader,
        stream_id: u32,
        now: Instant,
        out: &mut MaskedOutput,
    ) {
        let flags = frame[4];
        let fin = flags & SPDY_FLAG_FIN != 0;
        let key = StreamKey::Spdy(stream_id);
        let settled = self.feed(key, &frame[header.header_len..], fin, now, out);
        if fin {
            self.streams.retain(|stream| stream.key != key);
        }
        // A FIN frame is sent even when empty, because it ends the stream.
        if settled.is_empty() && !fin {
            return;
        }
        push_spdy_frame(stream_id, flags, &settled, out);
    }

    /// Sends the bytes held back on stream `key` in a frame of their own, masked as at the end
    /// of a stream.
    fn flush_stream(&mut self, key: StreamKey, out: &mut MaskedOutput) {
        let Some(stream) = self.streams.iter_mut().find(|stream| stream.key == key) else {
            return;
        };
        if stream.held == 0 {
            return;
        }
        let mut held = Vec::with_capacity(stream.held);
        out.pans_masked += stream.masker.finish(&mut held);
        stream.held = 0;
        stream.held_since = None;
        let opcode = stream.opcode;

        match key {
            StreamKey::Spdy(stream_id) => push_spdy_frame(stream_id, 0, &held, out),
            StreamKey::Channel(_) | StreamKey::Messages if self.open_message == Some(key) => {
                push_websocket_frame(OPCODE_CONTINUATION, key, None, &held, out);
            }
            StreamKey::Channel(channel) => {
                push_websocket_frame(WEBSOCKET_FIN | opcode, key, Some(channel), &held, out);
            }
            StreamKey::Messages => {
                push_websocket_frame(WEBSOCKET_FIN | opcode, key, None, &held, out);
            }
        }
    }
}

fn push_unchanged(frame: &[u8], out: &mut MaskedOutput) {
    out.bytes.extend_from_slice(frame);
    out.frames += 1;
}

/// Appends an unmasked (server-sent) WebSocket frame whose first header byte is `first_byte`
/// and whose payload is the optional channel byte followed by `data`.
fn push_websocket_frame(
    first_byte: u8,
    key: StreamKey,
    channel_byte: Option<u8>,
    data: &[u8],
    out: &mut MaskedOutput,
) {
    let payload_len = data.len() + usize::from(channel_byte.is_some());
    push_websocket_header(first_byte, payload_len, out);
    if let Some(channel) = channel_byte {
        out.bytes.push(channel);
    }
    let start = out.bytes.len();
    out.bytes.extend_from_slice(data);
    out.data.push((key, start..out.bytes.len()));
    out.frames += 1;
}

/// Appends the header of an unmasked (server-sent) WebSocket frame whose first byte is
/// `first_byte` and whose payload is `payload_len` bytes long.
pub(super) fn push_websocket_header(first_byte: u8, payload_len: usize, out: &mut MaskedOutput) {
    out.bytes.push(first_byte);
    if payload_len < 126 {
        out.bytes.push(payload_len as u8);
    } else if let Ok(short) = u16::try_from(payload_len) {
        out.bytes.push(126);
        out.bytes.extend_from_slice(&short.to_be_bytes());
    } else {
        out.bytes.push(127);
        out.bytes
            .extend_from_slice(&(payload_len as u64).to_be_bytes());
    }
}

/// Appends `data` as SPDY data frames of stream `stream_id`. The held bytes can push a frame
/// past the 24-bit length field, so longer data is split, and `flags` (FIN) go on the last frame.
fn push_spdy_frame(stream_id: u32, flags: u8, data: &[u8], out: &mut MaskedOutput) {
    const MAX_SPDY_LENGTH: usize = (1 << 24) - 1;
    let mut rest = data;
    loop {
        let (part, after) = rest.split_at(rest.len().min(MAX_SPDY_LENGTH));
        let part_flags = if after.is_empty() { flags } else { 0 };
        out.bytes
            .extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
        out.bytes.push(part_flags);
        out.bytes
            .extend_from_slice(&(part.len() as u32).to_be_bytes()[1..]);
        let start = out.bytes.len();
        out.bytes.extend_from_slice(part);
        out.data
            .push((StreamKey::Spdy(stream_id), start..out.bytes.len()));
        out.frames += 1;
        if after.is_empty() {
            return;
        }
        rest = after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::kube::upgrade::parse_header;

    const PAN: &[u8] = b"4111 1111 1111 1111";
    const MASKED: &[u8] = b"4111 11** **** 1111";
    const WEBSOCKET: Framing = Framing::WebSocket { channels: true };
    const HOLD: Duration = crate::config::DEFAULT_EXEC_OUTPUT_HOLD;

    fn websocket_message(first_byte: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = MaskedOutput::default();
        push_websocket_frame(first_byte, StreamKey::Messages, None, payload, &mut out);
        out.bytes
    }

    fn channel_message(channel: u8, data: &[u8]) -> Vec<u8> {
        let mut payload = vec![channel];
        payload.extend_from_slice(data);
        websocket_message(WEBSOCKET_FIN | 0x2, &payload)
    }

    fn spdy_data(stream_id: u32, flags: u8, data: &[u8]) -> Vec<u8> {
        let mut out = MaskedOutput::default();
        push_spdy_frame(stream_id, flags, data, &mut out);
        out.bytes
    }

    /// Feeds whole frames from `input` to `masker` at `now`.
    fn push_all(masker: &mut OutputMasker, input: &[u8], now: Instant, out: &mut MaskedOutput) {
        let mut rest = input;
        while !rest.is_empty() {
            let header = parse_header(masker.framing, rest)
                .expect("valid frame")
                .expect("whole frame");
            let (frame, after) = rest.split_at(header.header_len + header.payload_len);
            masker.push_frame(frame, &header, now, out);
            rest = after;
        }
    }

    /// A frame read back from the output: first header byte or SPDY flags, stream and data.
    #[derive(Debug)]
    struct Sent {
        flags: u8,
        stream: StreamKey,
        data: Vec<u8>,
    }

    /// Parses the output back into frames, checking that every length field is right.
    fn sent_frames(framing: Framing, bytes: &[u8]) -> Vec<Sent> {
        let mut frames = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let header = parse_header(framing, rest)
                .expect("valid output frame")
                .expect("whole output frame");
            let (frame, after) = rest.split_at(header.header_len + header.payload_len);
            let payload = &frame[header.header_len..];
            let sent = match header.kind {
                FrameKind::SpdyData { stream_id } => Sent {
                    flags: frame[4],
                    stream: StreamKey::Spdy(stream_id),
                    data: payload.to_vec(),
                },
                FrameKind::WebSocketData { masking_key } => {
                    assert_eq!(masking_key, None, "server frames carry no masking key");
                    let opcode = frame[0] & 0x0f;
                    if opcode == OPCODE_CONTINUATION {
                        Sent {
                            flags: frame[0],
                            stream: StreamKey::Messages,
                            data: payload.to_vec(),
                        }
                    } else {
                        Sent {
                            flags: frame[0],
                            stream: StreamKey::Channel(payload[0]),
                            data: payload[1..].to_vec(),
                        }
                    }
                }
                FrameKind::WebSocketControl | FrameKind::SpdyControl => Sent {
                    flags: frame[0],
                    stream: StreamKey::Messages,
                    data: payload.to_vec(),
                },
            };
            frames.push(sent);
            rest = after;
        }
        frames
    }

    /// Joins the data sent on `stream`.
    fn stream_data(frames: &[Sent], stream: StreamKey) -> Vec<u8> {
        frames
            .iter()
            .filter(|frame| frame.stream == stream)
            .flat_map(|frame| frame.data.iter().copied())
            .collect()
    }

    /// Port-forward channels start with the port, here 12345 (bytes `0x39 0x30`, the digits
    /// "90"). It stays first in its frame and is not read as digits of the data after it, and a
    /// PAN split across the channel's later messages is masked.
    #[test]
    fn port_forward_port_passed_unscanned() {
        let port = 12345u16.to_le_bytes();
        let mut first = port.to_vec();
        first.extend_from_slice(PAN);
        let mut masker =
            OutputMasker::new(WEBSOCKET, MaskPolicy::default(), HOLD).with_port_prefix();
        let start = Instant::now();
        let mut out = MaskedOutput::default();
        push_all(&mut masker, &channel_message(0, &first), start, &mut out);
        push_all(&mut masker, &channel_message(1, &port), start, &mut out);
        push_all(
            &mut masker,
            &channel_message(0, b" card 4111 1111 "),
            start,
            &mut out,
        );
        push_all(
            &mut masker,
            &channel_message(0, b"1111 1111 end"),
            start,
            &mut out,
        );
        masker.flush_all(&mut out);

        let frames = sent_frames(WEBSOCKET, &out.bytes);
        assert_eq!(frames[0].stream, StreamKey::Channel(0));
        assert_eq!(&frames[0].data[..2], b"90");
        assert_eq!(frames[1].stream, StreamKey::Channel(1));
        assert_eq!(frames[1].data, b"90");
        let mut expected = b"90".to_vec();
        expected.extend_from_slice(MASKED);
        expected.extend_from_slice(b" card ");
        expected.extend_from_slice(MASKED);
        expected.extend_from_slice(b" end");
        assert_eq!(
            String::from_utf8_lossy(&stream_data(&frames, StreamKey::Channel(0))),
            String::from_utf8_lossy(&expected)
        );
        assert_eq!(out.pans_masked, 2);
    }

    /// A watch over a WebSocket without channels sends JSON events, whose base64 strings
    /// are decoded and masked as in response bodies.
    #[test]
    fn watch_messages_base64_masked() {
        let framing = Framing::WebSocket { channels: false };
        let mut masker = OutputMasker::new(framing, MaskPolicy::default(), HOLD);
        let mut out = MaskedOutput::default();
        let event = br#"{"type":"ADDED","object":{"data":{"pan":"NDExMTExMTExMTExMTExMQ=="}}}"#;
        push_all(
            &mut masker,
            &websocket_message(WEBSOCKET_FIN | 0x1, event),
            Instant::now(),
            &mut out,
        );
        masker.flush_all(&mut out);
        // One text message back, its payload after a 2-byte header.
        let text = String::from_utf8_lossy(&out.bytes[2..]).into_owned();
        assert!(
            text.contains(r#""pan":"NDExMTExKioqKioqMTExMQ==""#),
            "{text}"
        );
        assert_eq!(out.pans_masked, 1);
    }

    /// Without the port-forward setting, the first bytes of a channel are data like any other.
    #[test]
    fn channel_start_scanned_without_port_prefix() {
        let mut masker = OutputMasker::new(WEBSOCKET, MaskPolicy::default(), HOLD);
        let mut out = MaskedOutput::default();
        push_all(
            &mut masker,
            &channel_message(1, PAN),
            Instant::now(),
            &mut out,
        );
        masker.flush_all(&mut out);
        let frames = sent_frames(WEBSOCKET, &out.bytes);
        assert_eq!(stream_data(&frames, StreamKey::Channel(1)), MASKED);
    }

    #[test]
    fn split_pan_masked_at_every_position() {
        let stdout = StreamKey::Channel(1);
        for framing in [WEBSOCKET, Framing::Spdy] {
            let stream = match framing {
                Framing::Spdy | Framing::SpdyInWebSocket => StreamKey::Spdy(3),
                Framing::WebSocket { .. } => stdout,
            };
            let frame = |data: &[u8]| match framing {
                Framing::Spdy | Framing::SpdyInWebSocket => spdy_data(3, 0, data),
                Framing::WebSocket { .. } => channel_message(1, data),
            };
            for cut in 0..=PAN.len() {
                let mut first = b"card ".to_vec();
                first.extend_from_slice(&PAN[..cut]);
                let mut second = PAN[cut..].to_vec();
                second.push(b'\n');

                let mut masker = OutputMasker::new(framing, MaskPolicy::default(), HOLD);
                let start = Instant::now();
                let mut out = MaskedOutput::default();
                push_all(&mut masker, &frame(&first), start, &mut out);
                push_all(&mut masker, &frame(&second), start, &mut out);
                masker.flush_all(&mut out);

                let frames = sent_frames(framing, &out.bytes);
                let mut expected = b"card ".to_vec();
                expected.extend_from_slice(MASKED);
                expected.push(b'\n');
                assert_eq!(
                    String::from_utf8_lossy(&stream_data(&frames, stream)),
                    String::from_utf8_lossy(&expected),
                    "{framing:?} cut at {cut}"
                );
                assert_eq!(out.pans_masked, 1, "{framing:?} cut at {cut}");
                assert_eq!(masker.next_deadline(), None, "{framing:?} cut at {cut}");
                for (_, range) in &out.data {
                    let recorded = &out.bytes[range.clone()];
                    assert!(
                        !recorded.windows(PAN.len()).any(|window| window == PAN),
                        "{framing:?} cut at {cut}: a recorded frame holds the PAN"
                    );
                }
            }
        }
    }

    #[test]
    fn digits_before_the_cut_wait_text_does_not() {
        let mut masker = OutputMasker::new(WEBSOCKET, MaskPolicy::default(), HOLD);
        let start = Instant::now();
        let mut out = MaskedOutput::default();
        push_all(
            &mut masker,
            &channel_message(1, b"order 123"),
            start,
            &mut out,
        );
        let frames = sent_frames(WEBSOCKET, &out.bytes);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].data, b"order ");
        assert_eq!(masker.next_deadline(), Some(start + HOLD));

        push_all(
            &mut masker,
            &channel_message(1, b"45 shipped\n"),
            start,
            &mut out,
        );
        let frames = sent_frames(WEBSOCKET, &out.bytes);
        assert_eq!(
            stream_data(&frames, StreamKey::Channel(1)),
            b"order 12345 shipped\n"
        );
        assert_eq!(out.pans_masked, 0);
        assert_eq!(masker.next_deadline(), None);
    }

    #[test]
    fn long_digit_run_not_masked() {
        // 25 digits whose first 16 are a valid PAN: part of a longer run, so no PAN.
        let run = b"4111111111111111111111111";
        for cut in 1..run.len() {
            let mut masker = OutputMasker::new(WEBSOCKET, MaskPolicy::default(), HOLD);
            let start = Instant::now();
            let mut out = MaskedOutput::default();
            push_all(
                &mut masker,
                &channel_message(1, &run[..cut]),
                start,
                &mut out,
            );
            push_all(
                &mut masker,
                &channel_message(1, &run[cut..]),
                start,
                &mut out,
            );
            push_all(&mut masker, &channel_message(1, b"\n"), start, &mut out);
            let frames = sent_frames(WEBSOCKET, &out.bytes);
            let mut expected = run.to_vec();
            expected.push(b'\n');
            assert_eq!(
                stream_data(&frames, StreamKey::Channel(1)),
                expected,
                "cut at {cut}"
            );
            assert_eq!(out.pans_masked, 0, "cut at {cut}");
        }
    }

    #[test]
    fn held_bytes_flushed_on_deadline() {
        let mut masker = OutputMasker::new(WEBSOCKET, MaskPolicy::default(), HOLD);
        let start = Instant::now();
        let mut out = MaskedOutput::default();
        push_all(&mut masker, &channel_message(1, PAN), start, &mut out);
        assert!(out.is_empty(), "a possible PAN start was sent at once");
        let deadline = masker.next_deadline().expect("bytes held");
        assert_eq!(deadline, start + HOLD);

        masker.flush_expired(deadline - Duration::from_millis(1), &mut out);
        assert!(out.is_empty(), "held bytes sent before the deadline");

        masker.flush_expired(deadline, &mut out);
        let frames = sent_frames(WEBSOCKET, &out.bytes);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].flags, WEBSOCKET_FIN | 0x2);
        assert_eq!(frames[0].stream, StreamKey::Channel(1));
        assert_eq!(frames[0].data, MASKED);
        assert_eq!(out.pans_masked, 1);
        assert_eq!(masker.next_deadline(), None);

        // Half a PAN is no PAN, so it is sent as it is.
        let mut out = MaskedOutput::default();
        push_all(
            &mut masker,
            &channel_message(1, b"4111 1111 "),
            start,
            &mut out,
        );
        masker.flush_expired(start + HOLD, &mut out);
        let frames = sent_frames(WEBSOCKET, &out.bytes);
        assert_eq!(stream_data(&frames, StreamKey::Channel(1)), b"4111 1111 ");
        assert_eq!(out.pans_masked, 0);
    }

    #[test]
    fn streams_are_held_separately() {
        let mut masker = OutputMasker::new(WEBSOCKET, MaskPolicy::default(), HOLD);
        let start = Instant::now();
        let mut out = MaskedOutput::default();
        push_all(
            &mut masker,
            &channel_message(1, b"4111 1111 "),
            start,
            &mut out,
        );
        push_all(
            &mut masker,
            &channel_message(2, b"5555 5555 "),
            start,
            &mut out,
        );
        push_all(
            &mut masker,
            &channel_message(2, b"5555 4444\n"),
            start,
            &mut out,
        );
        push_all(
            &mut masker,
            &channel_message(1, b"1111 1111\n"),
            start,
            &mut out,
        );

        let frames = sent_frames(WEBSOCKET, &out.bytes);
        assert_eq!(
            String::from_utf8_lossy(&stream_data(&frames, StreamKey::Channel(1))),
            "4111 11** **** 1111\n"
        );
        assert_eq!(
            String::from_utf8_lossy(&stream_data(&frames, StreamKey::Channel(2))),
            "5555 55** **** 4444\n"
        );
        assert_eq!(out.pans_masked, 2);
    }

    #[test]
    fn stream_end_sends_held_bytes_first() {
        // The exit status on channel 3 follows the held stdout.
        let mut masker = OutputMasker::new(WEBSOCKET, MaskPolicy::default(), HOLD);
        let start = Instant::now();
        let mut out = MaskedOutput::default();
        push_all(&mut masker, &channel_message(1, PAN), start, &mut out);
        push_all(&mut masker, &channel_message(3, b"{}"), start, &mut out);
        let frames = sent_frames(WEBSOCKET, &out.bytes);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].stream, StreamKey::Channel(1));
        assert_eq!(frames[0].data, MASKED);
        assert_eq!(frames[1].stream, StreamKey::Channel(3));

        // A close frame follows every held byte.
        let mut out = MaskedOutput::default();
        push_all(&mut masker, &channel_message(2, b"1234"), start, &mut out);
        push_all(
            &mut masker,
            &websocket_message(WEBSOCKET_FIN | OPCODE_CLOSE, &[3, 232]),
            start,
            &mut out,
        );
        let frames = sent_frames(WEBSOCKET, &out.bytes);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].data, b"1234");
        assert_eq!(frames[1].flags, WEBSOCKET_FIN | OPCODE_CLOSE);

        // A SPDY FIN frame carries the held bytes, masked as the stream's end.
        let mut masker = OutputMasker::new(Framing::Spdy, MaskPolicy::default(), HOLD);
        let mut out = MaskedOutput::default();
        push_all(
            &mut masker,
            &spdy_data(5, 0, b"x 4111 1111 "),
            start,
            &mut out,
        );
        push_all(
            &mut masker,
            &spdy_data(5, SPDY_FLAG_FIN, b"1111 1111"),
            start,
            &mut out,
        );
        let frames = sent_frames(Framing::Spdy, &out.bytes);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].data, b"x ");
        assert_eq!(frames[1].flags, SPDY_FLAG_FIN);
        assert_eq!(frames[1].data, MASKED);
        assert_eq!(masker.next_deadline(), None);
    }

    #[test]
    fn fragmented_message_keeps_its_fragments() {
        let mut masker = OutputMasker::new(WEBSOCKET, MaskPolicy::default(), HOLD);
        let start = Instant::now();
        let mut out = MaskedOutput::default();
        let mut first = vec![1];
        first.extend_from_slice(b"a 4111 1111 ");
        push_all(
            &mut masker,
            &websocket_message(0x2, &first),
            start,
            &mut out,
        );
        push_all(
            &mut masker,
            &websocket_message(OPCODE_CONTINUATION, b"1111 "),
            start,
            &mut out,
        );
        push_all(
            &mut masker,
            &websocket_message(WEBSOCKET_FIN | OPCODE_CONTINUATION, b"1111 b"),
            start,
            &mut out,
        );
        let frames = sent_frames(WEBSOCKET, &out.bytes);
        let flags: Vec<u8> = frames.iter().map(|frame| frame.flags).collect();
        assert_eq!(flags, [0x2, WEBSOCKET_FIN | OPCODE_CONTINUATION]);
        assert_eq!(frames[0].stream, StreamKey::Channel(1));
        assert_eq!(frames[0].data, b"a ");
        assert_eq!(frames[1].data, b"4111 11** **** 1111 b");
    }

    #[test]
    fn long_frame_with_held_bytes_splits_spdy() {
        let mut masker = OutputMasker::new(Framing::Spdy, MaskPolicy::default(), HOLD);
        let start = Instant::now();
        let mut out = MaskedOutput::default();
        push_all(&mut masker, &spdy_data(1, 0, b"12"), start, &mut out);
        let long = vec![b'a'; (1 << 24) - 1];
        push_all(&mut masker, &spdy_data(1, 0, &long), start, &mut out);
        let frames = sent_frames(Framing::Spdy, &out.bytes);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].data.len(), (1 << 24) - 1);
        assert_eq!(&frames[0].data[..3], b"12a");
        assert_eq!(frames[1].data, b"aa");
    }
}
