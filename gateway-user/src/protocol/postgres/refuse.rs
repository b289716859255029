//! Rejecting a connection the way a PostgreSQL server does: reply `N` to SSLRequest and
//! GSSENCRequest, read the startup packet, then send a FATAL ErrorResponse and close, so the client
//! prints the reason instead of a reset connection.

use std::time::Duration;

use bytes::{BufMut as _, BytesMut};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::codec::{GSSENC_REQUEST_CODE, MAX_STARTUP_LEN, SSL_REQUEST_CODE};

/// SQLSTATE `cannot_connect_now`, what a server sends while it cannot take connections.
const CANNOT_CONNECT_NOW: &str = "57P03";
/// Time the client has to send its startup packet before the connection is just closed.
const STARTUP_WAIT: Duration = Duration::from_secs(5);
/// Maximum SSLRequest and GSSENCRequest replies before giving up on a startup packet.
const MAX_NEGOTIATIONS: usize = 2;

/// Reads the client's startup and sends a FATAL error with `message`.
pub async fn refuse(mut client: TcpStream, message: &str) {
    let result = tokio::time::timeout(STARTUP_WAIT, async {
        for _ in 0..=MAX_NEGOTIATIONS {
            let length = client.read_u32().await?;
            let code = client.read_u32().await?;
            if length == 8 && (code == SSL_REQUEST_CODE || code == GSSENC_REQUEST_CODE) {
                client.write_all(b"N").await?;
                continue;
            }
            if !(8..=MAX_STARTUP_LEN).contains(&length) {
                break;
            }
            let mut rest = vec![0; length as usize - 8];
            client.read_exact(&mut rest).await?;
            break;
        }
        client
            .write_all(&fatal(CANNOT_CONNECT_NOW, message))
            .await?;
        client.shutdown().await
    })
    .await;
    if let Ok(Err(error)) = result {
        tracing::debug!(%error, "client left before the refusal was sent");
    }
}

/// Builds a FATAL ErrorResponse with `sqlstate` and `message`.
pub(super) fn fatal(sqlstate: &str, message: &str) -> BytesMut {
    let mut body = BytesMut::new();
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', sqlstate),
        (b'M', message),
    ] {
        body.put_u8(field);
        body.put_slice(value.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut message = BytesMut::with_capacity(body.len() + 5);
    message.put_u8(b'E');
    message.put_u32(body.len() as u32 + 4);
    message.put_slice(&body);
    message
}
