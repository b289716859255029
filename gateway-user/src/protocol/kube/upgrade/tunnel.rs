//! Masking of port-forward data that kubectl tunnels as SPDY inside WebSocket.
//!
//! With the WebSocket subprotocol `SPDY/3.1+portforward.k8s.io` (kubectl's default for
//! port-forward since 1.31), the binary messages of the WebSocket connection carry one
//! continuous byte stream of SPDY frames, and a SPDY frame may start in one message and end in
//! the next. The server's messages are therefore joined back into that stream, cut into SPDY
//! frames and masked per SPDY stream across frames by an [`OutputMasker`]. What it lets go is
//! sent on in new binary messages. The client reads the tunnel as a byte stream, so the message
//! boundaries it receives need not match the server's.

use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::{
    FrameHeader, FrameKind, Framing, StreamError,
    exec_output::{MaskedOutput, OutputMasker, push_websocket_header},
    parse_spdy_header, unmask,
};
use crate::mask::MaskPolicy;

/// WebSocket opcode of a close frame.
const OPCODE_CLOSE: u8 = 0x8;
/// First header byte of a complete binary WebSocket message.
const BINARY_MESSAGE: u8 = 0x80 | 0x2;

/// The SPDY frames of one direction of a tunnel, cut out of its WebSocket messages.
#[derive(Default)]
pub struct TunnelReader {
    /// Tunneled bytes that do not yet form a whole SPDY frame.
    partial: BytesMut,
}

impl std::fmt::Debug for TunnelReader {
    /// Shows how much is buffered, never the bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelReader")
            .field("partial_len", &self.partial.len())
            .finish()
    }
}

impl TunnelReader {
    /// Adds the payload of one complete WebSocket data frame and returns the SPDY frames it
    /// completes, with their headers. The bytes of an unfinished SPDY frame wait for the next
    /// message, at most one frame's 24-bit length.
    pub fn push(
        &mut self,
        frame: &[u8],
        header: &FrameHeader,
    ) -> Result<Vec<(FrameHeader, BytesMut)>, StreamError> {
        let FrameKind::WebSocketData { masking_key } = header.kind else {
            return Ok(Vec::new());
        };
        let start = self.partial.len();
        self.partial.extend_from_slice(&frame[header.header_len..]);
        if let Some(key) = masking_key {
            unmask(&mut self.partial[start..], key);
        }
        let mut frames = Vec::new();
        while let Some(inner) = parse_spdy_header(&self.partial)? {
            let len = inner.header_len + inner.payload_len;
            if self.partial.len() < len {
                break;
            }
            let inner_frame = self.partial.split_to(len);
            frames.push((inner, inner_frame));
        }
        Ok(frames)
    }

    /// Takes the bytes of an unfinished SPDY frame.
    fn take_partial(&mut self) -> BytesMut {
        self.partial.split()
    }
}

/// Masks the server-to-client side of a tunneled SPDY connection.
#[derive(Debug)]
pub struct TunnelMasker {
    spdy: OutputMasker,
    reader: TunnelReader,
}

impl TunnelMasker {
    pub fn new(policy: MaskPolicy, hold: Duration) -> Self {
        Self {
            spdy: OutputMasker::new(Framing::Spdy, policy, hold),
            reader: TunnelReader::default(),
        }
    }

    /// Takes one complete WebSocket frame from the server, received at `now`, and appends to
    /// `out` what can be sent. The bytes of an unfinished SPDY frame wait for the next message,
    /// at most one frame's 24-bit length.
    pub fn push_frame(
        &mut self,
        frame: &[u8],
        header: &FrameHeader,
        now: Instant,
        out: &mut MaskedOutput,
    ) -> Result<(), StreamError> {
        if header.kind == FrameKind::WebSocketControl {
            if frame[0] & 0x0f == OPCODE_CLOSE {
                self.flush_all(out);
            }
            out.bytes.extend_from_slice(frame);
            out.frames += 1;
            return Ok(());
        }
        // A server must not mask its frames (RFC 6455 section 5.1), but the reader unmasks
        // those that are, so they carry the same bytes.
        let mut spdy = MaskedOutput::default();
        for (inner, inner_frame) in self.reader.push(frame, header)? {
            self.spdy.push_frame(&inner_frame, &inner, now, &mut spdy);
        }
        wrap(spdy, out);
        Ok(())
    }

    /// Returns when the oldest held bytes are due, or `None` when nothing is held.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.spdy.next_deadline()
    }

    /// Sends the bytes held back on SPDY streams whose hold time has passed at `now`.
    pub fn flush_expired(&mut self, now: Instant, out: &mut MaskedOutput) {
        let mut spdy = MaskedOutput::default();
        self.spdy.flush_expired(now, &mut spdy);
        wrap(spdy, out);
    }

    /// Sends everything held back, as at the end of the connection. The bytes of an
    /// unfinished SPDY frame go last and unchanged, so the client receives the same truncated
    /// frame as without the gateway.
    pub fn flush_all(&mut self, out: &mut MaskedOutput) {
        let mut spdy = MaskedOutput::default();
        self.spdy.flush_all(&mut spdy);
        spdy.bytes.extend_from_slice(&self.reader.take_partial());
        wrap(spdy, out);
    }
}

/// Appends the SPDY frames of `spdy` to `out` as one binary WebSocket message.
fn wrap(spdy: MaskedOutput, out: &mut MaskedOutput) {
    out.pans_masked += spdy.pans_masked;
    if spdy.bytes.is_empty() {
        return;
    }
    push_websocket_header(BINARY_MESSAGE, spdy.bytes.len(), out);
    out.bytes.extend_from_slice(&spdy.bytes);
    out.frames += 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::kube::upgrade::parse_websocket_header;

    const HOLD: Duration = Duration::from_secs(1);

    fn spdy_data(stream_id: u32, flags: u8, data: &[u8]) -> Vec<u8> {
        let mut frame = stream_id.to_be_bytes().to_vec();
        frame.push(flags);
        frame.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        frame.extend_from_slice(data);
        frame
    }

    fn binary_message(payload: &[u8]) -> Vec<u8> {
        let mut out = MaskedOutput::default();
        push_websocket_header(BINARY_MESSAGE, payload.len(), &mut out);
        out.bytes.extend_from_slice(payload);
        out.bytes
    }

    /// Feeds `message` to `masker` and returns what it sends.
    fn push(masker: &mut TunnelMasker, message: &[u8]) -> MaskedOutput {
        let header = parse_websocket_header(message)
            .expect("valid frame")
            .expect("whole frame");
        let mut out = MaskedOutput::default();
        masker
            .push_frame(message, &header, Instant::now(), &mut out)
            .expect("push frame");
        out
    }

    /// Joins the payloads of the WebSocket messages in `bytes`: the tunneled SPDY stream.
    fn tunneled(mut bytes: &[u8]) -> Vec<u8> {
        let mut stream = Vec::new();
        while !bytes.is_empty() {
            let header = parse_websocket_header(bytes)
                .expect("valid frame")
                .expect("whole frame");
            let end = header.header_len + header.payload_len;
            stream.extend_from_slice(&bytes[header.header_len..end]);
            bytes = &bytes[end..];
        }
        stream
    }

    #[test]
    fn pan_across_spdy_frames_masked() {
        let mut masker = TunnelMasker::new(MaskPolicy::default(), HOLD);
        let first = push(
            &mut masker,
            &binary_message(&spdy_data(1, 0, b"card 4111 1111 ")),
        );
        let second = push(
            &mut masker,
            &binary_message(&spdy_data(1, 0, b"1111 1111 ok")),
        );

        let mut stream = tunneled(&first.bytes);
        stream.extend_from_slice(&tunneled(&second.bytes));
        let mut expected = spdy_data(1, 0, b"card ");
        expected.extend_from_slice(&spdy_data(1, 0, b"4111 11** **** 1111 ok"));
        assert_eq!(stream, expected);
        assert_eq!(first.pans_masked + second.pans_masked, 1);
    }

    #[test]
    fn spdy_frame_split_across_messages() {
        let frame = spdy_data(3, 0, b"pan 5555555555554444 end");
        let (head, tail) = frame.split_at(11);
        let mut masker = TunnelMasker::new(MaskPolicy::default(), HOLD);

        let first = push(&mut masker, &binary_message(head));
        assert!(
            first.is_empty(),
            "half a SPDY frame is kept until the rest arrives"
        );
        let second = push(&mut masker, &binary_message(tail));
        assert_eq!(
            tunneled(&second.bytes),
            spdy_data(3, 0, b"pan 555555******4444 end")
        );
    }

    #[test]
    fn held_digits_sent_on_close() {
        let mut masker = TunnelMasker::new(MaskPolicy::default(), HOLD);
        let sent = push(&mut masker, &binary_message(&spdy_data(5, 0, b"id 4111")));
        assert_eq!(tunneled(&sent.bytes), spdy_data(5, 0, b"id "));

        let close = [0x88, 0x00];
        let closed = push(&mut masker, &close);
        let (held, rest) = closed.bytes.split_at(closed.bytes.len() - close.len());
        assert_eq!(tunneled(held), spdy_data(5, 0, b"4111"));
        assert_eq!(rest, close, "the close frame goes after the held bytes");
    }
}
