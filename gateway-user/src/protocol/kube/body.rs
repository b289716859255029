//! Response bodies on their way to the client: PANs masked in place as each chunk passes, and
//! the request's record written when the body ends.
//!
//! Masking keeps lengths, so `Content-Length` stays true. A chunk is passed on as soon as it
//! is scanned, apart from a short tail that could still be the start of a PAN; the masker holds
//! that tail until the next chunk or the end of the body. Watch events end in a newline, so a
//! watch event is never held back.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Instant,
};

use bytes::{Buf as _, Bytes};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use serde_json::{Value, json};

use super::Recording;
use crate::mask::StreamMasker;

/// The record of one request, written once: when its response body ends, fails or is dropped
/// (the client went away), or at once for answers the gateway makes itself.
#[derive(Debug)]
pub struct RequestLog {
    record: Recording,
    /// Attribution, token subject and request body, prepared when the request arrived.
    fields: Value,
    started: Instant,
    pub status: u16,
    pub outcome: &'static str,
    pub response_bytes: u64,
    pub masked: usize,
    pub error: Option<String>,
    /// Set once the response body reached its end.
    complete: bool,
    written: bool,
}

impl RequestLog {
    pub fn new(record: Recording, fields: Value, started: Instant) -> Self {
        Self {
            record,
            fields,
            started,
            status: 0,
            outcome: "allowed",
            response_bytes: 0,
            masked: 0,
            error: None,
            complete: false,
            written: false,
        }
    }

    /// The event's fields: attribution, token subject, request body.
    pub fn fields_mut(&mut self) -> &mut Value {
        &mut self.fields
    }

    /// Marks the response as fully sent (answers the gateway makes itself, upgrades).
    pub fn mark_complete(&mut self) {
        self.complete = true;
    }

    /// Writes the `kube.request` event.
    pub fn write(&mut self) {
        if self.written {
            return;
        }
        self.written = true;
        let mut fields = std::mem::take(&mut self.fields);
        if let Value::Object(map) = &mut fields {
            map.insert("outcome".into(), json!(self.outcome));
            map.insert("status".into(), json!(self.status));
            map.insert(
                "response".into(),
                json!({
                    "bytes": self.response_bytes,
                    "pans_masked": self.masked,
                    "complete": self.complete,
                }),
            );
            map.insert(
                "duration_ms".into(),
                json!(self.started.elapsed().as_millis() as u64),
            );
            if let Some(error) = &self.error {
                map.insert("error".into(), json!(error));
            }
        }
        super::record_event(&self.record, "kube.request", fields);
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        if !self.complete && self.error.is_none() && self.status != 101 {
            self.error = Some("response not finished: the client closed the stream".into());
        }
        self.write();
    }
}

/// A response body from the API server with PANs masked.
#[derive(Debug)]
pub struct MaskedBody {
    inner: Incoming,
    masker: StreamMasker,
    /// Masks named JSON fields whole before card numbers are looked for.
    fields: Option<super::fields::FieldMasker>,
    /// Trailers that arrived while the masker still held bytes; sent after them.
    pending_trailers: Option<http::HeaderMap>,
    done: bool,
    /// Set at the first poll; from then on the inner size hint leaves out held-back bytes.
    polled: bool,
    log: RequestLog,
}

impl MaskedBody {
    /// Wraps `inner`, masked with `masker`.
    pub fn new(inner: Incoming, masker: StreamMasker, log: RequestLog) -> Self {
        Self {
            inner,
            masker,
            fields: None,
            pending_trailers: None,
            done: false,
            polled: false,
            log,
        }
    }

    /// Masks the values of named JSON fields too.
    pub fn with_fields(mut self, fields: Option<super::fields::FieldMasker>) -> Self {
        self.fields = fields;
        self
    }

    fn settle(&mut self, output: Vec<u8>) -> Option<Frame<Bytes>> {
        self.log.response_bytes += output.len() as u64;
        (!output.is_empty()).then(|| Frame::data(Bytes::from(output)))
    }
}

impl Body for MaskedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        this.polled = true;
        loop {
            if let Some(trailers) = this.pending_trailers.take() {
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            if this.done {
                return Poll::Ready(None);
            }

            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let mut output = Vec::with_capacity(data.len() + 32);
                        let data = match &mut this.fields {
                            Some(fields) => {
                                let mut copy = data.to_vec();
                                let before = fields.masked;
                                fields.apply(&mut copy);
                                this.log.masked += fields.masked - before;
                                Bytes::from(copy)
                            }
                            None => data,
                        };
                        this.log.masked += this.masker.feed(&data, &mut output);
                        if let Some(frame) = this.settle(output) {
                            return Poll::Ready(Some(Ok(frame)));
                        }
                    }
                    Err(frame) => {
                        // Trailers end the body: flush the held-back bytes before them.
                        let mut output = Vec::new();
                        this.log.masked += this.masker.finish(&mut output);
                        this.pending_trailers = frame.into_trailers().ok();
                        this.done = true;
                        this.log.complete = true;
                        if let Some(frame) = this.settle(output) {
                            return Poll::Ready(Some(Ok(frame)));
                        }
                    }
                },
                Some(Err(error)) => {
                    // The held-back tail is dropped with the broken body: it could be half a
                    // PAN, and the client sees a failed response either way.
                    this.log.error = Some(format!("upstream body failed: {error}"));
                    this.done = true;
                    return Poll::Ready(Some(Err(error)));
                }
                None => {
                    let mut output = Vec::new();
                    this.log.masked += this.masker.finish(&mut output);
                    this.done = true;
                    this.log.complete = true;
                    if let Some(frame) = this.settle(output) {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending_trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Masking keeps lengths, so the upstream's exact length stays exact before the first
        // chunk. Afterwards the masker may hold bytes the inner body no longer counts.
        if self.done {
            SizeHint::with_exact(0)
        } else if !self.polled {
            self.inner.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

/// Responses of one client connection: how many were started and how many reached their end.
/// When the client resets the connection, the difference separates a cut response from a
/// client that closed after its last one.
#[derive(Debug, Default)]
pub struct ResponseCounts {
    started: AtomicU64,
    finished: AtomicU64,
}

impl ResponseCounts {
    /// Tells whether every response started has reached its end.
    pub fn all_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire) == self.started.load(Ordering::Acquire)
    }

    /// Counts a request as started, before its handling begins.
    pub fn start(&self) {
        self.started.fetch_add(1, Ordering::AcqRel);
    }
}

/// A response body that counts itself finished on its session once its last frame is out.
pub struct CountedBody<B> {
    inner: B,
    counts: Arc<ResponseCounts>,
    /// The body's exact length, if known when the response started: hyper stops polling once
    /// that many bytes are out, without waiting for the body's end.
    length: Option<u64>,
    /// Data bytes passed on so far.
    sent: u64,
    /// Set once the end was counted, which `is_end_stream` may be the first to see.
    counted: AtomicBool,
}

impl<B: Body> CountedBody<B> {
    pub fn new(inner: B, counts: Arc<ResponseCounts>) -> Self {
        let body = Self {
            length: inner.size_hint().exact(),
            inner,
            counts,
            sent: 0,
            counted: AtomicBool::new(false),
        };
        // An empty body (a 101, a 204) may never be polled.
        if body.length == Some(0) {
            body.count_end();
        }
        body
    }

    fn count_end(&self) {
        if !self.counted.swap(true, Ordering::AcqRel) {
            self.counts.finished.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl<B> std::fmt::Debug for CountedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountedBody")
            .field("counted", &self.counted)
            .finish_non_exhaustive()
    }
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(data)) = frame
            .as_ref()
            .map(|frame| frame.as_ref().map(Frame::data_ref))
        {
            self.sent += data.map_or(0, |data| data.remaining() as u64);
        }
        // A body that ends with its last frame, or with its declared length, is not polled
        // again.
        if frame.is_none() || self.inner.is_end_stream() || Some(self.sent) == self.length {
            self.count_end();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.count_end();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, Full, StreamBody};

    #[tokio::test]
    async fn sized_body_finished_at_its_length() {
        let counts = Arc::new(ResponseCounts::default());
        counts.start();
        let mut body = CountedBody::new(
            Full::new(Bytes::from_static(b"0123456789")),
            Arc::clone(&counts),
        );
        assert!(!counts.all_finished());
        let frame = body.frame().await.expect("a frame").expect("no error");
        assert_eq!(frame.into_data().expect("data").len(), 10);
        assert!(counts.all_finished());
    }

    #[tokio::test]
    async fn streamed_body_finished_only_at_its_end() {
        let counts = Arc::new(ResponseCounts::default());
        counts.start();
        let chunks = ["first ", "second"]
            .map(|chunk| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(chunk))));
        let mut body = CountedBody::new(
            StreamBody::new(futures_util::stream::iter(chunks)),
            Arc::clone(&counts),
        );
        body.frame().await.expect("a frame").expect("no error");
        assert!(!counts.all_finished(), "one chunk of two is out");
        body.frame().await.expect("a frame").expect("no error");
        assert!(body.frame().await.is_none());
        assert!(counts.all_finished());

        // A body dropped before its end, as when the client resets mid-response, stays open.
        counts.start();
        let chunks = ["only part"]
            .map(|chunk| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(chunk))));
        let mut cut = CountedBody::new(
            StreamBody::new(futures_util::stream::iter(chunks)),
            Arc::clone(&counts),
        );
        cut.frame().await.expect("a frame").expect("no error");
        drop(cut);
        assert!(!counts.all_finished());
    }
}
