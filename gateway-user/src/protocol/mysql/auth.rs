//! Checks on the passwords that authentication plugins carry through the gateway.
//!
//! The gateway relays authentication without taking part in it, but it decides whether each
//! piece of authentication data the client sends may go on to the server. The rule: a password
//! in clear text goes onto the server leg only when that leg has TLS, and never when the
//! server could not use it in that form anyway. Per plugin:
//!
//! - `mysql_clear_password` always sends the password in clear text (NUL-terminated), so the
//!   gateway forwards it only with `upstream_tls`. A client on a plain client leg has already
//!   sent the password in clear text itself, and a TLS server leg exposes it no further, so the
//!   client leg does not matter. MariaDB's `dialog` plugin (PAM) answers each of the server's
//!   prompts in clear text, a password or a one-time code among them, so its answers follow
//!   the same rule.
//! - `sha256_password` sends the password in clear text over TLS and encrypted with the
//!   server's RSA key without TLS (after requesting the key with `0x01`, unless the client has
//!   it configured). The server expects the form that matches its own connection, and the
//!   gateway cannot convert one into the other, so the legs must agree on TLS. With TLS on
//!   neither leg, a password in clear text (from a client that believes it uses TLS) is
//!   rejected too.
//! - `caching_sha2_password` follows the same rule as `sha256_password` for full
//!   authentication. `Session::relay_auth` applies it at the server's `0x01 0x04`, because
//!   the fast path before it sends only a scramble.
//!
//! An empty password (no data, or a single NUL) contains no secret and always passes.
//! Each check runs on data the client sent, before the gateway forwards it. The auth data in
//! the handshake response or COM_CHANGE_USER is judged by the plugin the client names there.
//! Each later response in the exchange is judged by the plugin of the server's last auth switch.

/// Plugin names as MySQL and MariaDB send them.
pub const CACHING_SHA2_PASSWORD: &str = "caching_sha2_password";
pub const SHA256_PASSWORD: &str = "sha256_password";
pub const MYSQL_CLEAR_PASSWORD: &str = "mysql_clear_password";
pub const DIALOG: &str = "dialog";

/// First byte of an auth switch request from the server during authentication.
pub const AUTH_SWITCH_HEADER: u8 = 0xfe;

/// TLS on each leg of one session.
#[derive(Clone, Copy, Debug)]
pub struct Legs {
    pub client_tls: bool,
    pub upstream_tls: bool,
}

/// Returns the plugin an auth switch request names: `0xfe`, the plugin name (NUL-terminated),
/// then the plugin's data. `None` when `payload` is no auth switch request.
pub fn switch_plugin(payload: &[u8]) -> Option<String> {
    let rest = payload.strip_prefix(&[AUTH_SWITCH_HEADER])?;
    let name = rest.split(|&b| b == 0).next().unwrap_or_default();
    Some(String::from_utf8_lossy(name).into_owned())
}

/// Checks authentication data the client sent under `plugin` before the gateway forwards it.
/// Returns the message for the client's ERR packet when it must not reach the server.
pub fn check_client_data(plugin: &str, data: &[u8], legs: Legs) -> Option<String> {
    if is_empty_password(data) {
        return None;
    }
    match plugin {
        MYSQL_CLEAR_PASSWORD | DIALOG if !legs.upstream_tls => Some(format!(
            "{plugin} sends the password in clear text, and the gateway's connection to the \
             server has no TLS, so the gateway did not forward it; set upstream_tls on the target"
        )),
        SHA256_PASSWORD if legs.client_tls != legs.upstream_tls => Some(legs_differ(plugin)),
        SHA256_PASSWORD if !legs.client_tls && is_clear_text_password(data) => {
            Some(clear_text_without_tls(plugin))
        }
        _ => None,
    }
}

/// Message for a plugin whose password form follows TLS when only one leg has TLS.
pub fn legs_differ(plugin: &str) -> String {
    format!(
        "{plugin} authentication needs TLS on both legs of the gateway or on neither; set the \
         target's tls and upstream_tls alike"
    )
}

/// Message for a password in clear text on a session without TLS on either leg.
pub fn clear_text_without_tls(plugin: &str) -> String {
    format!(
        "the client sent its {plugin} password in clear text on a connection without TLS, so \
         the gateway did not forward it. Use TLS, or let the client encrypt the password with \
         the server's RSA key (the mariadb CLI does with --skip-ssl)"
    )
}

/// Checks whether authentication data is an empty password: nothing, or a lone NUL.
fn is_empty_password(data: &[u8]) -> bool {
    data.is_empty() || data == [0]
}

/// Checks whether a client's response in caching_sha2_password full authentication or in
/// sha256_password is a password in clear text (NUL-terminated) rather than a public-key
/// request (`0x02` and `0x01` respectively) or RSA cipher text. Cipher text is as long as the
/// key's modulus, at least 128 bytes for keys of 1024 bits or more, so a shorter response
/// ending in NUL is taken for a password.
// NOTE: a password of 128 bytes or more in clear text is not recognized, and a key under 1024
// bits would have its cipher text taken for a password about once in 256 logins.
pub fn is_clear_text_password(answer: &[u8]) -> bool {
    answer != [0x02] && answer.len() < 128 && answer.last() == Some(&0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: Legs = Legs {
        client_tls: false,
        upstream_tls: false,
    };
    const TLS: Legs = Legs {
        client_tls: true,
        upstream_tls: true,
    };
    const CLIENT_TLS_ONLY: Legs = Legs {
        client_tls: true,
        upstream_tls: false,
    };
    const UPSTREAM_TLS_ONLY: Legs = Legs {
        client_tls: false,
        upstream_tls: true,
    };

    #[test]
    fn clear_text_plugins_need_upstream_tls() {
        let password = b"secret\0";
        for plugin in [MYSQL_CLEAR_PASSWORD, DIALOG] {
            for legs in [PLAIN, CLIENT_TLS_ONLY] {
                let message = check_client_data(plugin, password, legs);
                assert!(
                    message
                        .as_deref()
                        .is_some_and(|m| m.starts_with(plugin) && m.contains("upstream_tls")),
                    "{plugin} {legs:?}: {message:?}"
                );
            }
            assert_eq!(check_client_data(plugin, password, TLS), None, "{plugin}");
            assert_eq!(
                check_client_data(plugin, password, UPSTREAM_TLS_ONLY),
                None,
                "{plugin}"
            );
        }
    }

    #[test]
    fn sha256_needs_matching_legs() {
        let password = b"secret\0";
        for legs in [CLIENT_TLS_ONLY, UPSTREAM_TLS_ONLY] {
            let message = check_client_data(SHA256_PASSWORD, password, legs);
            assert_eq!(message, Some(legs_differ(SHA256_PASSWORD)), "{legs:?}");
            let key_request = check_client_data(SHA256_PASSWORD, &[0x01], legs);
            assert_eq!(key_request, Some(legs_differ(SHA256_PASSWORD)), "{legs:?}");
        }
        assert_eq!(check_client_data(SHA256_PASSWORD, password, TLS), None);
    }

    #[test]
    fn sha256_without_tls_passes_only_rsa() {
        assert_eq!(check_client_data(SHA256_PASSWORD, &[0x01], PLAIN), None);
        assert_eq!(
            check_client_data(SHA256_PASSWORD, &[0x5a; 256], PLAIN),
            None
        );
        assert_eq!(
            check_client_data(SHA256_PASSWORD, b"secret\0", PLAIN),
            Some(clear_text_without_tls(SHA256_PASSWORD))
        );
    }

    #[test]
    fn empty_password_always_passes() {
        for plugin in [MYSQL_CLEAR_PASSWORD, DIALOG, SHA256_PASSWORD] {
            for legs in [PLAIN, TLS, CLIENT_TLS_ONLY, UPSTREAM_TLS_ONLY] {
                assert_eq!(check_client_data(plugin, b"", legs), None, "{plugin}");
                assert_eq!(check_client_data(plugin, b"\0", legs), None, "{plugin}");
            }
        }
    }

    #[test]
    fn other_plugins_pass() {
        let scramble = [0x41; 20];
        for plugin in [
            CACHING_SHA2_PASSWORD,
            "mysql_native_password",
            "",
            "client_ed25519",
        ] {
            assert_eq!(
                check_client_data(plugin, &scramble, CLIENT_TLS_ONLY),
                None,
                "{plugin}"
            );
        }
    }

    #[test]
    fn switch_plugin_read() {
        let mut switch = vec![AUTH_SWITCH_HEADER];
        switch.extend_from_slice(b"mysql_clear_password\0");
        switch.extend_from_slice(&[0x33; 20]);
        switch.push(0);
        assert_eq!(
            switch_plugin(&switch).as_deref(),
            Some(MYSQL_CLEAR_PASSWORD)
        );
        assert_eq!(
            switch_plugin(b"\xfesha256_password").as_deref(),
            Some(SHA256_PASSWORD)
        );
        assert_eq!(switch_plugin(&[0x01, 0x04]), None);
    }

    #[test]
    fn clear_text_password_told_from_rsa_answers() {
        assert!(is_clear_text_password(b"secret\0"));
        assert!(is_clear_text_password(b"\0"));
        assert!(!is_clear_text_password(&[0x02]));
        assert!(!is_clear_text_password(&[0x01]));
        let mut cipher = vec![0x5a; 256];
        cipher[255] = 0;
        assert!(!is_clear_text_password(&cipher));
        assert!(!is_clear_text_password(b"no terminator"));
    }
}
