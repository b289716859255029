//! Service-account tokens in the format a real API server issues for projected volumes.
//! They are compact JWS (ES256) whose claims are those of a bound token (`iss`, `sub`, `aud`, `exp`,
//! `iat`, `nbf`, `jti` and the `kubernetes.io` object naming the namespace, service account,
//! pod and node). [`TokenIssuer`] mints them for tests; [`TokenVerifier`] checks signature,
//! issuer, audience and times and maps a token to an [`Identity`].

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, KeyPair as _},
};
use serde::{Deserialize, Serialize};

/// Issuer the test cluster's tokens carry, the default of kubeadm clusters.
pub const DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Audience the test cluster's tokens carry and the server accepts.
pub const DEFAULT_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
/// Clock skew allowed when checking `exp` and `nbf`, as the real authenticator allows.
const LEEWAY_SECONDS: i64 = 60;

/// Reason a bearer token was rejected.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token is not a compact JWS with three parts")]
    Malformed,
    #[error("token header or claims are not valid base64url JSON: {reason}")]
    Undecodable { reason: String },
    #[error("token algorithm {alg:?} is not ES256")]
    Algorithm { alg: String },
    #[error("token signature is invalid")]
    Signature,
    #[error("token issuer {iss:?} is not the expected issuer")]
    Issuer { iss: String },
    #[error("token audiences {aud:?} do not include the expected audience")]
    Audience { aud: Vec<String> },
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token subject {sub:?} is not a service account")]
    Subject { sub: String },
}

/// Key loading or signing failure.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("read signing key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("signing key {path} is not a PEM PKCS#8 P-256 private key")]
    Format { path: String },
    #[error("generate P-256 key: {reason}")]
    Generate { reason: String },
}

/// The identity a token authenticates, as the authenticator maps its claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `system:serviceaccount:NAMESPACE:NAME`.
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub namespace: String,
    pub service_account: String,
    /// Pod the token is bound to, with its UID, when it is a bound token.
    pub pod: Option<(String, String)>,
    pub node: Option<String>,
}

/// A bound service-account token to mint.
#[derive(Clone, Debug)]
pub struct BoundToken {
    pub namespace: String,
    pub service_account: String,
    pub service_account_uid: String,
    /// Pod name and UID the token is bound to.
    pub pod: Option<(String, String)>,
    /// Node name and UID the pod runs on.
    pub node: Option<(String, String)>,
    pub lifetime: Duration,
}

impl BoundToken {
    /// Describes a token for service account `service_account` in `namespace`, bound to a pod,
    /// valid for one hour like the kubelet's default projected token.
    pub fn for_pod(namespace: &str, service_account: &str, pod_name: &str, pod_uid: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            service_account_uid: uuid::Uuid::now_v7().to_string(),
            pod: Some((pod_name.to_string(), pod_uid.to_string())),
            node: Some(("test-node".to_string(), uuid::Uuid::now_v7().to_string())),
            lifetime: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    kid: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: Audience,
    exp: i64,
    iat: i64,
    nbf: i64,
    #[serde(default)]
    jti: String,
    #[serde(rename = "kubernetes.io", default)]
    kubernetes: Option<KubernetesClaims>,
}

/// `aud` is a string or an array of strings (RFC 7519, section 4.1.3).
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Serialize, Deserialize)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: NamedRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<NamedRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<NamedRef>,
}

#[derive(Debug, Serialize, Deserialize)]
struct NamedRef {
    name: String,
    uid: String,
}

/// Signs tokens with a P-256 key.
#[derive(Debug)]
pub struct TokenIssuer {
    key: EcdsaKeyPair,
    pkcs8: Vec<u8>,
    issuer: String,
    audience: String,
}

impl TokenIssuer {
    /// Generates a new key with the default issuer and audience.
    pub fn generate() -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|error| KeyError::Generate {
                reason: error.to_string(),
            })?;
        Self::from_pkcs8(pkcs8.as_ref().to_vec(), "generated")
    }

    /// Loads a PEM `PRIVATE KEY` (PKCS#8, P-256) file.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let der = pem_body(&text, "PRIVATE KEY").ok_or_else(|| KeyError::Format {
            path: path.display().to_string(),
        })?;
        Self::from_pkcs8(der, &path.display().to_string())
    }

    fn from_pkcs8(pkcs8: Vec<u8>, origin: &str) -> Result<Self, KeyError> {
        let key = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &pkcs8,
            &SystemRandom::new(),
        )
        .map_err(|_| KeyError::Format {
            path: origin.to_string(),
        })?;
        Ok(Self {
            key,
            pkcs8,
            issuer: DEFAULT_ISSUER.to_string(),
            audience: DEFAULT_AUDIENCE.to_string(),
        })
    }

    /// Returns the key as a PEM `PRIVATE KEY` block, for the server's key file.
    pub fn private_key_pem(&self) -> String {
        pem_encode("PRIVATE KEY", &self.pkcs8)
    }

    /// Returns a verifier for this issuer's tokens.
    pub fn verifier(&self) -> TokenVerifier {
        TokenVerifier {
            public_key: self.key.public_key().as_ref().to_vec(),
            key_id: self.key_id(),
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
        }
    }

    /// Key id: base64url of the SHA-256 of the public key point. The real server hashes the
    /// DER public key instead; clients treat `kid` as opaque either way.
    fn key_id(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.key.public_key().as_ref());
        URL_SAFE_NO_PAD.encode(digest.as_ref())
    }

    /// Mints a token for `token`, issued now.
    pub fn mint(&self, token: &BoundToken) -> String {
        let now = unix_now();
        let lifetime = i64::try_from(token.lifetime.as_secs()).unwrap_or(i64::MAX / 2);
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: format!(
                "system:serviceaccount:{}:{}",
                token.namespace, token.service_account
            ),
            aud: Audience::Many(vec![self.audience.clone()]),
            exp: now.saturating_add(lifetime),
            iat: now,
            nbf: now,
            jti: uuid::Uuid::now_v7().to_string(),
            kubernetes: Some(KubernetesClaims {
                namespace: token.namespace.clone(),
                serviceaccount: NamedRef {
                    name: token.service_account.clone(),
                    uid: token.service_account_uid.clone(),
                },
                pod: token.pod.as_ref().map(|(name, uid)| NamedRef {
                    name: name.clone(),
                    uid: uid.clone(),
                }),
                node: token.node.as_ref().map(|(name, uid)| NamedRef {
                    name: name.clone(),
                    uid: uid.clone(),
                }),
            }),
        };
        self.sign_claims(&claims)
    }

    /// Mints a token with the given claims JSON as is, for tests of bad tokens.
    pub fn mint_raw(&self, claims: &serde_json::Value) -> String {
        self.sign_claims(claims)
    }

    fn sign_claims(&self, claims: &impl Serialize) -> String {
        let header = Header {
            alg: "ES256".to_string(),
            kid: self.key_id(),
        };
        let header = serde_json::to_vec(&header).expect("a JWS header always serializes");
        let claims = serde_json::to_vec(claims).expect("token claims always serialize");
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let signature = self
            .key
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .expect("ECDSA signing with a valid key does not fail");
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        )
    }
}

/// Checks tokens of one issuer.
#[derive(Clone, Debug)]
pub struct TokenVerifier {
    /// Uncompressed P-256 point.
    public_key: Vec<u8>,
    key_id: String,
    issuer: String,
    audience: String,
}

impl TokenVerifier {
    /// Verifies `token` and maps it to the identity it authenticates.
    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        let mut parts = token.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };

        let header: Header = decode_json(header)?;
        if header.alg != "ES256" {
            return Err(TokenError::Algorithm { alg: header.alg });
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Signature)?;
        let signing_input = &token[..header_and_claims_len(token)];
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &self.public_key)
            .verify(signing_input.as_bytes(), &signature)
            .map_err(|_| TokenError::Signature)?;
        if !header.kid.is_empty() && header.kid != self.key_id {
            return Err(TokenError::Signature);
        }

        let claims: Claims = decode_json(claims)?;
        if claims.iss != self.issuer {
            return Err(TokenError::Issuer { iss: claims.iss });
        }
        let audiences = match claims.aud {
            Audience::One(one) => vec![one],
            Audience::Many(many) => many,
        };
        if !audiences.contains(&self.audience) {
            return Err(TokenError::Audience { aud: audiences });
        }
        let now = unix_now();
        if now > claims.exp.saturating_add(LEEWAY_SECONDS) {
            return Err(TokenError::Expired);
        }
        if now < claims.nbf.saturating_sub(LEEWAY_SECONDS) {
            return Err(TokenError::NotYetValid);
        }

        let Some(rest) = claims.sub.strip_prefix("system:serviceaccount:") else {
            return Err(TokenError::Subject { sub: claims.sub });
        };
        let Some((namespace, name)) = rest.split_once(':') else {
            return Err(TokenError::Subject { sub: claims.sub });
        };
        let (uid, pod, node) = match claims.kubernetes {
            Some(kubernetes) => (
                kubernetes.serviceaccount.uid,
                kubernetes.pod.map(|pod| (pod.name, pod.uid)),
                kubernetes.node.map(|node| node.name),
            ),
            None => (String::new(), None, None),
        };
        Ok(Identity {
            username: claims.sub.clone(),
            uid,
            groups: vec![
                "system:serviceaccounts".to_string(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".to_string(),
            ],
            namespace: namespace.to_string(),
            service_account: name.to_string(),
            pod,
            node,
        })
    }
}

fn header_and_claims_len(token: &str) -> usize {
    token.rfind('.').unwrap_or(token.len())
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|error| TokenError::Undecodable {
            reason: error.to_string(),
        })?;
    serde_json::from_slice(&bytes).map_err(|error| TokenError::Undecodable {
        reason: error.to_string(),
    })
}

fn unix_now() -> i64 {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    i64::try_from(seconds).unwrap_or(i64::MAX)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        text.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

fn pem_body(text: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = text[start..].find(&end)? + start;
    let body: String = text[start..stop].split_whitespace().collect();
    STANDARD.decode(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_token_verifies_to_pod_identity() {
        let issuer = TokenIssuer::generate().expect("generate key");
        let token = issuer.mint(&BoundToken::for_pod("team", "builder", "web-0", "uid-1"));
        let identity = issuer.verifier().verify(&token).expect("verify");
        assert_eq!(identity.username, "system:serviceaccount:team:builder");
        assert_eq!(identity.namespace, "team");
        assert_eq!(
            identity.pod,
            Some(("web-0".to_string(), "uid-1".to_string()))
        );
    }

    #[test]
    fn token_from_other_key_is_rejected() {
        let issuer = TokenIssuer::generate().expect("generate key");
        let other = TokenIssuer::generate().expect("generate key");
        let token = other.mint(&BoundToken::for_pod("team", "builder", "web-0", "uid-1"));
        let error = issuer.verifier().verify(&token).expect_err("foreign key");
        assert!(matches!(error, TokenError::Signature), "{error}");
    }

    #[test]
    fn expired_and_tampered_tokens_are_rejected() {
        let issuer = TokenIssuer::generate().expect("generate key");
        let expired = issuer.mint_raw(&serde_json::json!({
            "iss": DEFAULT_ISSUER, "sub": "system:serviceaccount:a:b", "aud": DEFAULT_AUDIENCE,
            "exp": 1000, "iat": 900, "nbf": 900,
        }));
        let error = issuer.verifier().verify(&expired).expect_err("expired");
        assert!(matches!(error, TokenError::Expired), "{error}");

        let token = issuer.mint(&BoundToken::for_pod("a", "b", "p", "u"));
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(br#"{"iss":"x"}"#);
        parts[1] = &forged;
        let error = issuer
            .verifier()
            .verify(&parts.join("."))
            .expect_err("tampered");
        assert!(matches!(error, TokenError::Signature), "{error}");
    }

    #[test]
    fn key_survives_pem_round_trip() {
        let issuer = TokenIssuer::generate().expect("generate key");
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sa.key");
        std::fs::write(&path, issuer.private_key_pem()).expect("write key");
        let loaded = TokenIssuer::load(&path).expect("load key");
        let token = loaded.mint(&BoundToken::for_pod("a", "b", "p", "u"));
        issuer.verifier().verify(&token).expect("same key verifies");
    }
}
