//! The operations endpoints every process serves, gateways and fanout workers alike:
//! `/healthz` (the process runs), `/readyz` (its named checks pass), `/metrics` (Prometheus
//! text) and `/debug/messages/{id}` (a message's journey, from a [`JourneySource`]).
//!
//! What they reveal (room names, sessions, backend errors) is for operators: a process with
//! client auth on guards them with its admin token ([`OpsAccess`]); `/healthz` and the status
//! code of `/readyz` stay open for load balancers and orchestrators.

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bus::JourneyBus;
use futures_util::future::{join_all, BoxFuture};
use futures_util::FutureExt;
use protocol::ErrorCode;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use telemetry::journal::Journal;
use telemetry::metrics::Metrics;
use uuid::Uuid;

use crate::history::HistoryReader;
use crate::http::error;

/// Who may read `/metrics`, `/debug/messages/{id}` and the reasons of a failing `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpsAccess {
    /// Anyone (no client auth, or an internal-only listener).
    Open,
    /// Requests with `Authorization: Bearer <token>`.
    Token(String),
    /// Nobody: client auth is on and no admin token is configured.
    Closed,
}

impl OpsAccess {
    /// The access of a process: open without client auth, else guarded by the admin token
    /// (closed without one).
    pub fn for_process(client_auth: bool, admin_token: Option<&str>) -> Self {
        match (client_auth, admin_token) {
            (false, _) => Self::Open,
            (true, Some(token)) => Self::Token(token.to_owned()),
            (true, None) => Self::Closed,
        }
    }

    /// The refusal of a request with these headers, or `None` when it may see the details.
    fn refusal(&self, headers: &HeaderMap) -> Option<Response> {
        let bearer =
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match self {
            Self::Open => None,
            Self::Token(token) if bearer.is_some_and(|given| bool::from(given.as_bytes().ct_eq(token.as_bytes()))) => {
                None
            }
            Self::Token(_) => Some(error(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "client auth is on: Authorization: Bearer <admin token> required",
            )),
            Self::Closed => Some(error(
                StatusCode::NOT_FOUND,
                ErrorCode::Forbidden,
                "client auth is on and no admin token is configured: start with --admin-token to read this",
            )),
        }
    }
}

/// What the ops endpoints answer from.
pub struct OpsState {
    /// Who may read the details.
    pub access: OpsAccess,
    /// Metrics exposed at `/metrics`.
    pub metrics: Metrics,
    /// Checks of `/readyz`, run concurrently: 200 `ready` when all pass, else 503 with one
    /// `name: reason` line per failing check, in this order.
    pub ready: Vec<ReadyCheck>,
    /// Where `/debug/messages/{id}` looks.
    pub journeys: Arc<dyn JourneySource>,
    /// This process's own journal: its name and what `/debug/waits` lists.
    pub journal: Arc<Journal>,
}

type CheckFn = dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync;

/// One named readiness check (`bus`, `store`, ...).
pub struct ReadyCheck {
    name: &'static str,
    check: Box<CheckFn>,
}

impl ReadyCheck {
    /// A check called `name` that passes when the future `check()` returns resolves to `Ok`.
    pub fn new<F, Fut, E>(name: &'static str, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display,
    {
        Self { name, check: Box::new(move || check().map(|result| result.map_err(|e| e.to_string())).boxed()) }
    }

    /// Runs the check once: `Err` says why it fails.
    pub async fn run(&self) -> Result<(), String> {
        (self.check)().await
    }

    /// `bus`: passes while the bus answers.
    pub fn bus(health: Arc<dyn bus::BusHealth>) -> Self {
        Self::new("bus", move || {
            let health = health.clone();
            async move { health.ready().await }
        })
    }

    /// `store`: passes while the history store answers.
    pub fn store(store: Arc<dyn storage::HistoryStore>) -> Self {
        Self::new("store", move || {
            let store = store.clone();
            async move { store.ping().await }
        })
    }
}

/// Where a message's journey is looked up.
#[async_trait]
pub trait JourneySource: Send + Sync + 'static {
    /// The journey of message `id` as the JSON `/debug/messages/{id}` answers, `None` when
    /// nothing is known of it.
    async fn journey(&self, id: Uuid) -> Option<Value>;

    /// Where it looks, for the 404 answer (`this process's journal`).
    fn scope(&self) -> &'static str;
}

/// A process's own journal: its journey as recorded here (a fanout worker's view).
#[async_trait]
impl JourneySource for Journal {
    async fn journey(&self, id: Uuid) -> Option<Value> {
        let journey = self.get(id)?;
        match serde_json::to_value(journey) {
            Ok(value) => Some(value),
            Err(e) => {
                tracing::warn!(message_id = %id, error = %e, "journey: cannot encode");
                None
            }
        }
    }

    fn scope(&self) -> &'static str {
        "this process's journal"
    }
}

/// A gateway's view: its own journal, every other process's over the bus, and the store
/// (room, seq and trace id of a stored message), with the hops of all in time order.
pub struct ClusterJourneys {
    /// This process's journal.
    pub journal: Arc<Journal>,
    /// The bus to ask the other processes.
    pub bus: Arc<dyn JourneyBus>,
    /// The store, for the stored message.
    pub history: HistoryReader,
}

#[async_trait]
impl JourneySource for ClusterJourneys {
    async fn journey(&self, id: Uuid) -> Option<Value> {
        let (journey, remote) = tokio::join!(async { self.journal.get(id) }, self.bus.remote_journeys(id));
        let stored = match self.history.get_by_id(id).await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(message_id = %id, error = %e, "journey: store lookup failed");
                None
            }
        };
        if journey.is_none() && stored.is_none() && remote.is_empty() {
            return None;
        }
        let trace_id = stored
            .as_ref()
            .map(|m| m.trace_id.clone())
            .or_else(|| journey.as_ref().map(|j| j.trace_id.clone()))
            .or_else(|| remote.first().map(|j| j.trace_id.clone()));
        // Every process's hops, in time order.
        let mut hops: Vec<_> = journey.into_iter().chain(remote).flat_map(|j| j.hops).collect();
        hops.sort_by_key(|hop| hop.at_us);
        Some(json!({
            "id": id,
            "trace_id": trace_id,
            "room": stored.as_ref().map(|m| m.room.clone()),
            "seq": stored.as_ref().map(|m| m.seq),
            "stored": stored.is_some(),
            "hops": hops,
        }))
    }

    fn scope(&self) -> &'static str {
        "this process's journal or the store"
    }
}

/// `/healthz`, `/readyz`, `/metrics` and `/debug/messages/{id}` over `ops`, to merge into any
/// router.
pub fn router<S: Clone + Send + Sync + 'static>(ops: OpsState) -> Router<S> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/debug/messages/{id}", get(journey))
        .route("/debug/waits", get(waits))
        .with_state(Arc::new(ops))
}

async fn ready(State(ops): State<Arc<OpsState>>, headers: HeaderMap) -> Response {
    let results = join_all(ops.ready.iter().map(ReadyCheck::run)).await;
    let why: String = ops
        .ready
        .iter()
        .zip(results)
        .filter_map(|(check, result)| result.err().map(|reason| format!("{}: {reason}\n", check.name)))
        .collect();
    if why.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else if ops.access.refusal(&headers).is_some() {
        // The status is for anyone; backend error text only for operators.
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
    }
}

async fn metrics(State(ops): State<Arc<OpsState>>, headers: HeaderMap) -> Response {
    if let Some(refusal) = ops.access.refusal(&headers) {
        return refusal;
    }
    ([(header::CONTENT_TYPE, telemetry::metrics::CONTENT_TYPE)], ops.metrics.render()).into_response()
}

/// `?min_ms=`: only waits at least this old (default 0).
#[derive(serde::Deserialize)]
struct WaitsQuery {
    #[serde(default)]
    min_ms: u64,
}

/// `/debug/waits`: this process's operations in progress, what each holds and waits for.
async fn waits(
    State(ops): State<Arc<OpsState>>,
    axum::extract::Query(query): axum::extract::Query<WaitsQuery>,
    headers: HeaderMap,
) -> Response {
    if let Some(refusal) = ops.access.refusal(&headers) {
        return refusal;
    }
    let waits = ops.journal.waits().snapshot(query.min_ms);
    Json(serde_json::json!({"process": ops.journal.process(), "waits": waits})).into_response()
}

async fn journey(State(ops): State<Arc<OpsState>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Some(refusal) = ops.access.refusal(&headers) {
        return refusal;
    }
    let Ok(id) = Uuid::parse_str(&id) else {
        return error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, "message id must be a UUID");
    };
    match ops.journeys.journey(id).await {
        Some(journey) => Json(journey).into_response(),
        None => {
            error(StatusCode::NOT_FOUND, ErrorCode::BadRequest, format!("no such message in {}", ops.journeys.scope()))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    async fn body(response: Response) -> (StatusCode, String) {
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    fn ops(ready: Vec<ReadyCheck>) -> (Arc<OpsState>, Arc<Journal>) {
        let journal = Arc::new(Journal::new("test", 16));
        let ops = OpsState {
            access: OpsAccess::Open,
            metrics: Metrics::new(),
            ready,
            journeys: journal.clone(),
            journal: journal.clone(),
        };
        (Arc::new(ops), journal)
    }

    #[tokio::test]
    async fn ready_lists_every_failing_check_in_order() {
        let (all_pass, _) = ops(vec![
            ReadyCheck::new("bus", || async { Ok::<(), String>(()) }),
            ReadyCheck::new("store", || async { Ok::<(), String>(()) }),
        ]);
        assert_eq!(body(ready(State(all_pass), HeaderMap::new()).await).await, (StatusCode::OK, "ready\n".to_owned()));
        let (failing, _) = ops(vec![
            ReadyCheck::new("gateway", || async { Err("draining") }),
            ReadyCheck::new("bus", || async { Ok::<(), &str>(()) }),
            ReadyCheck::new("store", || async { Err("no node answers") }),
        ]);
        assert_eq!(
            body(ready(State(failing), HeaderMap::new()).await).await,
            (StatusCode::SERVICE_UNAVAILABLE, "gateway: draining\nstore: no node answers\n".to_owned())
        );
    }

    #[tokio::test]
    async fn journeys_answer_200_400_or_404() {
        let (ops, journal) = ops(Vec::new());
        let id = Uuid::now_v7();
        journal.record(id, "trace-1", "fanout.sequence", json!({}));
        let (status, text) = body(journey(State(ops.clone()), Path(id.to_string()), HeaderMap::new()).await).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        assert!(text.contains("fanout.sequence") && text.contains("trace-1"), "{text}");
        let (status, text) = body(journey(State(ops.clone()), Path("not-a-uuid".into()), HeaderMap::new()).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        let (status, text) = body(journey(State(ops), Path(Uuid::now_v7().to_string()), HeaderMap::new()).await).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{text}");
        assert!(text.contains("no such message in this process's journal"), "{text}");
    }

    fn with_bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        headers
    }

    #[tokio::test]
    async fn with_client_auth_on_details_need_the_admin_token() {
        let journal = Arc::new(Journal::new("test", 16));
        let id = Uuid::now_v7();
        journal.record(id, "trace-1", "fanout.sequence", json!({}));
        let failing = vec![ReadyCheck::new("store", || async { Err("node 10.0.0.7 refused") })];
        let access = OpsAccess::for_process(true, Some("admin-secret"));
        let ops =
            Arc::new(OpsState { access, metrics: Metrics::new(), ready: failing, journeys: journal.clone(), journal });

        let (status, text) = body(metrics(State(ops.clone()), HeaderMap::new()).await).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
        let (status, _) = body(metrics(State(ops.clone()), with_bearer("wrong")).await).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = body(metrics(State(ops.clone()), with_bearer("admin-secret")).await).await;
        assert_eq!(status, StatusCode::OK);

        let (status, _) = body(journey(State(ops.clone()), Path(id.to_string()), HeaderMap::new()).await).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) =
            body(journey(State(ops.clone()), Path(id.to_string()), with_bearer("admin-secret")).await).await;
        assert_eq!(status, StatusCode::OK);

        // Anyone learns that it is not ready; only an operator learns why.
        let (status, text) = body(ready(State(ops.clone()), HeaderMap::new()).await).await;
        assert_eq!((status, text.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"));
        let (_, text) = body(ready(State(ops), with_bearer("admin-secret")).await).await;
        assert!(text.contains("10.0.0.7"), "{text}");
    }

    #[test]
    fn access_is_open_without_client_auth_and_closed_without_an_admin_token() {
        assert_eq!(OpsAccess::for_process(false, Some("t")), OpsAccess::Open);
        assert_eq!(OpsAccess::for_process(true, None), OpsAccess::Closed);
        assert!(OpsAccess::Closed.refusal(&with_bearer("")).is_some());
    }
}
