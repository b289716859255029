//! Server name indication from a TLS ClientHello, read from peeked bytes for targets whose
//! TLS the gateway cannot terminate.

/// Outcome of looking for the server name in the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientHello {
    /// The first record is not complete yet; peek again when more has arrived.
    Incomplete,
    /// A complete ClientHello, with its server name when it carries one.
    Parsed { server_name: Option<String> },
    /// The bytes are not a TLS ClientHello.
    NotTls,
}

/// TLS record type of handshake messages.
const HANDSHAKE_RECORD: u8 = 22;
/// Handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 1;
/// Extension type of `server_name` (RFC 6066).
const SERVER_NAME_EXTENSION: u16 = 0;

/// Parses the first TLS record of a connection. Only a ClientHello that fits into its first
/// record is read (true of every common client, whose hellos stay well under 16 KiB).
pub fn parse_client_hello(bytes: &[u8]) -> ClientHello {
    if bytes.is_empty() {
        return ClientHello::Incomplete;
    }
    if bytes[0] != HANDSHAKE_RECORD {
        return ClientHello::NotTls;
    }
    if bytes.len() < 5 {
        return ClientHello::Incomplete;
    }
    let record_len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
    if bytes.len() < 5 + record_len {
        return ClientHello::Incomplete;
    }
    let mut reader = Reader(&bytes[5..5 + record_len]);
    match read_server_name(&mut reader) {
        Some(server_name) => ClientHello::Parsed { server_name },
        None => ClientHello::NotTls,
    }
}

/// Length of the first record when `bytes` starts a TLS record, for sizing the peek.
pub fn first_record_len(bytes: &[u8]) -> Option<usize> {
    (bytes.len() >= 5 && bytes[0] == HANDSHAKE_RECORD)
        .then(|| 5 + usize::from(u16::from_be_bytes([bytes[3], bytes[4]])))
}

fn read_server_name(reader: &mut Reader<'_>) -> Option<Option<String>> {
    if reader.u8()? != CLIENT_HELLO {
        return None;
    }
    let hello_len = reader.u24()?;
    let mut hello = Reader(reader.take(hello_len)?);
    hello.take(2 + 32)?; // legacy_version, random
    let session_id_len = usize::from(hello.u8()?);
    hello.take(session_id_len)?;
    let cipher_suites_len = usize::from(hello.u16()?);
    hello.take(cipher_suites_len)?;
    let compression_len = usize::from(hello.u8()?);
    hello.take(compression_len)?;
    if hello.0.is_empty() {
        // A hello without extensions names no server.
        return Some(None);
    }
    let extensions_len = usize::from(hello.u16()?);
    let mut extensions = Reader(hello.take(extensions_len)?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let len = usize::from(extensions.u16()?);
        let mut body = Reader(extensions.take(len)?);
        if kind != SERVER_NAME_EXTENSION {
            continue;
        }
        let list_len = usize::from(body.u16()?);
        let mut list = Reader(body.take(list_len)?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name_len = usize::from(list.u16()?);
            let name = list.take(name_len)?;
            // Type 0 is a DNS host name, the only type defined.
            if name_type == 0 {
                return Some(Some(String::from_utf8_lossy(name).into_owned()));
            }
        }
        return Some(None);
    }
    Some(None)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        if self.0.len() < len {
            return None;
        }
        let (head, tail) = self.0.split_at(len);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|bytes| bytes[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|bytes| usize::from_be_bytes([0, 0, 0, 0, 0, bytes[0], bytes[1], bytes[2]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Produces the ClientHello rustls sends for `server_name`.
    #[expect(
        deprecated,
        reason = "ring is the crypto provider the gateway builds with"
    )]
    fn rustls_hello(server_name: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .expect("valid server name");
        let mut connection =
            rustls::ClientConnection::new(Arc::new(config), name).expect("client connection");
        let mut hello = Vec::new();
        connection.write_tls(&mut hello).expect("write hello");
        hello
    }

    #[test]
    fn server_name_from_client_hello() {
        let hello = rustls_hello("kubernetes.default.svc");
        assert_eq!(
            parse_client_hello(&hello),
            ClientHello::Parsed {
                server_name: Some("kubernetes.default.svc".into())
            }
        );
        assert_eq!(first_record_len(&hello), Some(hello.len()));
    }

    #[test]
    fn client_hello_split_at_every_byte() {
        let hello = rustls_hello("api.example.test");
        for cut in 0..hello.len() {
            assert_eq!(
                parse_client_hello(&hello[..cut]),
                ClientHello::Incomplete,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn ip_address_hello_has_no_server_name() {
        let hello = rustls_hello("10.96.0.1");
        assert_eq!(
            parse_client_hello(&hello),
            ClientHello::Parsed { server_name: None }
        );
    }

    #[test]
    fn garbage_is_not_tls() {
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n"),
            ClientHello::NotTls
        );
        assert_eq!(
            parse_client_hello(&[22, 3, 1, 0, 4, 9, 9, 9, 9]),
            ClientHello::NotTls
        );
    }
}
