//! Bearer token claims. A service-account token is a JWT; its payload names the service
//! account and, for bound tokens (`TokenRequest`, projected volumes), the pod it was issued
//! for. The gateway reads those claims without checking the signature: they only say whom
//! the token claims to belong to, so they feed the recording and the pod check, never an
//! allow. The API server still authenticates the token, since it goes upstream unchanged.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Largest token whose claims are decoded. Service-account tokens are around 1 KiB; anything
/// far larger is not one and is left undecoded.
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// What a bearer token claims about its holder.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TokenSubject {
    /// The `sub` claim, `system:serviceaccount:NAMESPACE:NAME` for service accounts.
    pub subject: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// Pod the token is bound to (bound tokens only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: String,
    #[serde(default, rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    serviceaccount: Option<ObjectRef>,
    #[serde(default)]
    pod: Option<ObjectRef>,
}

#[derive(Deserialize)]
struct ObjectRef {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    uid: Option<String>,
}

/// Reads the claims of the bearer token in an `Authorization` header value. Returns `None`
/// for other schemes and for tokens that are not JWTs (static tokens, bootstrap tokens).
pub fn decode_bearer(authorization: &[u8]) -> Option<TokenSubject> {
    let value = std::str::from_utf8(authorization).ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    decode_token(token.trim())
}

/// Prefix of a bearer token sent as a WebSocket subprotocol (`Sec-WebSocket-Protocol`),
/// base64url-encoded, as clients that cannot set `Authorization` send it. The API server
/// authenticates WebSocket requests by it.
const WEBSOCKET_BEARER_PREFIX: &str = "base64url.bearer.authorization.k8s.io.";

/// Reads the claims of the bearer tokens in a `Sec-WebSocket-Protocol` header value, a
/// comma-separated list of subprotocols.
pub fn decode_websocket_bearer(protocols: &[u8]) -> Vec<TokenSubject> {
    let Ok(value) = std::str::from_utf8(protocols) else {
        return Vec::new();
    };
    value
        .split(',')
        .filter_map(|protocol| protocol.trim().strip_prefix(WEBSOCKET_BEARER_PREFIX))
        .filter_map(|encoded| {
            let token = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(encoded.trim_end_matches('='))
                .ok()?;
            decode_token(std::str::from_utf8(&token).ok()?.trim())
        })
        .collect()
}

fn decode_token(token: &str) -> Option<TokenSubject> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Claims = serde_json::from_slice(&payload).ok()?;

    let mut subject = TokenSubject {
        subject: claims.sub.clone(),
        ..TokenSubject::default()
    };
    if let Some(kubernetes) = claims.kubernetes {
        subject.namespace = kubernetes.namespace;
        subject.service_account = kubernetes.serviceaccount.and_then(|account| account.name);
        if let Some(pod) = kubernetes.pod {
            subject.pod_name = pod.name;
            subject.pod_uid = pod.uid;
        }
    } else if let Some(rest) = claims.sub.strip_prefix("system:serviceaccount:") {
        // Legacy secret-based tokens carry the account only in `sub` and their own claims.
        if let Some((namespace, name)) = rest.split_once(':') {
            subject.namespace = Some(namespace.to_string());
            subject.service_account = Some(name.to_string());
        }
    }
    Some(subject)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &serde_json::Value) -> String {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.{}",
            engine.encode(br#"{"alg":"RS256","kid":"k"}"#),
            engine.encode(claims.to_string()),
            engine.encode(b"not-checked")
        )
    }

    #[test]
    fn bound_token_claims() {
        let token = jwt(&serde_json::json!({
            "aud": ["https://kubernetes.default.svc"],
            "sub": "system:serviceaccount:shop:checkout",
            "kubernetes.io": {
                "namespace": "shop",
                "pod": {"name": "checkout-7f9", "uid": "1f0e0d0c-0000-4000-8000-000000000001"},
                "serviceaccount": {"name": "checkout", "uid": "aa"},
            },
        }));
        let subject = decode_bearer(format!("Bearer {token}").as_bytes()).expect("decoded");
        assert_eq!(subject.subject, "system:serviceaccount:shop:checkout");
        assert_eq!(subject.namespace.as_deref(), Some("shop"));
        assert_eq!(subject.service_account.as_deref(), Some("checkout"));
        assert_eq!(subject.pod_name.as_deref(), Some("checkout-7f9"));
        assert_eq!(
            subject.pod_uid.as_deref(),
            Some("1f0e0d0c-0000-4000-8000-000000000001")
        );
    }

    #[test]
    fn legacy_token_claims() {
        let token = jwt(&serde_json::json!({
            "iss": "kubernetes/serviceaccount",
            "sub": "system:serviceaccount:kube-system:default",
        }));
        let subject = decode_bearer(format!("bearer {token}").as_bytes()).expect("decoded");
        assert_eq!(subject.namespace.as_deref(), Some("kube-system"));
        assert_eq!(subject.service_account.as_deref(), Some("default"));
        assert_eq!(subject.pod_uid, None);
    }

    #[test]
    fn non_jwt_credentials_are_not_decoded() {
        assert_eq!(decode_bearer(b"Basic dXNlcjpwYXNz"), None);
        assert_eq!(decode_bearer(b"Bearer abcdef.0123456789abcdef"), None);
        assert_eq!(decode_bearer(b"Bearer a.%%%.c"), None);
        assert_eq!(decode_bearer(b"Bearer"), None);
        assert_eq!(decode_bearer(&[0xff, 0xfe]), None);
    }
}
