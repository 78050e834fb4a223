//! The admin API over a process's faults, off unless an admin token is configured; requests
//! need `Authorization: Bearer <token>` (anything else: 401). Gateways and fanout workers both
//! serve it.
//!
//! - `GET /admin/faults`: the faults in force (sealed ones are not listed);
//! - `POST /admin/faults` with a [`FaultSpec`]: adds one, answers `201 {"id": N}`;
//! - `DELETE /admin/faults/{id}`: removes one (sealed or not);
//! - `DELETE /admin/faults`: removes every fault not sealed (`?include_sealed=true`: all).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use protocol::ErrorCode;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::registry::{FaultSpec, Faults};

/// Shortest admin token accepted at start, in bytes (128 bits when random): the token guards
/// fault injection and, with client auth on, the ops endpoints, so it must not be guessable.
pub const MIN_TOKEN_BYTES: usize = 16;

/// How to make a good token, named in the refusal of a short one.
pub const TOKEN_HINT: &str = "generate one with `openssl rand -hex 16`";

/// Checks that an admin token is long enough: at least [`MIN_TOKEN_BYTES`]. The error never
/// contains the token.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.len() >= MIN_TOKEN_BYTES {
        return Ok(());
    }
    let what = if token.is_empty() { "is empty".to_owned() } else { format!("has {} bytes", token.len()) };
    Err(format!(
        "the admin token {what}; it must have at least {MIN_TOKEN_BYTES} bytes ({TOKEN_HINT}); \
         leave CHAT_ADMIN_TOKEN and --admin-token unset to keep the admin API off"
    ))
}

#[derive(Clone)]
struct Admin {
    faults: Arc<Faults>,
    token: Option<String>,
}

/// The `/admin/faults` routes over `faults`, guarded by `token` (off when `None`).
pub fn router<S: Clone + Send + Sync + 'static>(faults: Arc<Faults>, token: Option<String>) -> Router<S> {
    // The binary refuses a short token at start; a library caller is told.
    if let Some(Err(problem)) = token.as_deref().map(check_token) {
        tracing::warn!("{problem}");
    }
    Router::new()
        .route("/admin/faults", get(list_faults).post(add_fault).delete(clear_faults))
        .route("/admin/faults/{id}", delete(remove_fault))
        .with_state(Admin { faults, token })
}

fn error(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": {"code": code, "message": message.into()}}))).into_response()
}

/// The refusal for a request without the admin token, or `None` when it may proceed.
fn denied(admin: &Admin, headers: &HeaderMap) -> Option<Response> {
    let Some(expected) = &admin.token else {
        return Some(error(
            StatusCode::NOT_FOUND,
            ErrorCode::Forbidden,
            "the admin API is off; start with --admin-token",
        ));
    };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    (!given.is_some_and(|given| token_matches(given, expected))).then(|| {
        error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, "Authorization: Bearer <admin token> required")
    })
}

/// Whether `given` is the admin token, compared in constant time: how long the comparison
/// takes tells nothing about how much of a guess was right (only a wrong length answers
/// faster, and the length is no secret worth keeping).
fn token_matches(given: &str, expected: &str) -> bool {
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

async fn list_faults(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    if let Some(refusal) = denied(&admin, &headers) {
        return refusal;
    }
    Json(json!({"faults": admin.faults.list()})).into_response()
}

async fn add_fault(
    State(admin): State<Admin>,
    headers: HeaderMap,
    spec: Result<Json<FaultSpec>, JsonRejection>,
) -> Response {
    if let Some(refusal) = denied(&admin, &headers) {
        return refusal;
    }
    let spec = match spec {
        Ok(Json(spec)) => spec,
        Err(e) => return error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e.body_text()),
    };
    match admin.faults.add(spec.clone()) {
        Ok(id) => {
            if !spec.sealed {
                tracing::warn!(id, hop = %spec.hop, action = spec.action.name(), "fault injected");
            }
            (StatusCode::CREATED, Json(json!({"id": id}))).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e.to_string()),
    }
}

async fn remove_fault(State(admin): State<Admin>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Some(refusal) = denied(&admin, &headers) {
        return refusal;
    }
    if admin.faults.remove(id) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(StatusCode::NOT_FOUND, ErrorCode::BadRequest, "no such fault")
    }
}

#[derive(Deserialize)]
struct ClearParams {
    #[serde(default)]
    include_sealed: bool,
}

async fn clear_faults(
    State(admin): State<Admin>,
    headers: HeaderMap,
    params: Result<Query<ClearParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Some(refusal) = denied(&admin, &headers) {
        return refusal;
    }
    let Ok(Query(params)) = params else {
        return error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, "include_sealed must be true or false");
    };
    Json(json!({"removed": admin.faults.clear(params.include_sealed)})).into_response()
}

#[cfg(test)]
mod tests {
    use super::{check_token, token_matches, MIN_TOKEN_BYTES};

    #[test]
    fn only_the_exact_token_matches() {
        let token = "s3cret-admin-token";
        assert!(token_matches(token, token));
        for wrong in ["", "s", "s3cret-admin-toke", "s3cret-admin-token ", "s3cret-admin-tokem", "S3CRET-ADMIN-TOKEN"] {
            assert!(!token_matches(wrong, token), "{wrong:?}");
        }
    }

    #[test]
    fn a_token_shorter_than_16_bytes_is_refused_without_echoing_it() {
        assert_eq!(check_token(&"t".repeat(MIN_TOKEN_BYTES)), Ok(()));
        // Bytes, not characters: eight two-byte characters are enough.
        assert_eq!(check_token(&"é".repeat(MIN_TOKEN_BYTES / 2)), Ok(()));
        for short in ["", "s3cret", "fifteen-bytes!!"] {
            let problem = check_token(short).unwrap_err();
            assert!(problem.contains("at least 16 bytes"), "{problem}");
            assert!(short.is_empty() || !problem.contains(short), "{problem}");
        }
        assert!(check_token("fifteen-bytes!!").unwrap_err().contains("has 15 bytes"));
    }
}
