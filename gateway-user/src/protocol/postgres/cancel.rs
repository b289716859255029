//! Cancel request routing. PostgreSQL clients cancel a running query by opening a new
//! connection and sending a CancelRequest with the process id and secret key the server gave
//! them in BackendKeyData. That connection is redirected to the proxy like any other, so the
//! proxy keeps the keys of its live sessions and forwards each request to the server of the
//! session it names, and nowhere else.

use std::{collections::HashMap, net::SocketAddr, sync::Mutex};

use bytes::{BufMut as _, BytesMut};
use tokio::io::AsyncWriteExt as _;
use tracing::{info, warn};

use super::codec::{MAX_CANCEL_KEY_LEN, MIN_CANCEL_KEY_LEN};

/// Maximum number of live cancel keys, one per open PostgreSQL session. Past it, new keys are
/// rejected rather than old ones evicted, which only costs those sessions the ability to
/// cancel.
const MAX_REGISTERED_KEYS: usize = 65_536;

/// Live sessions' cancel keys: process id and secret, to the server that issued them.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    keys: Mutex<HashMap<Vec<u8>, (SocketAddr, String)>>,
}

impl CancelRegistry {
    /// Registers the BackendKeyData body (process id, then the secret key) of a session.
    pub fn register(&self, backend_key_data: &[u8], server: SocketAddr, session: &str) {
        let key_len = backend_key_data.len().saturating_sub(4);
        if !(MIN_CANCEL_KEY_LEN..=MAX_CANCEL_KEY_LEN).contains(&key_len) {
            warn!(
                key_len,
                "BackendKeyData with an invalid key length; this session cannot be cancelled through the gateway"
            );
            return;
        }
        let mut keys = self.keys.lock().expect("cancel registry lock poisoned");
        if keys.len() >= MAX_REGISTERED_KEYS {
            warn!("cancel key registry full; this session cannot be cancelled through the gateway");
            return;
        }
        keys.insert(backend_key_data.to_vec(), (server, session.to_string()));
    }

    /// Removes the keys of a finished session.
    pub fn forget_session(&self, session: &str) {
        self.keys
            .lock()
            .expect("cancel registry lock poisoned")
            .retain(|_, (_, owner)| owner != session);
    }

    /// Forwards a CancelRequest (its body: the code, process id and key) to the server of the
    /// session it names. Returns what happened, for the recording; an unknown key is dropped
    /// silently towards the client, as PostgreSQL itself does.
    pub async fn forward(&self, body: &[u8], mark: u32) -> String {
        let key = &body[4..];
        let server = self
            .keys
            .lock()
            .expect("cancel registry lock poisoned")
            .get(key)
            .map(|(server, _)| *server);
        let Some(server) = server else {
            info!("cancel request for an unknown session dropped");
            return "cancel request for an unknown session dropped".to_string();
        };
        let mut packet = BytesMut::with_capacity(body.len() + 4);
        packet.put_u32(body.len() as u32 + 4);
        packet.put_slice(body);
        match send(server, &packet, mark).await {
            Ok(()) => {
                info!(%server, "cancel request forwarded");
                format!("cancel request forwarded to {server}")
            }
            Err(error) => {
                warn!(%error, %server, "failed to forward cancel request");
                format!("cancel request to {server} failed: {error}")
            }
        }
    }
}

async fn send(server: SocketAddr, packet: &[u8], mark: u32) -> std::io::Result<()> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(server),
        socket2::Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_mark(mark)?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    let mut stream = socket.connect(server).await?;
    stream.write_all(packet).await?;
    stream.shutdown().await
}
