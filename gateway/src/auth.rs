//! `hello` authentication: HS256 JWTs whose `sub` is the user and whose optional `rooms` claim
//! restricts joins. `exp` is required, `nbf` checked when present, `iss` and `aud` bound when
//! configured, and a token's lifetime is capped ([`JwtAuth`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Shortest HS256 secret accepted at start, in bytes (256 bits, the size of the HMAC-SHA256
/// key; a shorter or guessable secret lets anyone who guesses it mint tokens).
pub const MIN_SECRET_BYTES: usize = 32;

/// How to make a good secret, named in the refusal of a short one.
pub const SECRET_HINT: &str = "generate one with `openssl rand -base64 48`";

/// Default [`JwtAuth::max_lifetime`], in seconds (`--jwt-max-lifetime-secs`): one day.
pub const DEFAULT_MAX_LIFETIME_SECS: u64 = 86_400;

/// Clock leeway allowed on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 5;

/// Checks that `secret` is long enough to be an HS256 key: at least [`MIN_SECRET_BYTES`]. The
/// error never contains the secret.
pub fn check_secret(secret: &str) -> Result<(), String> {
    if secret.len() >= MIN_SECRET_BYTES {
        return Ok(());
    }
    let what = if secret.is_empty() { "is empty".to_owned() } else { format!("has {} bytes", secret.len()) };
    Err(format!(
        "the JWT secret {what}; it must have at least {MIN_SECRET_BYTES} bytes ({SECRET_HINT}); \
         leave CHAT_JWT_SECRET and --jwt-secret unset for dev mode"
    ))
}

/// What tokens are verified against: the HS256 secret and the rules on their claims.
#[derive(Clone)]
pub struct JwtAuth {
    /// The HS256 secret (the binary refuses one shorter than [`MIN_SECRET_BYTES`]).
    pub secret: String,
    /// When set, tokens must carry this `iss`.
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud` (one of theirs). Unset, a token carrying any
    /// `aud` is refused: it was minted for someone else.
    pub audience: Option<String>,
    /// Longest lifetime a token may have: one whose `exp` is further than this in the future,
    /// or whose `exp - iat` is beyond it, is refused.
    pub max_lifetime: Duration,
}

impl JwtAuth {
    /// `secret` with no `iss` or `aud` binding and the default lifetime cap.
    pub fn new(secret: impl Into<String>) -> Self {
        Self {
            secret: secret.into(),
            issuer: None,
            audience: None,
            max_lifetime: Duration::from_secs(DEFAULT_MAX_LIFETIME_SECS),
        }
    }
}

impl std::fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuth")
            .field("secret", &"<redacted>")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("max_lifetime", &self.max_lifetime)
            .finish()
    }
}

/// Who a connection is, once `hello` succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user name.
    pub user: String,
    /// Rooms the token allows; `None` allows all.
    pub rooms: Option<Vec<String>>,
    /// When the token stops being valid (its `exp` plus the allowed clock leeway, seconds since
    /// the Unix epoch); `None` in dev mode. The connection is closed then.
    pub valid_until: Option<u64>,
}

impl Identity {
    /// Whether this identity may join `room`.
    pub fn may_join(&self, room: &str) -> bool {
        self.rooms.as_ref().is_none_or(|rooms| rooms.iter().any(|r| r == room))
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    rooms: Option<Vec<String>>,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token at all.
    #[error("a token is required: send hello with \"token\" or connect with ?token=")]
    Missing,
    /// Signature, expiry, `nbf`, `iss`, `aud`, lifetime or format is wrong.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// `sub` is not a valid user name.
    #[error("token subject is not a valid user name")]
    BadSubject,
}

/// Verifies HS256 tokens with one secret.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    max_lifetime_secs: u64,
}

impl Verifier {
    /// A verifier for `auth`: `exp` is required and checked, `nbf` checked when present, `iss`
    /// and `aud` required and checked when configured.
    pub fn new(auth: &JwtAuth) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &auth.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        if let Some(audience) = &auth.audience {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        Self {
            key: DecodingKey::from_secret(auth.secret.as_bytes()),
            validation,
            max_lifetime_secs: auth.max_lifetime.as_secs(),
        }
    }

    /// The identity a token proves.
    pub fn verify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let data =
            decode::<Claims>(token, &self.key, &self.validation).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let claims = data.claims;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let max = self.max_lifetime_secs;
        if claims.exp > now.saturating_add(max).saturating_add(self.validation.leeway) {
            return Err(AuthError::Invalid(format!("token expires more than {max} s from now")));
        }
        if claims.iat.is_some_and(|iat| claims.exp.saturating_sub(iat) > max) {
            return Err(AuthError::Invalid(format!("token lifetime (exp - iat) exceeds {max} s")));
        }
        if !protocol::names::is_valid_user(&claims.sub) {
            return Err(AuthError::BadSubject);
        }
        let valid_until = claims.exp.saturating_add(self.validation.leeway);
        Ok(Identity { user: claims.sub, rooms: claims.rooms, valid_until: Some(valid_until) })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::{json, Value};

    use super::*;

    const SECRET: &str = "unit-test-secret-0123456789abcdef";

    fn now() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    fn sign(claims: Value) -> String {
        encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
    }

    fn verify(auth: &JwtAuth, claims: Value) -> Result<Identity, AuthError> {
        Verifier::new(auth).verify(Some(&sign(claims)))
    }

    #[test]
    fn a_valid_token_proves_its_subject_and_rooms() {
        let exp = now() + 3600;
        let identity = verify(&JwtAuth::new(SECRET), json!({"sub": "alice", "exp": exp, "rooms": ["a"]})).unwrap();
        assert_eq!(identity.user, "alice");
        assert_eq!(identity.rooms, Some(vec!["a".to_owned()]));
        assert_eq!(identity.valid_until, Some(exp + LEEWAY_SECS));
        let forged = encode(&Header::default(), &json!({"sub": "a", "exp": exp}), &EncodingKey::from_secret(b"x"));
        assert!(Verifier::new(&JwtAuth::new(SECRET)).verify(Some(&forged.unwrap())).is_err());
        assert!(matches!(Verifier::new(&JwtAuth::new(SECRET)).verify(None), Err(AuthError::Missing)));
    }

    #[test]
    fn nbf_is_checked_when_present() {
        let auth = JwtAuth::new(SECRET);
        let (now, exp) = (now(), now() + 3600);
        assert!(verify(&auth, json!({"sub": "a", "exp": exp, "nbf": now - 60})).is_ok());
        assert!(verify(&auth, json!({"sub": "a", "exp": exp, "nbf": now + 2})).is_ok(), "within the leeway");
        let refused = verify(&auth, json!({"sub": "a", "exp": exp, "nbf": now + 600}));
        assert!(matches!(refused, Err(AuthError::Invalid(_))), "{refused:?}");
    }

    #[test]
    fn a_configured_issuer_is_required_and_checked() {
        let auth = JwtAuth { issuer: Some("https://idp.example".into()), ..JwtAuth::new(SECRET) };
        let exp = now() + 3600;
        assert!(verify(&auth, json!({"sub": "a", "exp": exp, "iss": "https://idp.example"})).is_ok());
        assert!(verify(&auth, json!({"sub": "a", "exp": exp, "iss": "https://evil.example"})).is_err());
        assert!(verify(&auth, json!({"sub": "a", "exp": exp})).is_err(), "iss is required");
        // Unbound, any issuer is accepted.
        assert!(verify(&JwtAuth::new(SECRET), json!({"sub": "a", "exp": exp, "iss": "whoever"})).is_ok());
    }

    #[test]
    fn a_configured_audience_is_required_and_checked() {
        let auth = JwtAuth { audience: Some("chat".into()), ..JwtAuth::new(SECRET) };
        let exp = now() + 3600;
        assert!(verify(&auth, json!({"sub": "a", "exp": exp, "aud": "chat"})).is_ok());
        assert!(verify(&auth, json!({"sub": "a", "exp": exp, "aud": ["billing", "chat"]})).is_ok());
        assert!(verify(&auth, json!({"sub": "a", "exp": exp, "aud": "billing"})).is_err());
        assert!(verify(&auth, json!({"sub": "a", "exp": exp})).is_err(), "aud is required");
        // Unbound, a token minted for some audience is not taken.
        assert!(verify(&JwtAuth::new(SECRET), json!({"sub": "a", "exp": exp, "aud": "billing"})).is_err());
    }

    #[test]
    fn a_token_lifetime_is_capped() {
        let auth = JwtAuth { max_lifetime: Duration::from_secs(600), ..JwtAuth::new(SECRET) };
        let now = now();
        assert!(verify(&auth, json!({"sub": "a", "exp": now + 600})).is_ok());
        assert!(verify(&auth, json!({"sub": "a", "iat": now, "exp": now + 600})).is_ok());
        let far = verify(&auth, json!({"sub": "a", "exp": now + 3600}));
        assert!(matches!(far, Err(AuthError::Invalid(ref m)) if m.contains("600")), "{far:?}");
        let long = verify(&auth, json!({"sub": "a", "iat": now - 3000, "exp": now + 300}));
        assert!(matches!(long, Err(AuthError::Invalid(_))), "exp - iat beyond the cap: {long:?}");
        // The default cap is a day.
        let default = JwtAuth::new(SECRET);
        assert!(verify(&default, json!({"sub": "a", "iat": now, "exp": now + 86_400})).is_ok());
        assert!(verify(&default, json!({"sub": "a", "exp": now + 86_400 * 365})).is_err());
    }

    #[test]
    fn short_secrets_are_refused_without_being_echoed() {
        assert!(check_secret(&"k".repeat(MIN_SECRET_BYTES)).is_ok());
        for short in ["", "change-me", "0123456789abcdef0123456789abcde"] {
            let error = check_secret(short).unwrap_err();
            assert!(error.contains("at least 32 bytes") && error.contains("openssl rand -base64 48"), "{error}");
            assert!(short.is_empty() || !error.contains(short), "{error}");
        }
    }

    #[test]
    fn the_secret_is_not_debug_printed() {
        let printed = format!("{:?}", JwtAuth::new(SECRET));
        assert!(!printed.contains(SECRET), "{printed}");
    }
}
