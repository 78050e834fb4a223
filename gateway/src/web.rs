//! The browser app (web/static), compiled into the binary; debug builds read it from disk so
//! edits show without a rebuild. Every answer carries the browser security headers below.

use axum::http::{header, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

#[derive(rust_embed::Embed)]
#[folder = "../web/static/"]
struct Assets;

/// The app's Content-Security-Policy: the page loads one stylesheet and one module script
/// (with its import) from this origin, has no inline script or style (styles set from script
/// go through the CSSOM, which CSP allows), and talks only to its own gateway: `fetch` to
/// `/api` and the WebSocket at `/ws` (CSP Level 3 `'self'` covers `ws:`/`wss:` to the same host
/// and port). `img-src 'self'` is only for the browser's own favicon request. Nothing may frame
/// it, set its base URL or be the target of its forms.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Headers on every answer of the web app.
const SECURITY_HEADERS: [(HeaderName, HeaderValue); 3] = [
    (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY)),
    (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
    (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
];

/// Serves `/` as index.html and any other path as the matching file, or 404.
pub async fn serve(uri: Uri) -> Response {
    let path = uri.path().trim_start_matches('/');
    let path = if path.is_empty() { "index.html" } else { path };
    match Assets::get(path) {
        Some(file) => {
            let mime = file.metadata.mimetype();
            (
                SECURITY_HEADERS,
                [(header::CONTENT_TYPE, mime.to_owned()), (header::CACHE_CONTROL, "no-cache".to_owned())],
                file.data,
            )
                .into_response()
        }
        None => (StatusCode::NOT_FOUND, SECURITY_HEADERS, "not found\n").into_response(),
    }
}
