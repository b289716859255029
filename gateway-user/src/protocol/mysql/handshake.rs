//! Connection phase: the server greeting, the client's SSL request and handshake response, and
//! the capability flags the proxy negotiates on each leg.
//!
//! The proxy offers the client only the server's capabilities it can honour itself
//! (`PROXY_CAPABILITIES`, plus `CLIENT_SSL` when the target has a serving certificate), and
//! forwards the client's choice to the server unchanged except for `CLIENT_SSL`, which follows
//! the server leg's own TLS setting. Flags that change the framing (`CLIENT_DEPRECATE_EOF`,
//! multi-statements, multi-results) are therefore the same on both legs. MariaDB's extended
//! capabilities (progress reports, bulk operations, metadata caching, extended type info) are
//! all withheld, since each changes packet layouts the proxy parses.
//!
//! # Format
//!
//! Greeting (protocol 10): version `u8`, server version (NUL-terminated), connection id `u32`,
//! 8 scramble bytes, a filler byte, capability flags low `u16`, charset `u8`, status `u16`,
//! capability flags high `u16`, scramble length `u8`, 10 reserved bytes (MariaDB keeps its
//! extended capabilities in the last 4), the rest of the scramble, the auth plugin name.
//!
//! Handshake response 4.1: capability flags `u32`, max packet size `u32`, charset `u8`, 23
//! filler bytes (MariaDB's extended capabilities in the last 4), user name (NUL-terminated),
//! auth response, then the database, the auth plugin name and connection attributes, each
//! present when its capability flag is set. An SSL request is the first 32 bytes of that alone.

use super::packet::{FieldReader, PacketError};

pub const CLIENT_LONG_PASSWORD: u32 = 1;
pub const CLIENT_FOUND_ROWS: u32 = 1 << 1;
pub const CLIENT_LONG_FLAG: u32 = 1 << 2;
pub const CLIENT_CONNECT_WITH_DB: u32 = 1 << 3;
pub const CLIENT_NO_SCHEMA: u32 = 1 << 4;
pub const CLIENT_COMPRESS: u32 = 1 << 5;
pub const CLIENT_ODBC: u32 = 1 << 6;
pub const CLIENT_LOCAL_FILES: u32 = 1 << 7;
pub const CLIENT_IGNORE_SPACE: u32 = 1 << 8;
pub const CLIENT_PROTOCOL_41: u32 = 1 << 9;
pub const CLIENT_INTERACTIVE: u32 = 1 << 10;
pub const CLIENT_SSL: u32 = 1 << 11;
pub const CLIENT_IGNORE_SIGPIPE: u32 = 1 << 12;
pub const CLIENT_TRANSACTIONS: u32 = 1 << 13;
pub const CLIENT_RESERVED: u32 = 1 << 14;
pub const CLIENT_SECURE_CONNECTION: u32 = 1 << 15;
pub const CLIENT_MULTI_STATEMENTS: u32 = 1 << 16;
pub const CLIENT_MULTI_RESULTS: u32 = 1 << 17;
pub const CLIENT_PS_MULTI_RESULTS: u32 = 1 << 18;
pub const CLIENT_PLUGIN_AUTH: u32 = 1 << 19;
pub const CLIENT_CONNECT_ATTRS: u32 = 1 << 20;
pub const CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA: u32 = 1 << 21;
pub const CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS: u32 = 1 << 22;
pub const CLIENT_SESSION_TRACK: u32 = 1 << 23;
pub const CLIENT_DEPRECATE_EOF: u32 = 1 << 24;

/// Capabilities the proxy can honour on both legs. Left out, with the reason:
/// `CLIENT_COMPRESS` and zstd (the proxy reads packets, not compressed frames),
/// `CLIENT_LOCAL_FILES` (the server would ask the client for a file in the middle of a
/// result), optional result set metadata and query attributes (they change the layout of
/// result sets and COM_QUERY), multi-factor authentication and the capability extension flag.
pub const PROXY_CAPABILITIES: u32 = CLIENT_LONG_PASSWORD
    | CLIENT_FOUND_ROWS
    | CLIENT_LONG_FLAG
    | CLIENT_CONNECT_WITH_DB
    | CLIENT_NO_SCHEMA
    | CLIENT_ODBC
    | CLIENT_IGNORE_SPACE
    | CLIENT_PROTOCOL_41
    | CLIENT_INTERACTIVE
    | CLIENT_IGNORE_SIGPIPE
    | CLIENT_TRANSACTIONS
    | CLIENT_RESERVED
    | CLIENT_SECURE_CONNECTION
    | CLIENT_MULTI_STATEMENTS
    | CLIENT_MULTI_RESULTS
    | CLIENT_PS_MULTI_RESULTS
    | CLIENT_PLUGIN_AUTH
    | CLIENT_CONNECT_ATTRS
    | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS
    | CLIENT_SESSION_TRACK
    | CLIENT_DEPRECATE_EOF;

/// Protocol version of the greeting; current MySQL and MariaDB servers send no other.
const PROTOCOL_VERSION: u8 = 10;
/// Length of an SSL request payload.
pub const SSL_REQUEST_LEN: usize = 32;
/// Offset of MariaDB's extended capabilities in the handshake response (end of the filler).
const RESPONSE_EXT_CAPS: usize = 28;

/// The server greeting, with the offsets the proxy rewrites.
pub struct Greeting {
    /// The payload as the server sent it.
    pub payload: Vec<u8>,
    pub capabilities: u32,
    /// Offset of the low capability bytes.
    caps_low: usize,
    /// Offset of the high capability bytes, when the greeting has them.
    caps_high: Option<usize>,
    /// Offset of MariaDB's extended capabilities, when the greeting has them.
    ext_caps: Option<usize>,
    pub auth_plugin: String,
}

impl std::fmt::Debug for Greeting {
    /// Shows the capabilities and the plugin, and the payload by length only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Greeting")
            .field("payload_len", &self.payload.len())
            .field("capabilities", &self.capabilities)
            .field("auth_plugin", &self.auth_plugin)
            .finish_non_exhaustive()
    }
}

impl Greeting {
    pub fn parse(payload: &[u8]) -> Result<Self, PacketError> {
        let malformed = |reason| PacketError::Malformed {
            packet: "server greeting",
            reason,
        };
        if payload.first() == Some(&super::packet::ERR_HEADER) {
            return Err(malformed("the server sent an error instead of a greeting"));
        }
        let mut reader = FieldReader::new(payload, "server greeting");
        if reader.u8()? != PROTOCOL_VERSION {
            return Err(malformed("protocol version is not 10"));
        }
        reader.cstr()?;
        reader.bytes(4 + 8 + 1)?;
        let caps_low = payload.len() - reader.remaining();
        let mut capabilities = u32::from(reader.u16()?);
        let mut caps_high = None;
        let mut ext_caps = None;
        let mut auth_plugin = String::new();
        if reader.remaining() > 0 {
            reader.bytes(1 + 2)?;
            caps_high = Some(payload.len() - reader.remaining());
            capabilities |= u32::from(reader.u16()?) << 16;
            let scramble_len = reader.u8()?;
            reader.bytes(6)?;
            // MariaDB 10.2 and later clear CLIENT_LONG_PASSWORD to say these 4 bytes are its
            // extended capabilities.
            if capabilities & CLIENT_LONG_PASSWORD == 0 {
                ext_caps = Some(payload.len() - reader.remaining());
            }
            reader.bytes(4)?;
            if capabilities & CLIENT_SECURE_CONNECTION != 0 {
                let part2 = usize::from(scramble_len).saturating_sub(8).max(13);
                reader.bytes(part2.min(reader.remaining()))?;
            }
            if capabilities & CLIENT_PLUGIN_AUTH != 0 {
                let rest = reader.rest();
                let name = rest.split(|&b| b == 0).next().unwrap_or_default();
                auth_plugin = String::from_utf8_lossy(name).into_owned();
            }
        }
        if capabilities & CLIENT_PROTOCOL_41 == 0 {
            return Err(malformed(
                "the server lacks protocol 4.1, which the gateway requires",
            ));
        }
        Ok(Self {
            payload: payload.to_vec(),
            capabilities,
            caps_low,
            caps_high,
            ext_caps,
            auth_plugin,
        })
    }

    /// Returns the greeting to send the client, offering `capabilities` and no MariaDB
    /// extended capabilities.
    pub fn with_capabilities(&self, capabilities: u32) -> Vec<u8> {
        let mut out = self.payload.clone();
        let bytes = capabilities.to_le_bytes();
        out[self.caps_low..self.caps_low + 2].copy_from_slice(&bytes[..2]);
        if let Some(high) = self.caps_high {
            out[high..high + 2].copy_from_slice(&bytes[2..]);
        }
        if let Some(ext) = self.ext_caps {
            out[ext..ext + 4].fill(0);
        }
        out
    }
}

/// Capabilities to offer the client for a server offering `server`.
pub fn client_offer(server: u32, client_tls_available: bool) -> u32 {
    let mut offer = server & PROXY_CAPABILITIES;
    if client_tls_available {
        offer |= CLIENT_SSL;
    }
    offer
}

/// Capabilities to send the server: the client's choice within `offered`, with `CLIENT_SSL`
/// set only when the server leg uses TLS.
pub fn server_choice(client: u32, offered: u32, upstream_tls: bool) -> u32 {
    let mut choice = client & offered & !CLIENT_SSL;
    if upstream_tls {
        choice |= CLIENT_SSL;
    }
    choice
}

/// Reads the capability flags at the start of an SSL request or handshake response.
pub fn response_capabilities(payload: &[u8]) -> Result<u32, PacketError> {
    FieldReader::new(payload, "handshake response").u32()
}

/// Facts from a handshake response, for the recording.
#[derive(Clone, Default)]
pub struct ClientLogin {
    pub user: String,
    pub database: String,
    pub auth_plugin: String,
}

impl std::fmt::Debug for ClientLogin {
    /// Shows the user and database with card numbers masked, as recordings show them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let masked = |text: &str| {
            let mut bytes = text.as_bytes().to_vec();
            crate::mask::mask_in_place(&mut bytes, &crate::mask::MaskPolicy::default());
            String::from_utf8_lossy(&bytes).into_owned()
        };
        f.debug_struct("ClientLogin")
            .field("user", &masked(&self.user))
            .field("database", &masked(&self.database))
            .field("auth_plugin", &self.auth_plugin)
            .finish()
    }
}

/// A parsed handshake response or COM_CHANGE_USER.
pub struct LoginRequest<'a> {
    pub login: ClientLogin,
    /// Authentication data for `login.auth_plugin`, borrowed from the packet.
    pub auth_data: &'a [u8],
}

impl std::fmt::Debug for LoginRequest<'_> {
    /// Shows the authentication data by length only, because it can be a password in clear
    /// text.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginRequest")
            .field("login", &self.login)
            .field("auth_data_len", &self.auth_data.len())
            .finish()
    }
}

/// Parses a handshake response 4.1 for the user, database, plugin and authentication data.
pub fn parse_response(payload: &[u8]) -> Result<LoginRequest<'_>, PacketError> {
    let mut reader = FieldReader::new(payload, "handshake response");
    let capabilities = reader.u32()?;
    if capabilities & CLIENT_PROTOCOL_41 == 0 {
        return Err(PacketError::Malformed {
            packet: "handshake response",
            reason: "pre-4.1 handshake responses are not supported",
        });
    }
    reader.bytes(4 + 1 + 23)?;
    let user = String::from_utf8_lossy(reader.cstr()?).into_owned();
    let auth_data = if capabilities & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
        reader.lenenc_bytes()?
    } else if capabilities & CLIENT_SECURE_CONNECTION != 0 {
        let len = reader.u8()?;
        reader.bytes(usize::from(len))?
    } else {
        reader.cstr()?
    };
    let mut login = ClientLogin {
        user,
        ..ClientLogin::default()
    };
    if capabilities & CLIENT_CONNECT_WITH_DB != 0 && reader.remaining() > 0 {
        login.database = String::from_utf8_lossy(reader.cstr()?).into_owned();
    }
    if capabilities & CLIENT_PLUGIN_AUTH != 0 && reader.remaining() > 0 {
        login.auth_plugin = String::from_utf8_lossy(reader.cstr()?).into_owned();
    }
    Ok(LoginRequest { login, auth_data })
}

/// Parses the body of COM_CHANGE_USER (after the command byte) under the session's
/// `capabilities`: user (NUL-terminated), authentication data (length `u8` first with
/// `CLIENT_SECURE_CONNECTION`, else NUL-terminated), database (NUL-terminated), then, when
/// more data follows, the character set `u16` and, with `CLIENT_PLUGIN_AUTH`, the plugin name
/// (NUL-terminated). Connection attributes may follow and are not read.
pub fn parse_change_user(body: &[u8], capabilities: u32) -> Result<LoginRequest<'_>, PacketError> {
    let mut reader = FieldReader::new(body, "COM_CHANGE_USER");
    let user = String::from_utf8_lossy(reader.cstr()?).into_owned();
    let auth_data = if capabilities & CLIENT_SECURE_CONNECTION != 0 {
        let len = reader.u8()?;
        reader.bytes(usize::from(len))?
    } else {
        reader.cstr()?
    };
    let database = String::from_utf8_lossy(reader.cstr()?).into_owned();
    let mut auth_plugin = String::new();
    if reader.remaining() >= 2 {
        reader.u16()?;
        if capabilities & CLIENT_PLUGIN_AUTH != 0 && reader.remaining() > 0 {
            auth_plugin = String::from_utf8_lossy(reader.cstr()?).into_owned();
        }
    }
    Ok(LoginRequest {
        login: ClientLogin {
            user,
            database,
            auth_plugin,
        },
        auth_data,
    })
}

/// Returns the handshake response or SSL request with its capability flags replaced by
/// `capabilities` and MariaDB's extended capabilities cleared.
pub fn rewrite_response(payload: &[u8], capabilities: u32) -> Result<Vec<u8>, PacketError> {
    if payload.len() < SSL_REQUEST_LEN {
        return Err(PacketError::Malformed {
            packet: "handshake response",
            reason: "shorter than the 32 bytes of fixed fields",
        });
    }
    let mut out = payload.to_vec();
    out[..4].copy_from_slice(&capabilities.to_le_bytes());
    out[RESPONSE_EXT_CAPS..SSL_REQUEST_LEN].fill(0);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A MariaDB-style greeting offering `caps` with extended capabilities set.
    fn greeting(caps: u32) -> Vec<u8> {
        let mut out = vec![PROTOCOL_VERSION];
        out.extend_from_slice(b"5.5.5-10.11.6-MariaDB\0");
        out.extend_from_slice(&7u32.to_le_bytes());
        out.extend_from_slice(b"abcdefgh");
        out.push(0);
        out.extend_from_slice(&caps.to_le_bytes()[..2]);
        out.push(45);
        out.extend_from_slice(&2u16.to_le_bytes());
        out.extend_from_slice(&caps.to_le_bytes()[2..]);
        out.push(21);
        out.extend_from_slice(&[0; 6]);
        out.extend_from_slice(&[0xff; 4]);
        out.extend_from_slice(b"ijklmnopqrst\0");
        out.extend_from_slice(b"mysql_native_password\0");
        out
    }

    #[test]
    fn greeting_offer_drops_what_proxy_cannot_honour() {
        let server = (PROXY_CAPABILITIES | CLIENT_COMPRESS | CLIENT_LOCAL_FILES | CLIENT_SSL)
            & !CLIENT_LONG_PASSWORD;
        let parsed = Greeting::parse(&greeting(server)).expect("valid greeting");
        assert_eq!(parsed.capabilities, server);
        assert_eq!(parsed.auth_plugin, "mysql_native_password");

        let offer = client_offer(parsed.capabilities, false);
        assert_eq!(
            offer & (CLIENT_COMPRESS | CLIENT_LOCAL_FILES | CLIENT_SSL),
            0
        );
        let rewritten = Greeting::parse(&parsed.with_capabilities(offer)).expect("valid");
        assert_eq!(rewritten.capabilities, offer);
        let ext = rewritten.ext_caps.expect("MariaDB extended capabilities");
        assert_eq!(&rewritten.payload[ext..ext + 4], &[0; 4]);
        assert_eq!(rewritten.auth_plugin, "mysql_native_password");
    }

    #[test]
    fn ssl_offered_only_with_certificate() {
        assert_ne!(client_offer(PROXY_CAPABILITIES, true) & CLIENT_SSL, 0);
        assert_eq!(
            client_offer(PROXY_CAPABILITIES | CLIENT_SSL, false) & CLIENT_SSL,
            0
        );
    }

    #[test]
    fn server_choice_follows_upstream_tls() {
        let offered = PROXY_CAPABILITIES | CLIENT_SSL;
        let client = CLIENT_PROTOCOL_41 | CLIENT_SSL | CLIENT_DEPRECATE_EOF | CLIENT_COMPRESS;
        assert_eq!(
            server_choice(client, offered, false),
            CLIENT_PROTOCOL_41 | CLIENT_DEPRECATE_EOF
        );
        assert_eq!(
            server_choice(client, offered, true),
            CLIENT_PROTOCOL_41 | CLIENT_DEPRECATE_EOF | CLIENT_SSL
        );
    }

    #[test]
    fn response_parsed_and_rewritten() {
        let caps = CLIENT_PROTOCOL_41
            | CLIENT_SECURE_CONNECTION
            | CLIENT_CONNECT_WITH_DB
            | CLIENT_PLUGIN_AUTH;
        let mut payload = caps.to_le_bytes().to_vec();
        payload.extend_from_slice(&(1u32 << 24).to_le_bytes());
        payload.push(45);
        payload.extend_from_slice(&[0; 19]);
        payload.extend_from_slice(&[0xff; 4]);
        payload.extend_from_slice(b"alice\0");
        payload.push(3);
        payload.extend_from_slice(b"xyz");
        payload.extend_from_slice(b"payments\0mysql_native_password\0");
        let request = parse_response(&payload).expect("valid response");
        assert_eq!(request.auth_data, b"xyz");
        let login = request.login;
        assert_eq!(login.user, "alice");
        assert_eq!(login.database, "payments");
        assert_eq!(login.auth_plugin, "mysql_native_password");

        let rewritten = rewrite_response(&payload, caps | CLIENT_SSL).expect("long enough");
        assert_eq!(
            response_capabilities(&rewritten).expect("caps"),
            caps | CLIENT_SSL
        );
        assert_eq!(&rewritten[28..32], &[0; 4]);
        assert_eq!(&rewritten[32..], &payload[32..]);
    }

    #[test]
    fn garbage_greeting_rejected() {
        assert!(Greeting::parse(b"\x0agarbage").is_err());
        assert!(Greeting::parse(b"\xff\x15\x04denied").is_err());
        assert!(Greeting::parse(b"").is_err());
    }

    #[test]
    fn response_auth_data_read_in_each_layout() {
        let fixed = |caps: u32| {
            let mut payload = caps.to_le_bytes().to_vec();
            payload.extend_from_slice(&[0; 28]);
            payload.extend_from_slice(b"bob\0");
            payload
        };

        let caps = CLIENT_PROTOCOL_41 | CLIENT_PLUGIN_AUTH | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA;
        let mut payload = fixed(caps);
        payload.push(7);
        payload.extend_from_slice(b"secret\0mysql_clear_password\0");
        let request = parse_response(&payload).expect("length-encoded auth data");
        assert_eq!(request.auth_data, b"secret\0");
        assert_eq!(request.login.auth_plugin, "mysql_clear_password");

        let caps = CLIENT_PROTOCOL_41 | CLIENT_PLUGIN_AUTH | CLIENT_SECURE_CONNECTION;
        let mut payload = fixed(caps);
        payload.push(1);
        payload.push(0x01);
        payload.extend_from_slice(b"sha256_password\0");
        let request = parse_response(&payload).expect("length-prefixed auth data");
        assert_eq!(request.auth_data, [0x01]);
        assert_eq!(request.login.auth_plugin, "sha256_password");

        let mut payload = fixed(CLIENT_PROTOCOL_41);
        payload.extend_from_slice(b"old\0");
        let request = parse_response(&payload).expect("NUL-terminated auth data");
        assert_eq!(request.auth_data, b"old");
        assert_eq!(request.login.auth_plugin, "");

        let mut cut = fixed(caps);
        cut.extend_from_slice(&[20, 1, 2, 3]);
        assert!(parse_response(&cut).is_err());
    }

    #[test]
    fn change_user_parsed() {
        let caps = CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH;
        let mut body = b"carol\0".to_vec();
        body.push(7);
        body.extend_from_slice(b"secret\0");
        body.extend_from_slice(b"payments\0");
        body.extend_from_slice(&45u16.to_le_bytes());
        body.extend_from_slice(b"mysql_clear_password\0");
        body.extend_from_slice(&[0x03, 0x01, b'k', 0x00]);
        let request = parse_change_user(&body, caps).expect("valid COM_CHANGE_USER");
        assert_eq!(request.login.user, "carol");
        assert_eq!(request.login.database, "payments");
        assert_eq!(request.login.auth_plugin, "mysql_clear_password");
        assert_eq!(request.auth_data, b"secret\0");

        // Without the character set and plugin name, and without CLIENT_SECURE_CONNECTION.
        let request = parse_change_user(b"dave\0scramble\0db\0", CLIENT_PROTOCOL_41)
            .expect("short COM_CHANGE_USER");
        assert_eq!(request.auth_data, b"scramble");
        assert_eq!(request.login.database, "db");
        assert_eq!(request.login.auth_plugin, "");

        // The plugin name counts only under CLIENT_PLUGIN_AUTH.
        let request = parse_change_user(&body, caps & !CLIENT_PLUGIN_AUTH).expect("valid");
        assert_eq!(request.login.auth_plugin, "");

        assert!(parse_change_user(b"erin\0\x09short", caps).is_err());
    }

    #[test]
    fn login_debug_masks_card_numbers() {
        let login = ClientLogin {
            user: "4111111111111111".into(),
            database: "5555555555554444".into(),
            auth_plugin: "mysql_native_password".into(),
        };
        let debug = format!("{login:?}");
        assert!(debug.contains("411111******1111"), "{debug}");
        assert!(!debug.contains("4111111111111111"), "{debug}");
        assert!(!debug.contains("5555555555554444"), "{debug}");
    }
}
