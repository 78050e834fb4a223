//! `hello` authentication: HS256 JWTs whose `sub` is the user and whose optional `rooms` claim
//! restricts joins.

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

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
    rooms: Option<Vec<String>>,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token at all.
    #[error("a token is required: send hello with \"token\" or connect with ?token=")]
    Missing,
    /// Signature, expiry or format is wrong.
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
}

impl Verifier {
    /// A verifier for `secret`; `exp` is required and checked.
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        Self { key: DecodingKey::from_secret(secret.as_bytes()), validation }
    }

    /// The identity a token proves.
    pub fn verify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let data =
            decode::<Claims>(token, &self.key, &self.validation).map_err(|e| AuthError::Invalid(e.to_string()))?;
        if !protocol::names::is_valid_user(&data.claims.sub) {
            return Err(AuthError::BadSubject);
        }
        let valid_until = data.claims.exp.saturating_add(self.validation.leeway);
        Ok(Identity { user: data.claims.sub, rooms: data.claims.rooms, valid_until: Some(valid_until) })
    }
}
