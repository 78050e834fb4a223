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

/// Admin tokens shorter than this get a warning at start (not a refusal: the exercises use
/// short ones on loopback, and without a token the admin API is off).
pub const RECOMMENDED_TOKEN_BYTES: usize = 16;

#[derive(Clone)]
struct Admin {
    faults: Arc<Faults>,
    token: Option<String>,
}

/// The `/admin/faults` routes over `faults`, guarded by `token` (off when `None`).
pub fn router<S: Clone + Send + Sync + 'static>(faults: Arc<Faults>, token: Option<String>) -> Router<S> {
    if token.as_ref().is_some_and(|token| token.len() < RECOMMENDED_TOKEN_BYTES) {
        tracing::warn!(
            "the admin token is shorter than {RECOMMENDED_TOKEN_BYTES} bytes: fine for the exercises on loopback, \
             not where others can reach /admin (generate one with `openssl rand -base64 32`)"
        );
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
    use super::token_matches;

    #[test]
    fn only_the_exact_token_matches() {
        assert!(token_matches("s3cret", "s3cret"));
        for wrong in ["", "s", "s3cre", "s3cret ", "s3cres", "S3CRET", "s3cret-and-more"] {
            assert!(!token_matches(wrong, "s3cret"), "{wrong:?}");
        }
    }
}
