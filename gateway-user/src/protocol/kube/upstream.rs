//! The gateway's connections to the API server for one client session.
//!
//! The first connection is the socket the proxy already opened. Its TLS offers `h2` and
//! `http/1.1`: with `h2` every request of the session shares it, with `http/1.1` further
//! connections are opened as requests overlap (a watch keeps its connection for as long as it
//! runs) and idle ones are reused. Upgrade requests (exec, attach, port-forward) always get a
//! connection of their own that offers `http/1.1` only, because HTTP/2 has no `Upgrade`.

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::task::TaskTracker;
use tracing::debug;

/// Body of requests sent upstream.
pub type UpstreamBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// Idle HTTP/1.1 connections kept for reuse. Beyond this many, a connection whose request
/// ends is closed instead of pooled.
const MAX_IDLE_HTTP1: usize = 16;

/// ALPN protocol names.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Client TLS settings of the upstream leg.
#[derive(Clone, Debug)]
pub struct UpstreamTls {
    /// Offers `h2` and `http/1.1`.
    pub any: Arc<rustls::ClientConfig>,
    /// Offers `http/1.1` only, for upgrade requests.
    pub http1_only: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl UpstreamTls {
    /// Derives the ALPN variants from a target's client configuration.
    pub fn new(config: &rustls::ClientConfig, server_name: ServerName<'static>) -> Self {
        let mut any = config.clone();
        any.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        let mut http1_only = config.clone();
        http1_only.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        Self {
            any: Arc::new(any),
            http1_only: Arc::new(http1_only),
            server_name,
        }
    }
}

/// Where and how the upstream connections are made.
#[derive(Clone, Debug)]
pub struct UpstreamSettings {
    pub addr: SocketAddr,
    pub mark: u32,
    pub connect_timeout: Duration,
    /// `None` speaks plain HTTP/1.1 upstream (`upstream_tls.mode: disable`).
    pub tls: Option<UpstreamTls>,
}

/// Failure to reach the API server, reported to the client as a `Status`.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("failed to connect to the API server at {addr}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("TLS handshake with the API server at {addr} failed")]
    Tls { addr: SocketAddr, source: io::Error },
    #[error("HTTP handshake with the API server at {addr} failed")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("request to the API server at {addr} failed")]
    Request {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

/// Runs the HTTP/2 client's background tasks on the session's task tracker, so the session
/// waits for them before its recording closes.
#[derive(Clone, Debug)]
pub struct TrackedExecutor(pub TaskTracker);

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.0.spawn(future);
    }
}

/// The upstream connections of one session.
#[derive(Debug)]
pub struct Upstream {
    settings: UpstreamSettings,
    /// The connection the proxy opened, until the first request uses it.
    first: Mutex<Option<TcpStream>>,
    /// The shared HTTP/2 connection, once the server chose `h2`.
    h2: tokio::sync::Mutex<Option<http2::SendRequest<UpstreamBody>>>,
    idle_http1: Mutex<Vec<http1::SendRequest<UpstreamBody>>>,
    tasks: TaskTracker,
}

/// A transport stream to the API server, plain or TLS.
trait Transport: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Transport for T {}

impl Upstream {
    pub fn new(settings: UpstreamSettings, first: TcpStream, tasks: TaskTracker) -> Self {
        Self {
            settings,
            first: Mutex::new(Some(first)),
            h2: tokio::sync::Mutex::new(None),
            idle_http1: Mutex::new(Vec::new()),
            tasks,
        }
    }

    /// Whether requests go upstream as HTTP/2 (absolute URI) rather than HTTP/1.1.
    pub async fn uses_h2(&self) -> bool {
        self.h2.lock().await.is_some()
    }

    /// Sends a request that is not an upgrade. HTTP/2 is used when the server chose it;
    /// otherwise an idle HTTP/1.1 connection or a new one.
    pub async fn send(
        &self,
        request: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let addr = self.settings.addr;
        let request_error = |source| UpstreamError::Request { addr, source };

        {
            let mut h2 = self.h2.lock().await;
            if let Some(sender) = h2.as_mut() {
                if !sender.is_closed() {
                    let mut sender = sender.clone();
                    drop(h2);
                    return sender.send_request(request).await.map_err(request_error);
                }
                *h2 = None;
            }
        }

        let mut sender = match self.take_idle_http1() {
            Some(sender) => sender,
            None => match self.connect(false).await? {
                Connection::Http1(sender) => sender,
                Connection::Http2(sender) => {
                    *self.h2.lock().await = Some(sender.clone());
                    let mut sender = sender;
                    return sender.send_request(request).await.map_err(request_error);
                }
            },
        };
        let response = sender.send_request(request).await.map_err(request_error)?;
        self.return_http1(sender);
        Ok(response)
    }

    /// Sends an upgrade request on a new HTTP/1.1 connection that is kept for the upgraded
    /// stream.
    pub async fn send_upgrade(
        &self,
        request: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let addr = self.settings.addr;
        let Connection::Http1(mut sender) = self.connect(true).await? else {
            unreachable!("an HTTP/1.1-only ALPN offer never yields h2");
        };
        sender
            .send_request(request)
            .await
            .map_err(|source| UpstreamError::Request { addr, source })
    }

    /// Takes a pooled HTTP/1.1 connection that is waiting for a request. Connections still
    /// streaming a response (a watch, `logs -f`) stay pooled until they finish or close.
    fn take_idle_http1(&self) -> Option<http1::SendRequest<UpstreamBody>> {
        let mut idle = self.idle_http1.lock().expect("idle pool lock poisoned");
        idle.retain(|sender| !sender.is_closed());
        let index = idle.iter().position(http1::SendRequest::is_ready)?;
        Some(idle.swap_remove(index))
    }

    fn return_http1(&self, sender: http1::SendRequest<UpstreamBody>) {
        let mut idle = self.idle_http1.lock().expect("idle pool lock poisoned");
        if idle.len() < MAX_IDLE_HTTP1 && !sender.is_closed() {
            idle.push(sender);
        }
    }

    async fn connect(&self, upgrade: bool) -> Result<Connection, UpstreamError> {
        let addr = self.settings.addr;
        let first = self
            .first
            .lock()
            .expect("first connection lock poisoned")
            .take();
        let tcp = match first {
            Some(stream) => stream,
            None => crate::proxy::connect_marked(
                addr,
                self.settings.mark,
                self.settings.connect_timeout,
            )
            .await
            .map_err(|source| UpstreamError::Connect { addr, source })?,
        };

        let (stream, h2): (Box<dyn Transport>, bool) = match &self.settings.tls {
            None => (Box::new(tcp), false),
            Some(tls) => {
                let config = if upgrade { &tls.http1_only } else { &tls.any };
                let stream = TlsConnector::from(Arc::clone(config))
                    .connect(tls.server_name.clone(), tcp)
                    .await
                    .map_err(|source| UpstreamError::Tls { addr, source })?;
                let h2 = stream.get_ref().1.alpn_protocol() == Some(ALPN_H2);
                (Box::new(stream), h2)
            }
        };
        debug!(%addr, h2, upgrade, "upstream connection opened");

        let io = TokioIo::new(stream);
        let handshake_error = |source| UpstreamError::Handshake { addr, source };
        if h2 {
            let (sender, connection) = http2::Builder::new(TrackedExecutor(self.tasks.clone()))
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(handshake_error)?;
            self.tasks.spawn(async move {
                if let Err(error) = connection.await {
                    debug!(%error, "upstream HTTP/2 connection ended");
                }
            });
            Ok(Connection::Http2(sender))
        } else {
            let (sender, connection) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(handshake_error)?;
            self.tasks.spawn(async move {
                if let Err(error) = connection.with_upgrades().await {
                    debug!(%error, "upstream HTTP/1.1 connection ended");
                }
            });
            Ok(Connection::Http1(sender))
        }
    }
}

enum Connection {
    Http1(http1::SendRequest<UpstreamBody>),
    Http2(http2::SendRequest<UpstreamBody>),
}
