//! The admin API: fault injection at `/admin/faults`, off unless an admin token is configured;
//! requests need `Authorization: Bearer <token>` (anything else: 401). Gateways and fanout
//! workers both serve it.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use protocol::ErrorCode;
use serde_json::json;
use telemetry::faults::{FaultSpec, Faults};

use crate::http::error;

#[derive(Clone)]
struct Admin {
    faults: Arc<Faults>,
    token: Option<String>,
}

/// `GET/POST/DELETE /admin/faults` and `DELETE /admin/faults/{id}` over `faults`.
pub fn router<S: Clone + Send + Sync + 'static>(faults: Arc<Faults>, token: Option<String>) -> Router<S> {
    Router::new()
        .route("/admin/faults", get(list_faults).post(add_fault).delete(clear_faults))
        .route("/admin/faults/{id}", delete(remove_fault))
        .with_state(Admin { faults, token })
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
    (given != Some(expected.as_str())).then(|| {
        error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, "Authorization: Bearer <admin token> required")
    })
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
    spec: Result<Json<FaultSpec>, axum::extract::rejection::JsonRejection>,
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
            tracing::warn!(id, hop = %spec.hop, action = ?spec.action, "fault injected");
            (StatusCode::CREATED, Json(json!({"id": id}))).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e.to_string()),
    }
}

async fn remove_fault(State(admin): State<Admin>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Some(refusal) = denied(&admin, &headers) {
        return refusal;
    }
    match admin.faults.remove(Some(id)) {
        0 => error(StatusCode::NOT_FOUND, ErrorCode::BadRequest, "no such fault"),
        _ => StatusCode::NO_CONTENT.into_response(),
    }
}

async fn clear_faults(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    if let Some(refusal) = denied(&admin, &headers) {
        return refusal;
    }
    Json(json!({"removed": admin.faults.remove(None)})).into_response()
}
