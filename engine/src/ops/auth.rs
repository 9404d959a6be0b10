//! Token auth at the upgrade: find the JWT in a request, check it, and turn its claims into
//! what the connection may do.
//!
//! Owns [`Auth`] (keys and rules from [`AuthConfig`], loaded once at start), [`Grants`] (the
//! user and topic patterns a valid token carries) and [`AuthError`] (why a request gets 401).
//! Signature checks are the `jsonwebtoken` crate's; this module only chooses the key by the
//! token's algorithm and reads the token from the request.

use std::{
    collections::HashSet,
    fs,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use ringcast_protocol::UpgradeRequest;
use serde::Deserialize;
use wildmatch::WildMatch;

use crate::{config::AuthConfig, error::ConfigError};

/// Checks tokens against the configured keys. Built once from [`AuthConfig`]; cheap to share
/// behind an `Arc` between shards.
pub struct Auth {
    hs256: Option<DecodingKey>,
    rs256: Option<DecodingKey>,
    es256: Option<DecodingKey>,
    issuer: String,
    audience: String,
    leeway: u64,
    cookie: String,
    subprotocol_prefix: String,
    query_param: String,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys stay out of logs.
        f.debug_struct("Auth")
            .field("hs256", &self.hs256.is_some())
            .field("rs256", &self.rs256.is_some())
            .field("es256", &self.es256.is_some())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// Why a request carries no usable token: the 401's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No token in any of the places that are read.
    #[error("no token: send Authorization: Bearer <JWT>, a token subprotocol or cookie")]
    Missing,
    /// Not a JWT, or its claims are not the expected shape.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// Signed with an algorithm that has no configured key.
    #[error("token algorithm {0} is not accepted")]
    Algorithm(String),
    /// The signature, issuer, audience or not-before time does not check out.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// Past its `exp` (beyond the leeway).
    #[error("token expired")]
    Expired,
}

impl AuthError {
    /// The `WWW-Authenticate` value that goes with the 401 (RFC 6750).
    pub fn challenge(&self) -> String {
        match self {
            AuthError::Missing => "Bearer realm=\"ringcast\"".into(),
            other => format!(
                "Bearer realm=\"ringcast\", error=\"invalid_token\", error_description=\"{}\"",
                other.to_string().replace(['"', '\\'], "'")
            ),
        }
    }
}

/// What a valid token allows: who the user is, until when, and which topics they may
/// subscribe to and publish on.
#[derive(Debug, Clone)]
pub struct Grants {
    user: String,
    expires: u64,
    subscribe: Vec<WildMatch>,
    publish: Vec<WildMatch>,
}

impl Grants {
    /// The token's `sub`.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The token's `exp`, as a time.
    pub fn expires(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.expires)
    }

    /// Whether the token has expired by `now` (no leeway: it already had its leeway at the
    /// upgrade).
    pub fn expired_at(&self, now: SystemTime) -> bool {
        now >= self.expires()
    }

    /// Whether one of the token's `subscribe` patterns matches `topic`.
    pub fn may_subscribe(&self, topic: &str) -> bool {
        self.subscribe.iter().any(|p| p.matches(topic))
    }

    /// Whether one of the token's `publish` patterns matches `topic`.
    pub fn may_publish(&self, topic: &str) -> bool {
        self.publish.iter().any(|p| p.matches(topic))
    }
}

/// The claims read from a token. `exp` and `sub` are required; topic lists default to none.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

impl Auth {
    /// Loads the keys `config` names. `None` when `auth.required` is false.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for a key file that cannot be read or parsed (the file is named
    /// in the log line), or when no key is configured.
    pub fn from_config(config: &AuthConfig) -> Result<Option<Auth>, ConfigError> {
        if !config.required {
            return Ok(None);
        }
        let load = |path: &Option<std::path::PathBuf>,
                    key: &'static str,
                    parse: fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>|
         -> Result<Option<DecodingKey>, ConfigError> {
            let Some(path) = path else {
                return Ok(None);
            };
            let bytes = read_key(path).map_err(|e| {
                tracing::error!(file = %path.display(), error = %e, "cannot read auth key");
                ConfigError::Invalid {
                    key,
                    why: "file cannot be read",
                }
            })?;
            parse(&bytes).map(Some).map_err(|e| {
                tracing::error!(file = %path.display(), error = %e, "cannot parse auth key");
                ConfigError::Invalid {
                    key,
                    why: "file does not hold a key of that kind (PEM public key expected)",
                }
            })
        };
        let auth = Auth {
            hs256: load(&config.hs256_secret_file, "auth.hs256_secret_file", |b| {
                Ok(DecodingKey::from_secret(b))
            })?,
            rs256: load(
                &config.rs256_public_key_file,
                "auth.rs256_public_key_file",
                DecodingKey::from_rsa_pem,
            )?,
            es256: load(
                &config.es256_public_key_file,
                "auth.es256_public_key_file",
                DecodingKey::from_ec_pem,
            )?,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            leeway: config.leeway.as_secs(),
            cookie: config.cookie.clone(),
            subprotocol_prefix: config.subprotocol_prefix.clone(),
            query_param: config.query_param.clone(),
        };
        if auth.hs256.is_none() && auth.rs256.is_none() && auth.es256.is_none() {
            return Err(ConfigError::Invalid {
                key: "auth.required",
                why: "needs at least one key file",
            });
        }
        if !auth.query_param.is_empty() {
            tracing::warn!(
                param = %auth.query_param,
                "auth.query_param is set: tokens in URLs end up in proxy and access logs"
            );
        }
        Ok(Some(auth))
    }

    /// Finds the request's token and checks it.
    ///
    /// # Errors
    /// [`AuthError`]: the client should get 401 with [`AuthError::challenge`].
    pub fn authenticate(&self, req: &UpgradeRequest<'_>) -> Result<Grants, AuthError> {
        let token = self.token(req).ok_or(AuthError::Missing)?;
        self.verify(token)
    }

    /// The token, from the first place that has one: `Authorization: Bearer`, a subprotocol
    /// entry with the configured prefix, the cookie, the query parameter.
    fn token<'r>(&self, req: &UpgradeRequest<'r>) -> Option<&'r str> {
        if let Some(value) = req
            .header("authorization")
            .and_then(|v| std::str::from_utf8(v).ok())
        {
            let value = value.trim();
            if let Some((scheme, token)) = value.split_once(' ') {
                if scheme.eq_ignore_ascii_case("bearer") {
                    return Some(token.trim());
                }
            }
        }
        if !self.subprotocol_prefix.is_empty() {
            let prefix = self.subprotocol_prefix.as_str();
            if let Some(token) = req.protocols().find_map(|p| p.strip_prefix(prefix)) {
                return Some(token);
            }
        }
        if !self.cookie.is_empty() {
            if let Some(cookies) = req
                .header("cookie")
                .and_then(|v| std::str::from_utf8(v).ok())
            {
                let found = cookie::Cookie::split_parse(cookies)
                    .filter_map(Result::ok)
                    .find(|c| c.name() == self.cookie)
                    .and_then(|c| c.value_raw());
                if found.is_some() {
                    return found;
                }
            }
        }
        if !self.query_param.is_empty() {
            let (_, query) = req.target().split_once('?')?;
            return query.split('&').find_map(|pair| {
                pair.strip_prefix(self.query_param.as_str())?
                    .strip_prefix('=')
            });
        }
        None
    }

    /// Checks a token's signature and claims.
    ///
    /// # Errors
    /// As [`Auth::authenticate`].
    pub fn verify(&self, token: &str) -> Result<Grants, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| describe(&e))?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::RS256 => self.rs256.as_ref(),
            Algorithm::ES256 => self.es256.as_ref(),
            _ => None,
        }
        .ok_or_else(|| AuthError::Algorithm(format!("{:?}", header.alg)))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway;
        validation.required_spec_claims = HashSet::from(["exp".to_owned(), "sub".to_owned()]);
        if self.issuer.is_empty() {
            validation.iss = None;
        } else {
            validation.set_issuer(&[&self.issuer]);
        }
        if self.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&self.audience]);
        }
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|e| describe(&e))?
            .claims;
        let patterns = |list: Vec<String>| -> Vec<WildMatch> {
            list.iter().map(|p| WildMatch::new(p)).collect()
        };
        Ok(Grants {
            user: claims.sub,
            expires: claims.exp,
            subscribe: patterns(claims.subscribe),
            publish: patterns(claims.publish),
        })
    }
}

fn describe(e: &jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
        ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer".into()),
        ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience".into()),
        ErrorKind::ImmatureSignature => AuthError::Invalid("not valid yet (nbf)".into()),
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            AuthError::Algorithm("(mismatch)".into())
        }
        ErrorKind::MissingRequiredClaim(claim) => {
            AuthError::Malformed(format!("missing claim {claim}"))
        }
        _ => AuthError::Malformed(e.to_string()),
    }
}

/// A key file's bytes; a shared secret loses its trailing newline (as `echo` writes it).
fn read_key(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = fs::read(path)?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &[u8] = b"unit-test-secret";

    fn auth() -> Auth {
        Auth {
            hs256: Some(DecodingKey::from_secret(SECRET)),
            rs256: None,
            es256: None,
            issuer: String::new(),
            audience: String::new(),
            leeway: 0,
            cookie: "ringcast_token".into(),
            subprotocol_prefix: "ringcast.token.".into(),
            query_param: "token".into(),
        }
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(claims: serde_json::Value) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn request(extra: &str) -> Vec<u8> {
        format!(
            "GET /?a=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn grants_follow_the_claims() {
        let t = token(serde_json::json!({
            "sub": "ann", "exp": now() + 60,
            "subscribe": ["prices.*", "news"], "publish": ["chat.ann"]
        }));
        let g = auth().verify(&t).unwrap();
        assert_eq!(g.user(), "ann");
        assert!(g.may_subscribe("prices.BTC"));
        assert!(g.may_subscribe("news"));
        assert!(!g.may_subscribe("newsroom"));
        assert!(g.may_publish("chat.ann"));
        assert!(!g.may_publish("chat.bob"));
        assert!(!g.expired_at(SystemTime::now()));
        assert!(g.expired_at(SystemTime::now() + Duration::from_secs(61)));
    }

    #[test]
    fn bad_tokens_say_why() {
        let a = auth();
        assert!(matches!(
            a.verify("not-a-jwt"),
            Err(AuthError::Malformed(_))
        ));
        let expired = token(serde_json::json!({"sub": "ann", "exp": now() - 10}));
        assert_eq!(a.verify(&expired).unwrap_err(), AuthError::Expired);
        let no_sub = token(serde_json::json!({"exp": now() + 60}));
        assert!(matches!(a.verify(&no_sub), Err(AuthError::Malformed(_))));
        let forged = encode(
            &Header::default(),
            &serde_json::json!({"sub": "ann", "exp": now() + 60}),
            &EncodingKey::from_secret(b"another secret"),
        )
        .unwrap();
        assert!(matches!(a.verify(&forged), Err(AuthError::Invalid(_))));
        let rs = Header::new(Algorithm::HS384);
        let other_alg = encode(
            &rs,
            &serde_json::json!({"sub": "ann", "exp": now() + 60}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert!(matches!(a.verify(&other_alg), Err(AuthError::Algorithm(_))));
    }

    #[test]
    fn the_token_is_found_in_each_place_in_order() {
        let a = auth();
        let check = |extra: &str, target: &str| {
            let head = request(extra);
            let head = String::from_utf8(head).unwrap().replace("/?a=1", target);
            let req = UpgradeRequest::parse(head.as_bytes()).unwrap();
            a.token(&req).map(str::to_owned)
        };
        assert_eq!(
            check("Authorization: Bearer abc\r\n", "/"),
            Some("abc".into())
        );
        assert_eq!(
            check("authorization: bearer  abc \r\n", "/"),
            Some("abc".into())
        );
        assert_eq!(
            check(
                "Sec-WebSocket-Protocol: ringcast.v1.json, ringcast.token.t1\r\n",
                "/"
            ),
            Some("t1".into())
        );
        assert_eq!(
            check("Cookie: a=b; ringcast_token=c1; z=9\r\n", "/"),
            Some("c1".into())
        );
        assert_eq!(check("", "/?x=1&token=q1"), Some("q1".into()));
        assert_eq!(
            check(
                "Authorization: Bearer h\r\nCookie: ringcast_token=c\r\n",
                "/?token=q"
            ),
            Some("h".into()),
            "the header comes first"
        );
        assert_eq!(check("Authorization: Basic Zm9v\r\n", "/"), None);
        assert_eq!(check("", "/"), None);
    }

    #[test]
    fn the_challenge_never_breaks_the_header() {
        let e = AuthError::Malformed("a \"quoted\" \\ thing".into());
        assert!(!e.challenge().contains("\\"));
        assert_eq!(AuthError::Missing.challenge(), "Bearer realm=\"ringcast\"");
    }
}
