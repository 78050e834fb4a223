//! HTTP routes: the WebSocket upgrade, history, health, metrics, message journeys and
//! the browser app.

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use protocol::{names, ErrorCode};
use serde::Deserialize;
use serde_json::json;
use storage::PageQuery;
use uuid::Uuid;

use crate::state::AppState;

/// The gateway's router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ws", get(upgrade))
        .route("/api/rooms/{room}/messages", get(room_messages))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/debug/messages/{id}", get(journey))
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
    ws: WebSocketUpgrade,
) -> Response {
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
        .on_upgrade(move |socket| async move {
            crate::connection::serve(socket, app, query.token).await;
            drop(permit);
            drop(alive);
        })
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

async fn ready(State(app): State<Arc<AppState>>) -> Response {
    if app.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    let (bus, store) = tokio::join!(app.bus.ready(), app.history.ping());
    match (bus, store) {
        (Ok(()), Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        (bus, store) => {
            let mut why = String::new();
            if let Err(e) = bus {
                why.push_str(&format!("bus: {e}\n"));
            }
            if let Err(e) = store {
                why.push_str(&format!("store: {e}\n"));
            }
            (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
        }
    }
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], app.metrics.render()).into_response()
}

async fn journey(State(app): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let Ok(id) = Uuid::parse_str(&id) else {
        return error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, "message id must be a UUID");
    };
    let (journey, remote) = tokio::join!(async { app.journal.get(id) }, app.bus.remote_journeys(id));
    let stored = match app.history.get_by_id(id).await {
        Ok(stored) => stored,
        Err(e) => {
            tracing::warn!(%id, error = %e, "journey: store lookup failed");
            None
        }
    };
    if journey.is_none() && stored.is_none() && remote.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            ErrorCode::BadRequest,
            "no such message in this process's journal or the store",
        );
    }
    let trace_id = stored
        .as_ref()
        .map(|m| m.trace_id.clone())
        .or_else(|| journey.as_ref().map(|j| j.trace_id.clone()))
        .or_else(|| remote.first().map(|j| j.trace_id.clone()));
    // Every process's hops, in time order.
    let mut hops: Vec<_> = journey.into_iter().chain(remote).flat_map(|j| j.hops).collect();
    hops.sort_by_key(|hop| hop.at_us);
    Json(json!({
        "id": id,
        "trace_id": trace_id,
        "room": stored.as_ref().map(|m| m.room.clone()),
        "seq": stored.as_ref().map(|m| m.seq),
        "stored": stored.is_some(),
        "hops": hops,
    }))
    .into_response()
}
