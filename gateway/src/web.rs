//! The browser app (web/static), compiled into the binary; debug builds read it from disk so
//! edits show without a rebuild.

use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

#[derive(rust_embed::Embed)]
#[folder = "../web/static/"]
struct Assets;

/// Serves `/` as index.html and any other path as the matching file, or 404.
pub async fn serve(uri: Uri) -> Response {
    let path = uri.path().trim_start_matches('/');
    let path = if path.is_empty() { "index.html" } else { path };
    match Assets::get(path) {
        Some(file) => {
            let mime = file.metadata.mimetype();
            ([(header::CONTENT_TYPE, mime.to_owned()), (header::CACHE_CONTROL, "no-cache".to_owned())], file.data)
                .into_response()
        }
        None => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}
