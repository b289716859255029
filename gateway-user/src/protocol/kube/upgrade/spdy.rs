//! SPDY/3 header blocks of exec and attach streams, decoded to name each SPDY stream in the
//! recording.
//!
//! kubectl (client-go's `remotecommand`) opens every stream of an exec or attach with a
//! SYN_STREAM from the client whose header block carries `streamtype`: `error`, `stdin`,
//! `stdout`, `stderr` or `resize`. The header blocks of one direction form a single zlib stream
//! over the whole connection, primed with the SPDY/3 dictionary and sync-flushed after each
//! block. So every header block the client sends is inflated in order, including those whose
//! headers are not used.
//!
//! # Format
//! SYN_STREAM payload: stream id (32 bits, top bit reserved), associated stream id (32 bits),
//! priority and slot (16 bits), header block. SYN_REPLY and HEADERS payload: stream id, header
//! block. A decompressed header block is a 32-bit pair count, then per pair a 32-bit name
//! length, the name, a 32-bit value length and the value, all big-endian. A value may hold
//! several values separated by NUL bytes.

use std::sync::{Mutex, OnceLock, PoisonError};

use flate2::{Decompress, DecompressError, FlushDecompress};

/// SPDY control frame types whose payload carries a header block.
const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_HEADERS: u16 = 8;
/// Bytes of a SYN_STREAM payload before its header block.
const SYN_STREAM_FIXED_LEN: usize = 10;
/// Bytes of a SYN_REPLY or HEADERS payload before its header block.
const STREAM_ID_LEN: usize = 4;
/// Adler-32 checksum of [`header_dictionary`], which a zlib header names in its DICTID field.
const DICTIONARY_ID: u32 = 0xe3c6_a7c2;

/// Largest decompressed header block accepted. kubectl's blocks contain a few short headers.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Maximum number of SPDY streams named on one connection. An exec or attach opens at most five (error,
/// stdin, stdout, stderr, resize).
pub const MAX_STREAMS: usize = 32;
/// Recorded name of a stream whose SYN_STREAM named no known stream type, or was not read.
pub const UNKNOWN_STREAM: &str = "unknown";

/// Returns the zlib dictionary of SPDY/3 header blocks: the length-prefixed words below,
/// then the literal tail, as given in the SPDY protocol draft 3, section 2.6.10.1.
pub fn header_dictionary() -> &'static [u8] {
    static DICTIONARY: OnceLock<Vec<u8>> = OnceLock::new();
    DICTIONARY.get_or_init(|| {
        const WORDS: &[&str] = &[
            "options",
            "head",
            "post",
            "put",
            "delete",
            "trace",
            "accept",
            "accept-charset",
            "accept-encoding",
            "accept-language",
            "accept-ranges",
            "age",
            "allow",
            "authorization",
            "cache-control",
            "connection",
            "content-base",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-md5",
            "content-range",
            "content-type",
            "date",
            "etag",
            "expect",
            "expires",
            "from",
            "host",
            "if-match",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "if-unmodified-since",
            "last-modified",
            "location",
            "max-forwards",
            "pragma",
            "proxy-authenticate",
            "proxy-authorization",
            "range",
            "referer",
            "retry-after",
            "server",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "user-agent",
            "vary",
            "via",
            "warning",
            "www-authenticate",
            "method",
            "get",
            "status",
            "200 OK",
            "version",
            "HTTP/1.1",
            "url",
            "public",
            "set-cookie",
            "keep-alive",
            "origin",
        ];
        const TAIL: &str = concat!(
            "100101201202205206300302303304305306307402405406407408409410411412413414415416",
            "417502504505203 Non-Authoritative Information204 No Content301 Moved Permanently",
            "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server ",
            "Error501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug ",
            "Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,",
            "text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,",
            "text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8",
            "charset=iso-8859-1,utf-,*,enq=0.",
        );
        let mut bytes = Vec::new();
        for word in WORDS {
            bytes.extend_from_slice(&(word.len() as u32).to_be_bytes());
            bytes.extend_from_slice(word.as_bytes());
        }
        bytes.extend_from_slice(TAIL.as_bytes());
        bytes
    })
}

/// Reasons a header block cannot be read. Each ends the upgraded stream, because the zlib
/// stream shared by later blocks can no longer be followed.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("{frame} payload of {len} bytes is too short for its header block")]
    FrameTooShort { frame: &'static str, len: usize },
    #[error("decompressed header block exceeds the {MAX_HEADER_BLOCK}-byte limit")]
    TooLarge,
    #[error(
        "header block requires zlib dictionary {id:#010x}, not the SPDY/3 dictionary {DICTIONARY_ID:#010x}"
    )]
    WrongDictionary { id: u32 },
    #[error("header block does not decompress")]
    Inflate(#[source] DecompressError),
    #[error("header block does not decompress: the zlib stream stops before the block ends")]
    Stalled,
    #[error("header block of {len} bytes is too short for its 32-bit pair count")]
    NoPairCount { len: usize },
    #[error("header block ends inside its {count} name/value pairs")]
    Truncated { count: u32 },
}

/// A stream the client opened with SYN_STREAM.
#[derive(Debug, PartialEq, Eq)]
pub struct OpenedStream {
    pub stream_id: u32,
    /// The recorded name: the `streamtype` header's value, or [`UNKNOWN_STREAM`].
    pub name: &'static str,
    /// The `port` header of a port-forward stream: the pod's port it connects to.
    pub port: Option<u16>,
    /// The `requestid` header of a port-forward stream, shared by the data and error streams
    /// of one forwarded connection.
    pub request_id: Option<String>,
}

/// Inflates the header blocks of one direction of a connection, in the order they are sent.
pub struct HeaderDecoder {
    inflater: Decompress,
}

impl std::fmt::Debug for HeaderDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderDecoder")
            .field("total_in", &self.inflater.total_in())
            .field("total_out", &self.inflater.total_out())
            .finish()
    }
}

impl Default for HeaderDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderDecoder {
    pub fn new() -> Self {
        Self {
            inflater: Decompress::new(true),
        }
    }

    /// Reads one whole control frame, its 8-byte header included: inflates its header block if it has
    /// one, and for a SYN_STREAM returns the stream it opens with the stream's recorded name.
    pub fn read_control_frame(
        &mut self,
        frame: &[u8],
    ) -> Result<Option<OpenedStream>, HeaderError> {
        let frame_type = u16::from_be_bytes([frame[2], frame[3]]);
        let payload = &frame[8..];
        let (frame_name, fixed_len) = match frame_type {
            TYPE_SYN_STREAM => ("SYN_STREAM", SYN_STREAM_FIXED_LEN),
            TYPE_SYN_REPLY => ("SYN_REPLY", STREAM_ID_LEN),
            TYPE_HEADERS => ("HEADERS", STREAM_ID_LEN),
            _ => return Ok(None),
        };
        if payload.len() < fixed_len {
            return Err(HeaderError::FrameTooShort {
                frame: frame_name,
                len: payload.len(),
            });
        }
        let block = self.inflate(&payload[fixed_len..])?;
        let headers = read_headers(&block)?;
        if frame_type != TYPE_SYN_STREAM {
            return Ok(None);
        }
        let stream_id = u32::from_be_bytes([payload[0] & 0x7f, payload[1], payload[2], payload[3]]);
        Ok(Some(OpenedStream {
            stream_id,
            name: headers.stream_type.map_or(UNKNOWN_STREAM, recorded_name),
            port: headers
                .port
                .and_then(|port| std::str::from_utf8(port).ok())
                .and_then(|port| port.parse().ok()),
            request_id: headers
                .request_id
                .map(|id| String::from_utf8_lossy(id).into_owned()),
        }))
    }

    /// Inflates one header block, which ends at a sync flush of the connection's zlib stream.
    fn inflate(&mut self, mut input: &[u8]) -> Result<Vec<u8>, HeaderError> {
        let mut block = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let before_in = self.inflater.total_in();
            let before_out = self.inflater.total_out();
            let result = self
                .inflater
                .decompress(input, &mut chunk, FlushDecompress::Sync);
            let read = (self.inflater.total_in() - before_in) as usize;
            let written = (self.inflater.total_out() - before_out) as usize;
            input = &input[read..];
            block.extend_from_slice(&chunk[..written]);
            if block.len() > MAX_HEADER_BLOCK {
                return Err(HeaderError::TooLarge);
            }
            if let Err(error) = result {
                // The first block starts the zlib stream, whose header requests the dictionary.
                match error.needs_dictionary() {
                    Some(DICTIONARY_ID) => {
                        self.inflater
                            .set_dictionary(header_dictionary())
                            .map_err(HeaderError::Inflate)?;
                        continue;
                    }
                    Some(id) => return Err(HeaderError::WrongDictionary { id }),
                    None => return Err(HeaderError::Inflate(error)),
                }
            }
            // With all input read and room left in the chunk, the inflater has nothing more
            // to write until the next block arrives.
            if input.is_empty() && written < chunk.len() {
                return Ok(block);
            }
            if read == 0 && written == 0 {
                return Err(HeaderError::Stalled);
            }
        }
    }
}

/// Returns the recorded name of a stream of type `stream_type`. Types are matched exactly, so
/// `Stdout` is recorded as unknown.
fn recorded_name(stream_type: &[u8]) -> &'static str {
    match stream_type {
        b"error" => "error",
        b"stdin" => "stdin",
        b"stdout" => "stdout",
        b"stderr" => "stderr",
        b"resize" => "resize",
        b"data" => "data",
        _ => UNKNOWN_STREAM,
    }
}

/// The headers of a decompressed header block that the gateway uses: the first value of the
/// first header of each name.
#[derive(Debug, Default)]
struct BlockHeaders<'a> {
    stream_type: Option<&'a [u8]>,
    port: Option<&'a [u8]>,
    request_id: Option<&'a [u8]>,
}

/// Reads `streamtype`, `port` and `requestid` from a decompressed header block.
fn read_headers(block: &[u8]) -> Result<BlockHeaders<'_>, HeaderError> {
    let mut rest = block;
    let count = read_u32(&mut rest).ok_or(HeaderError::NoPairCount { len: block.len() })?;
    let truncated = || HeaderError::Truncated { count };
    let mut headers = BlockHeaders::default();
    // Every pair takes at least 8 bytes, so a false count ends at the block's end.
    for _ in 0..count {
        let name = read_string(&mut rest).ok_or_else(truncated)?;
        let value = read_string(&mut rest).ok_or_else(truncated)?;
        let slot = if name.eq_ignore_ascii_case(b"streamtype") {
            &mut headers.stream_type
        } else if name.eq_ignore_ascii_case(b"port") {
            &mut headers.port
        } else if name.eq_ignore_ascii_case(b"requestid") {
            &mut headers.request_id
        } else {
            continue;
        };
        if slot.is_none() {
            *slot = value.split(|&byte| byte == 0).next();
        }
    }
    Ok(headers)
}

fn read_u32(rest: &mut &[u8]) -> Option<u32> {
    let (head, tail) = rest.split_first_chunk::<4>()?;
    *rest = tail;
    Some(u32::from_be_bytes(*head))
}

/// Reads a 32-bit length, then that many bytes.
fn read_string<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = read_u32(rest)? as usize;
    if rest.len() < len {
        return None;
    }
    let (head, tail) = rest.split_at(len);
    *rest = tail;
    Some(head)
}

/// Names of the SPDY streams of one connection, by stream id, shared by both relay
/// directions. The client-to-server relay stores a name when it reads the stream's SYN_STREAM,
/// before it passes the frame on, so the name is stored before the server can send data on
/// the stream.
#[derive(Debug, Default)]
pub struct StreamNames {
    names: Mutex<Vec<(u32, &'static str)>>,
}

impl StreamNames {
    /// Stores the name of a stream. A repeated SYN_STREAM for a stream keeps the first name.
    /// Returns false, storing nothing, when [`MAX_STREAMS`] streams are already named.
    #[must_use]
    pub fn insert(&self, stream: &OpenedStream) -> bool {
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        if names.iter().any(|(id, _)| *id == stream.stream_id) {
            return true;
        }
        if names.len() >= MAX_STREAMS {
            return false;
        }
        names.push((stream.stream_id, stream.name));
        true
    }

    /// Returns the name of stream `stream_id`, or [`UNKNOWN_STREAM`] when none is stored.
    pub fn get(&self, stream_id: u32) -> &'static str {
        let names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        names
            .iter()
            .find(|(id, _)| *id == stream_id)
            .map_or(UNKNOWN_STREAM, |(_, name)| name)
    }
}

/// Compresses header blocks as a SPDY/3 client does, to build test input.
#[cfg(test)]
pub(super) struct HeaderEncoder {
    deflater: flate2::Compress,
}

#[cfg(test)]
impl HeaderEncoder {
    pub fn new() -> Self {
        let mut deflater = flate2::Compress::new(flate2::Compression::default(), true);
        deflater
            .set_dictionary(header_dictionary())
            .expect("a new deflater accepts a dictionary");
        Self { deflater }
    }

    /// Compresses `block` and sync-flushes it, continuing the connection's zlib stream.
    pub fn compress(&mut self, block: &[u8]) -> Vec<u8> {
        let mut compressed = Vec::new();
        let mut input = block;
        loop {
            compressed.reserve(input.len() + 128);
            let before = self.deflater.total_in();
            self.deflater
                .compress_vec(input, &mut compressed, flate2::FlushCompress::Sync)
                .expect("compress a header block");
            input = &input[(self.deflater.total_in() - before) as usize..];
            // A sync flush is complete once the deflater leaves output space unused.
            if input.is_empty() && compressed.len() < compressed.capacity() {
                return compressed;
            }
        }
    }

    /// Builds a SYN_STREAM frame opening `stream_id` with `headers`.
    pub fn syn_stream(&mut self, stream_id: u32, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut payload = stream_id.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0; 6]);
        payload.extend(self.compress(&header_block(headers)));
        control_frame(TYPE_SYN_STREAM, &payload)
    }
}

/// Builds an uncompressed header block of `headers`.
#[cfg(test)]
pub(super) fn header_block(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut block = (headers.len() as u32).to_be_bytes().to_vec();
    for (name, value) in headers {
        for part in [name, value] {
            block.extend_from_slice(&(part.len() as u32).to_be_bytes());
            block.extend_from_slice(part.as_bytes());
        }
    }
    block
}

/// Builds a SPDY/3 control frame of type `frame_type` with no flags.
#[cfg(test)]
pub(super) fn control_frame(frame_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80, 0x03];
    frame.extend_from_slice(&frame_type.to_be_bytes());
    frame.push(0);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(payload);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_has_draft_3_checksum() {
        // Adler-32 of the SPDY/3 dictionary, the DICTID that clients write into the zlib
        // header of every header stream.
        let mut deflater = flate2::Compress::new(flate2::Compression::default(), true);
        let id = deflater
            .set_dictionary(header_dictionary())
            .expect("set dictionary");
        assert_eq!(id, 0xe3c6a7c2, "dictionary checksum {id:#x}");
        assert_eq!(id, DICTIONARY_ID);
    }

    /// Several SYN_STREAMs share one zlib stream, so each block decodes only after the ones
    /// before it, and a HEADERS frame between them is inflated too.
    #[test]
    fn syn_streams_share_one_zlib_stream() {
        let mut encoder = HeaderEncoder::new();
        let mut decoder = HeaderDecoder::new();
        let streams = [
            (1, "error"),
            (3, "stdin"),
            (5, "stdout"),
            (7, "stderr"),
            (9, "resize"),
        ];
        for (stream_id, stream_type) in streams {
            let frame = encoder.syn_stream(
                stream_id,
                &[("streamtype", stream_type), ("x-request-id", "0")],
            );
            let opened = decoder
                .read_control_frame(&frame)
                .expect("valid SYN_STREAM")
                .expect("a SYN_STREAM opens a stream");
            assert_eq!(opened.stream_id, stream_id);
            assert_eq!(opened.name, stream_type);

            let mut headers = 1u32.to_be_bytes().to_vec();
            headers.extend(encoder.compress(&header_block(&[("streamtype", "stdout")])));
            let read = decoder
                .read_control_frame(&control_frame(TYPE_HEADERS, &headers))
                .expect("valid HEADERS");
            assert_eq!(read, None, "HEADERS opens no stream");
        }
    }

    #[test]
    fn port_forward_headers_read() {
        let mut encoder = HeaderEncoder::new();
        let mut decoder = HeaderDecoder::new();
        let opened = decoder
            .read_control_frame(&encoder.syn_stream(
                3,
                &[("streamtype", "data"), ("port", "5432"), ("requestid", "7")],
            ))
            .expect("valid SYN_STREAM")
            .expect("a stream");
        assert_eq!(
            opened,
            OpenedStream {
                stream_id: 3,
                name: "data",
                port: Some(5432),
                request_id: Some("7".to_string()),
            }
        );
        let bad_port = decoder
            .read_control_frame(
                &encoder.syn_stream(5, &[("streamtype", "error"), ("port", "http")]),
            )
            .expect("valid SYN_STREAM")
            .expect("a stream");
        assert_eq!(bad_port.port, None);
        assert_eq!(bad_port.request_id, None);
    }

    #[test]
    fn stream_type_read_from_any_pair() {
        let mut encoder = HeaderEncoder::new();
        let mut decoder = HeaderDecoder::new();
        let cases: [(&[(&str, &str)], &str); 5] = [
            (&[("port", "80"), ("streamtype", "stderr")], "stderr"),
            (&[("StreamType", "stdin")], "stdin"),
            (&[("streamtype", "stdout\0stderr")], "stdout"),
            (&[("streamtype", "Stdout")], UNKNOWN_STREAM),
            (&[("port", "80")], UNKNOWN_STREAM),
        ];
        for (stream_id, (headers, name)) in (1..).step_by(2).zip(cases) {
            let opened = decoder
                .read_control_frame(&encoder.syn_stream(stream_id, headers))
                .expect("valid SYN_STREAM")
                .expect("a stream");
            assert_eq!(opened.name, name, "{headers:?}");
        }
    }

    #[test]
    fn oversized_block_rejected() {
        let mut encoder = HeaderEncoder::new();
        let mut decoder = HeaderDecoder::new();
        // Repeated bytes compress to under 1 KiB but inflate past the limit.
        let value = "a".repeat(MAX_HEADER_BLOCK);
        let frame = encoder.syn_stream(1, &[("streamtype", "stdout"), ("x", &value)]);
        assert!(frame.len() < 1024, "{} bytes", frame.len());
        let result = decoder.read_control_frame(&frame);
        assert!(matches!(result, Err(HeaderError::TooLarge)), "{result:?}");

        // A block just under the limit is read.
        let mut decoder = HeaderDecoder::new();
        let mut encoder = HeaderEncoder::new();
        let value = "a".repeat(MAX_HEADER_BLOCK - 100);
        let frame = encoder.syn_stream(1, &[("streamtype", "stdout"), ("x", &value)]);
        let opened = decoder
            .read_control_frame(&frame)
            .expect("a block under the limit")
            .expect("a stream");
        assert_eq!(opened.name, "stdout");
    }

    #[test]
    fn corrupt_blocks_rejected() {
        // Not a zlib stream at all.
        let mut decoder = HeaderDecoder::new();
        let mut payload = 1u32.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0; 6]);
        payload.extend_from_slice(b"not zlib at all");
        let result = decoder.read_control_frame(&control_frame(TYPE_SYN_STREAM, &payload));
        assert!(matches!(result, Err(HeaderError::Inflate(_))), "{result:?}");

        // A zlib stream primed with another dictionary.
        let mut deflater = flate2::Compress::new(flate2::Compression::default(), true);
        let id = deflater
            .set_dictionary(b"another dictionary")
            .expect("set dictionary");
        let mut other = HeaderEncoder { deflater };
        let mut decoder = HeaderDecoder::new();
        let result = decoder.read_control_frame(&other.syn_stream(1, &[("streamtype", "stdout")]));
        assert!(
            matches!(result, Err(HeaderError::WrongDictionary { id: found }) if found == id),
            "{result:?}"
        );

        // A valid first block, then bytes that continue the zlib stream wrongly.
        let mut encoder = HeaderEncoder::new();
        let mut decoder = HeaderDecoder::new();
        decoder
            .read_control_frame(&encoder.syn_stream(1, &[("streamtype", "stdout")]))
            .expect("valid first SYN_STREAM");
        let mut payload = 3u32.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0; 6]);
        payload.extend_from_slice(&[0xff; 16]);
        let result = decoder.read_control_frame(&control_frame(TYPE_SYN_STREAM, &payload));
        assert!(matches!(result, Err(HeaderError::Inflate(_))), "{result:?}");

        // A block whose pair count is larger than the pairs it contains.
        let mut encoder = HeaderEncoder::new();
        let mut decoder = HeaderDecoder::new();
        let mut block = header_block(&[("streamtype", "stdout")]);
        block[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut payload = 1u32.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0; 6]);
        payload.extend(encoder.compress(&block));
        let result = decoder.read_control_frame(&control_frame(TYPE_SYN_STREAM, &payload));
        assert!(
            matches!(result, Err(HeaderError::Truncated { count: u32::MAX })),
            "{result:?}"
        );

        // An empty block, with no pair count.
        let mut encoder = HeaderEncoder::new();
        let mut decoder = HeaderDecoder::new();
        let mut payload = 1u32.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0; 6]);
        payload.extend(encoder.compress(&[]));
        let result = decoder.read_control_frame(&control_frame(TYPE_SYN_STREAM, &payload));
        assert!(
            matches!(result, Err(HeaderError::NoPairCount { len: 0 })),
            "{result:?}"
        );

        // A SYN_STREAM too short for its fixed fields.
        let mut decoder = HeaderDecoder::new();
        let result = decoder.read_control_frame(&control_frame(TYPE_SYN_STREAM, &[0; 9]));
        assert!(
            matches!(result, Err(HeaderError::FrameTooShort { len: 9, .. })),
            "{result:?}"
        );
    }

    #[test]
    fn other_control_frames_ignored() {
        let mut decoder = HeaderDecoder::new();
        // RST_STREAM and PING carry no header block, so their payload is not inflated.
        for frame_type in [3, 6] {
            let read = decoder
                .read_control_frame(&control_frame(frame_type, &[0xff; 8]))
                .expect("no header block to read");
            assert_eq!(read, None);
        }
    }

    #[test]
    fn stream_names_bounded() {
        let names = StreamNames::default();
        for stream_id in (1..).step_by(2).take(MAX_STREAMS) {
            let stream = OpenedStream {
                stream_id,
                name: "stdout",
                port: None,
                request_id: None,
            };
            assert!(names.insert(&stream), "stream {stream_id}");
        }
        let repeated = OpenedStream {
            stream_id: 1,
            name: "stdin",
            port: None,
            request_id: None,
        };
        assert!(names.insert(&repeated), "a repeated stream takes no room");
        assert_eq!(names.get(1), "stdout", "the first name is kept");
        let extra = OpenedStream {
            stream_id: 999,
            name: "stderr",
            port: None,
            request_id: None,
        };
        assert!(!names.insert(&extra));
        assert_eq!(names.get(999), UNKNOWN_STREAM);
    }
}
