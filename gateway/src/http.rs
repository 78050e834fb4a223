//! HTTP routes: the WebSocket upgrade, history, the ops endpoints (health, readiness, metrics,
//! message journeys; [`crate::ops`]) and the browser app.

use std::future::Future;
use std::sync::Arc;

use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::FutureExt;
use protocol::{names, ErrorCode};
use serde::Deserialize;
use serde_json::json;
use storage::PageQuery;

use crate::ops::{ClusterJourneys, OpsAccess, OpsState, ReadyCheck};
use crate::state::AppState;

/// The gateway's router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ws", get(upgrade))
        .route("/api/rooms/{room}/messages", get(room_messages))
        .route("/admin/record", get(recording_status).post(switch_recording))
        .merge(crate::ops::router(ops(&state)))
        .fallback(crate::web::serve)
        .with_state(state)
}

pub(crate) fn error(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": {"code": code, "message": message.into()}}))).into_response()
}

#[derive(Deserialize)]
struct UpgradeQuery {
    token: Option<String>,
}

async fn upgrade(
    State(app): State<Arc<AppState>>,
    Query(query): Query<UpgradeQuery>,
    socket_guard: Option<axum::Extension<crate::listener::SocketGuard>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let allowed = &app.config.allowed_origins;
    let origin = headers.get(header::ORIGIN).map(|origin| origin.to_str().unwrap_or(""));
    if let Some(origin) = origin.filter(|origin| !allowed.is_empty() && !allowed.iter().any(|a| a == origin)) {
        // Another site's page must not open a socket in its visitor's name (cross-site
        // WebSocket hijacking); clients that are not browsers send no Origin.
        app.metrics.disconnects.with_label_values(&["origin_refused"]).inc();
        return error(StatusCode::FORBIDDEN, ErrorCode::Forbidden, format!("origin {origin:?} is not allowed"));
    }
    if app.is_draining() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "gateway is draining; connect to another",
        );
    }
    let Ok(permit) = app.connection_permits.clone().try_acquire_owned() else {
        app.metrics.disconnects.with_label_values(&["connection_limit"]).inc();
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "connection limit reached; try another gateway",
        );
    };
    let limits = &app.config.limits;
    let alive = app.alive.clone();
    ws.read_buffer_size(limits.ws_read_buffer_bytes)
        .write_buffer_size(limits.ws_write_buffer_bytes)
        // Frames up to 4x the limit are read and answered with `too_large`; beyond that the
        // connection is closed with 1009 without buffering more.
        .max_message_size(limits.max_frame_bytes.saturating_mul(4))
        .max_frame_size(limits.max_frame_bytes.saturating_mul(4))
        .on_upgrade(move |socket| connection_task(socket, app, query.token, (permit, socket_guard, alive)))
}

/// One connection's task: serve the socket, then drop `places`, what the connection holds while it
/// lives (its places under the connection limit and the accept caps, and the handle that
/// shutdown waits on).
///
/// `map`, not an async block: an async block would keep the socket, and the connection's future
/// twice (once captured, once awaited), in each of 100,000 connection tasks.
fn connection_task<Places: Send>(
    socket: WebSocket,
    app: Arc<AppState>,
    token: Option<String>,
    places: Places,
) -> impl Future<Output = ()> + Send {
    crate::connection::serve(socket, app, token).map(move |()| drop(places))
}

#[derive(Deserialize)]
struct PageParams {
    before: Option<u64>,
    after: Option<u64>,
    limit: Option<u32>,
    token: Option<String>,
}

async fn room_messages(
    State(app): State<Arc<AppState>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    params: Result<Query<PageParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(params)) = params else {
        return error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "before, after and limit must be non-negative integers",
        );
    };
    if !names::is_valid_room(&room) {
        return error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "room must be 1-64 characters from A-Z a-z 0-9 _ -",
        );
    }
    if let Some(verifier) = &app.verifier {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        match verifier.verify(bearer.as_deref().or(params.token.as_deref())) {
            Ok(identity) if identity.may_join(&room) => {}
            Ok(_) => {
                return error(
                    StatusCode::FORBIDDEN,
                    ErrorCode::Forbidden,
                    format!("your token does not allow room {room}"),
                )
            }
            Err(e) => return error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, e.to_string()),
        }
    }
    let query =
        PageQuery { before: params.before, after: params.after, limit: params.limit.unwrap_or(storage::DEFAULT_PAGE) };
    match app.history.page(&room, query).await {
        Ok(page) => Json(json!({"room": room, "messages": page.messages, "has_more": page.has_more})).into_response(),
        Err(e) => {
            tracing::warn!(room, error = %e, "history read failed");
            error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, "history is unavailable right now")
        }
    }
}

/// The gateway's ops endpoints: ready while not draining, on the bus and with the store
/// answering; journeys gathered from every process and the store.
fn ops(app: &AppState) -> OpsState {
    let draining = app.shutdown_signal();
    let history = app.history.clone();
    OpsState {
        access: OpsAccess::for_process(app.config.jwt_secret.is_some(), app.config.admin_token.as_deref()),
        metrics: app.metrics.clone(),
        ready: vec![
            ReadyCheck::new("gateway", move || {
                std::future::ready(if *draining.borrow() { Err("draining") } else { Ok(()) })
            }),
            ReadyCheck::bus(app.bus.health.clone()),
            ReadyCheck::store(app.history.store()),
        ],
        journeys: Arc::new(ClusterJourneys { journal: app.journal.clone(), bus: app.bus.journeys.clone(), history }),
        journal: app.journal.clone(),
    }
}

/// `POST /admin/record` body: `{"enabled": true|false}`.
#[derive(Deserialize)]
struct RecordSwitch {
    enabled: bool,
}

/// The refusal of an admin request without the admin token (404 when no token is set: the
/// admin API is off), or `None` when it may proceed.
fn admin_refusal(app: &AppState, headers: &HeaderMap) -> Option<Response> {
    let Some(expected) = app.config.admin_token.as_deref() else {
        return Some(error(
            StatusCode::NOT_FOUND,
            ErrorCode::Forbidden,
            "the admin API is off; start with --admin-token",
        ));
    };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let matches =
        given.is_some_and(|given| bool::from(subtle::ConstantTimeEq::ct_eq(given.as_bytes(), expected.as_bytes())));
    (!matches).then(|| {
        error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, "Authorization: Bearer <admin token> required")
    })
}

/// `GET /admin/record`: whether this gateway records its clients' traffic, where, and how much.
async fn recording_status(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(refusal) = admin_refusal(&app, &headers) {
        return refusal;
    }
    match &app.recorder {
        Some(recorder) => Json(recorder.status()).into_response(),
        None => error(StatusCode::CONFLICT, ErrorCode::BadRequest, "recording is not set up; start with --record DIR"),
    }
}

/// `POST /admin/record` `{"enabled": bool}`: switches recording on or off at run time.
async fn switch_recording(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    switch: Result<Json<RecordSwitch>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Some(refusal) = admin_refusal(&app, &headers) {
        return refusal;
    }
    let Some(recorder) = &app.recorder else {
        return error(StatusCode::CONFLICT, ErrorCode::BadRequest, "recording is not set up; start with --record DIR");
    };
    match switch {
        Ok(Json(switch)) => {
            recorder.set_enabled(switch.enabled);
            Json(recorder.status()).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e.body_text()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Places = (
        tokio::sync::OwnedSemaphorePermit,
        Option<axum::Extension<crate::listener::SocketGuard>>,
        tokio::sync::mpsc::Sender<()>,
    );

    /// A connection's task holds the connection's future once, and the socket not at all: an
    /// async block around `serve` held both twice (1,888 bytes against `serve`'s 1,448).
    #[test]
    fn a_connections_task_is_its_connection_and_its_places() {
        fn task_size<F: Future>(_: fn(WebSocket, Arc<AppState>, Option<String>, Places) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        fn serve_size<F: Future>(_: fn(WebSocket, Arc<AppState>, Option<String>) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let task = task_size(connection_task::<Places>);
        let serve = serve_size(crate::connection::serve);
        let places = std::mem::size_of::<Places>();
        assert!(task <= serve + places, "the task is {task} bytes: serve's future {serve} and its places {places}");
    }
}
