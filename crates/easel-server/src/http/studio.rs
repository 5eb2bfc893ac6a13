//! The studio: easel's web UI at `/`. Its files are plain HTML, CSS and JavaScript written by
//! hand (no bundler, no build step) and embedded in the binary, so neither building nor
//! running easel needs Node. It is a client of the public API like any other: models, LoRAs,
//! jobs with their SSE events (progress and step previews), usage and prices; with API keys
//! configured it asks for one and sends it as every client does.

use super::*;

const INDEX: &str = include_str!("../../studio/index.html");
const APP_JS: &str = include_str!("../../studio/app.js");
const APP_CSS: &str = include_str!("../../studio/app.css");

/// Pages that only load their own files (images are same-origin signed URLs or data: previews).
const CSP: &str = "default-src 'self'; img-src 'self' data: blob: https:; style-src 'self'; script-src 'self'; connect-src 'self'";

fn page(mime: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, mime), (header::CONTENT_SECURITY_POLICY, CSP), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

pub(super) async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX)
}

pub(super) async fn asset(path: Result<Path<String>, PathRejection>) -> ApiResult<Response> {
    let Path(file) = path.map_err(|_| ApiError::not_found("no such file"))?;
    match file.as_str() {
        "app.js" => Ok(page("text/javascript; charset=utf-8", APP_JS)),
        "app.css" => Ok(page("text/css; charset=utf-8", APP_CSS)),
        _ => Err(ApiError::not_found("no such file").into()),
    }
}
