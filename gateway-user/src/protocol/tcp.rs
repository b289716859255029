//! Byte-for-byte relay between the client and the upstream connection, used for targets of
//! class `tcp` (and, for now, every other class).
//!
//! Each direction first reads into a buffer on the stack and writes it straight on, which is
//! the cheapest way for the small request-and-reply messages most protocols exchange. When a
//! read fills that buffer, more is likely waiting, and the direction switches to `splice(2)`
//! through a pipe, so bulk data never passes through user space. The pipe is created then and
//! closed as soon as the socket has nothing more to read, so an idle connection keeps no pipe
//! and no buffer. A direction writes out what it read before it reads again, which is the
//! backpressure: at most one pipe's worth is in flight per direction. End of stream in one
//! direction is passed on as a half-close (`shutdown(SHUT_WR)`), and the other direction keeps
//! flowing until it ends too.

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use std::{net::Shutdown, os::fd::AsFd as _};

use socket2::SockRef;
use tokio::{io::Interest, net::TcpStream, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    record::Outcome,
    sys::{self, Pipe},
};

/// Pipe buffer requested per direction while data flows. 256 KiB lets one splice move several
/// socket buffers' worth at a time; the kernel caps it at `/proc/sys/fs/pipe-max-size`.
pub const PIPE_CAPACITY: usize = 1024 * 1024;

/// Result of a relayed session.
#[derive(Debug)]
pub struct RelayResult {
    pub outcome: Outcome,
    pub reason: Option<String>,
    pub bytes_from_client: u64,
    pub bytes_from_upstream: u64,
}

/// Side of a failure, for the recorded reason.
#[derive(Clone, Copy, Debug)]
enum Side {
    Client,
    Upstream,
}

pub(crate) struct Counters {
    pub(crate) from_client: AtomicU64,
    pub(crate) from_upstream: AtomicU64,
    /// Milliseconds since `start` of the last byte moved in either direction.
    last_activity_ms: AtomicU64,
    start: Instant,
}

impl Counters {
    pub(crate) fn new() -> Self {
        Self {
            from_client: AtomicU64::new(0),
            from_upstream: AtomicU64::new(0),
            last_activity_ms: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    pub(crate) fn touch(&self) {
        let elapsed = self.start.elapsed().as_millis() as u64;
        self.last_activity_ms.store(elapsed, Ordering::Relaxed);
    }
}

/// Relays until both directions have ended, the connection has been idle for
/// `idle_timeout`, or `force_close` fires.
pub async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    idle_timeout: Duration,
    force_close: CancellationToken,
) -> RelayResult {
    let counters = Arc::new(Counters::new());
    let to_upstream = pump(&client, &upstream, &counters, Side::Client);
    let to_client = pump(&upstream, &client, &counters, Side::Upstream);
    let both = async { tokio::try_join!(to_upstream, to_client) };

    let (outcome, reason) = tokio::select! {
        result = both => match result {
            Ok(_) => (Outcome::Closed, None),
            Err((side, error)) => (Outcome::Error, Some(format!("{side:?} side: {error}").to_lowercase())),
        },
        () = idle(&counters, idle_timeout) => (
            Outcome::IdleTimeout,
            Some(format!("no bytes either way for {}", humantime::format_duration(idle_timeout))),
        ),
        () = force_close.cancelled() => (
            Outcome::Shutdown,
            Some("closed by the proxy: drain deadline passed during shutdown".to_string()),
        ),
    };
    RelayResult {
        outcome,
        reason,
        bytes_from_client: counters.from_client.load(Ordering::Relaxed),
        bytes_from_upstream: counters.from_upstream.load(Ordering::Relaxed),
    }
}

/// Moves one direction until end of stream, then half-closes the destination.
async fn pump(
    source: &TcpStream,
    destination: &TcpStream,
    counters: &Counters,
    side: Side,
) -> Result<(), (Side, io::Error)> {
    let counter = match side {
        Side::Client => &counters.from_client,
        Side::Upstream => &counters.from_upstream,
    };
    let read_error = |error| (side, error);
    let write_error = |error| {
        let other = match side {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        };
        (other, error)
    };

    loop {
        source.readable().await.map_err(read_error)?;

        let copied = copy_once(source, destination);
        let (read, mut unwritten) = match copied {
            Ok(Copied::End) => {
                SockRef::from(destination)
                    .shutdown(Shutdown::Write)
                    .map_err(write_error)?;
                return Ok(());
            }
            Ok(Copied::Bytes { read, unwritten }) => (read, unwritten),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(read_error(error)),
        };
        // What the destination did not take at once waits here, off the stack.
        let mut sent = 0;
        while sent < unwritten.len() {
            destination.writable().await.map_err(write_error)?;
            match destination.try_write(&unwritten[sent..]) {
                Ok(moved) => sent += moved,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(write_error(error)),
            }
        }
        unwritten.clear();
        counter.fetch_add(read as u64, Ordering::Relaxed);
        counters.touch();

        if read == COPY_BUFFER {
            splice_while_readable(source, destination, counter, counters)
                .await
                .map_err(|(failed, error)| match failed {
                    Failed::Read => read_error(error),
                    Failed::Write => write_error(error),
                })?;
        }
    }
}

/// Bytes read per copy through user space; a read that fills it switches to splicing.
const COPY_BUFFER: usize = 16 * 1024;

/// Result of one copy through user space.
enum Copied {
    /// The source reached end of stream.
    End,
    /// `read` bytes were read; the destination took all but `unwritten`.
    Bytes { read: usize, unwritten: Vec<u8> },
}

/// Reads once from `source` into a stack buffer and writes as much as the destination takes
/// without waiting. Synchronous, so the buffer never becomes part of the session's state.
fn copy_once(source: &TcpStream, destination: &TcpStream) -> io::Result<Copied> {
    let mut buffer = [0u8; COPY_BUFFER];
    let read = read_draining(source, &mut buffer)?;
    if read == 0 {
        return Ok(Copied::End);
    }
    let mut written = 0;
    while written < read {
        match destination.try_write(&buffer[written..read]) {
            Ok(moved) => written += moved,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
            // Reported by the wait for writability that follows.
            Err(_) => break,
        }
    }
    Ok(Copied::Bytes {
        read,
        unwritten: buffer[written..read].to_vec(),
    })
}

/// Reads once from `source`, and clears the read readiness after a short read, which emptied
/// the socket, as tokio's `poll_read` does. The next wait then goes to epoll, not to a read
/// that finds `WouldBlock`.
fn read_draining(source: &TcpStream, buffer: &mut [u8]) -> io::Result<usize> {
    let mut short_read = 0;
    let result = source.try_io(Interest::READABLE, || {
        let read = io::Read::read(&mut &*SockRef::from(source), buffer)?;
        if read > 0 && read < buffer.len() {
            short_read = read;
            // Reported as WouldBlock only so that `try_io` clears the readiness.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(read)
    });
    match result {
        Err(error) if error.kind() == io::ErrorKind::WouldBlock && short_read > 0 => Ok(short_read),
        other => other,
    }
}

/// Failed end of a splice.
enum Failed {
    Read,
    Write,
}

/// Moves data with splice until the source has nothing more to read right now. End of stream
/// is left for the next read through user space to see.
async fn splice_while_readable(
    source: &TcpStream,
    destination: &TcpStream,
    counter: &AtomicU64,
    counters: &Counters,
) -> Result<(), (Failed, io::Error)> {
    let pipe = Pipe::new(PIPE_CAPACITY).map_err(|error| (Failed::Read, error))?;
    loop {
        let filled = source.try_io(Interest::READABLE, || {
            sys::splice(source.as_fd(), pipe.write.as_fd(), PIPE_CAPACITY)
        });
        let mut in_pipe = match filled {
            // End of stream: the caller's next read returns it too.
            Ok(0) => return Ok(()),
            Ok(moved) => moved,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(error) => return Err((Failed::Read, error)),
        };
        while in_pipe > 0 {
            destination
                .writable()
                .await
                .map_err(|error| (Failed::Write, error))?;
            let drained = destination.try_io(Interest::WRITABLE, || {
                sys::splice(pipe.read.as_fd(), destination.as_fd(), in_pipe)
            });
            match drained {
                Ok(moved) => {
                    in_pipe -= moved;
                    counter.fetch_add(moved as u64, Ordering::Relaxed);
                    counters.touch();
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err((Failed::Write, error)),
            }
        }
    }
}

/// Completes once no byte has moved for `timeout`.
pub(crate) async fn idle(counters: &Counters, timeout: Duration) {
    loop {
        let last = counters.last_activity_ms.load(Ordering::Relaxed);
        let deadline = counters.start + Duration::from_millis(last) + timeout;
        tokio::time::sleep_until(deadline).await;
        if counters.last_activity_ms.load(Ordering::Relaxed) == last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    /// Returns (client end, proxy's client-side end, proxy's upstream end, server end).
    async fn socket_pairs() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        let client = TcpStream::connect(addr).await.expect("connect client");
        let (proxy_client, _) = listener.accept().await.expect("accept client");
        let upstream = TcpStream::connect(addr).await.expect("connect upstream");
        let (server, _) = listener.accept().await.expect("accept upstream");
        (client, proxy_client, upstream, server)
    }

    #[tokio::test]
    async fn relay_half_close_keeps_other_direction() {
        let (mut client, proxy_client, upstream, mut server) = socket_pairs().await;
        let relay = tokio::spawn(relay(
            proxy_client,
            upstream,
            Duration::from_secs(30),
            CancellationToken::new(),
        ));

        client.write_all(b"request").await.expect("client write");
        client.shutdown().await.expect("client half-close");
        let mut request = Vec::new();
        server
            .read_to_end(&mut request)
            .await
            .expect("server reads to EOF");
        assert_eq!(request, b"request");

        // The client's half-close must not have closed the way back.
        server
            .write_all(b"late reply")
            .await
            .expect("server write after EOF");
        server.shutdown().await.expect("server close");
        let mut reply = Vec::new();
        client
            .read_to_end(&mut reply)
            .await
            .expect("client reads reply");
        assert_eq!(reply, b"late reply");

        let result = relay.await.expect("relay task");
        assert_eq!(result.outcome, Outcome::Closed);
        assert_eq!(result.bytes_from_client, 7);
        assert_eq!(result.bytes_from_upstream, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn relay_idle_timeout_closes() {
        let (_client, proxy_client, upstream, _server) = socket_pairs().await;
        let result = relay(
            proxy_client,
            upstream,
            Duration::from_secs(5),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(result.outcome, Outcome::IdleTimeout);
        assert_eq!(result.bytes_from_client, 0);
    }

    #[tokio::test]
    async fn relay_small_and_bulk_writes() {
        let (mut client, proxy_client, upstream, mut server) = socket_pairs().await;
        let relay = tokio::spawn(relay(
            proxy_client,
            upstream,
            Duration::from_secs(30),
            CancellationToken::new(),
        ));

        // A short message goes through the stack buffer, 4 MiB through the pipe.
        let bulk: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let sent = bulk.clone();
        let writer = tokio::spawn(async move {
            client
                .write_all(b"hello")
                .await
                .expect("client small write");
            client.write_all(&sent).await.expect("client bulk write");
            client.shutdown().await.expect("client half-close");
            client
        });
        let mut received = Vec::new();
        server
            .read_to_end(&mut received)
            .await
            .expect("server reads to EOF");
        assert_eq!(received.len(), 5 + bulk.len());
        assert_eq!(&received[..5], b"hello");
        assert!(received[5..] == bulk[..], "bulk bytes changed on the way");

        let mut client = writer.await.expect("writer task");
        server.write_all(b"bye").await.expect("server write");
        server.shutdown().await.expect("server close");
        let mut reply = Vec::new();
        client
            .read_to_end(&mut reply)
            .await
            .expect("client reads reply");
        assert_eq!(reply, b"bye");

        let result = relay.await.expect("relay task");
        assert_eq!(result.outcome, Outcome::Closed);
        assert_eq!(result.bytes_from_client, 5 + bulk.len() as u64);
        assert_eq!(result.bytes_from_upstream, 3);
    }

    #[tokio::test]
    async fn relay_force_close_ends_session() {
        let (_client, proxy_client, upstream, _server) = socket_pairs().await;
        let force = CancellationToken::new();
        force.cancel();
        let result = relay(proxy_client, upstream, Duration::from_secs(30), force).await;
        assert_eq!(result.outcome, Outcome::Shutdown);
    }
}
