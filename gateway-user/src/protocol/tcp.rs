//! Byte-for-byte relay between the client and the upstream connection, used for targets of
//! class `tcp` (and, for now, every other class).
//!
//! Bytes move with `splice(2)` through a pipe per direction, so they never pass through user
//! space. Each direction creates its pipe when data arrives and closes it as soon as the socket
//! has nothing more to read, so an idle connection keeps no pipe and no buffer. A direction
//! empties its pipe into the destination before it reads again, which is the backpressure: at
//! most one pipe's worth is in flight per direction. End of stream in one direction is passed
//! on as a half-close (`shutdown(SHUT_WR)`), and the other direction keeps flowing until it
//! ends too.

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

        // Only now take a pipe, and keep it while the socket has data.
        let pipe = Pipe::new(PIPE_CAPACITY).map_err(read_error)?;
        loop {
            let filled = source.try_io(Interest::READABLE, || {
                sys::splice(source.as_fd(), pipe.write.as_fd(), PIPE_CAPACITY)
            });
            let mut in_pipe = match filled {
                Ok(0) => {
                    SockRef::from(destination)
                        .shutdown(Shutdown::Write)
                        .map_err(write_error)?;
                    return Ok(());
                }
                Ok(moved) => moved,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(read_error(error)),
            };

            while in_pipe > 0 {
                destination.writable().await.map_err(write_error)?;
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
                    Err(error) => return Err(write_error(error)),
                }
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
    async fn relay_force_close_ends_session() {
        let (_client, proxy_client, upstream, _server) = socket_pairs().await;
        let force = CancellationToken::new();
        force.cancel();
        let result = relay(proxy_client, upstream, Duration::from_secs(30), force).await;
        assert_eq!(result.outcome, Outcome::Shutdown);
    }
}
