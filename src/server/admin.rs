//! The admin endpoint: plain HTTP on its own listener (`--admin-listen`),
//! for Prometheus and for probes: `GET /metrics`, `GET /healthz`,
//! `GET /readyz`. It starts before the database is reached, so an operator
//! can see a relay that is alive but not ready, and it keeps answering
//! through a graceful shutdown (`/healthz` then says 503).
//!
//! One request per connection, a bounded number of connections at once,
//! and a short deadline for the request head: it is a scrape target, not a
//! web server.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::http::{self, Probe, Response};
use crate::health::Health;
use crate::metrics::Metrics;

/// Admin requests served at once; more wait in the kernel's backlog.
const MAX_CONCURRENT: usize = 16;

/// How long one request may take, from accepting it to the last byte of
/// the answer: a scraper that stops reading cannot hold a slot for longer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin endpoint on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    health: Health,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let (mut stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (health, metrics) = (health.clone(), metrics.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
                if let Ok(Some((head, _))) = http::read_head(&mut stream).await {
                    answer(&head, &health, &metrics).write(&mut stream).await;
                }
            })
            .await;
        });
    }
}

/// The response to one request head.
fn answer(head: &[u8], health: &Health, metrics: &Metrics) -> Response {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
        return Response::text(400, "Bad Request", "malformed HTTP request");
    }
    let path = request.path.unwrap_or("").split('?').next().unwrap_or("");
    let known = path == "/metrics" || Probe::from_path(path).is_some();
    if !known {
        return Response::text(
            404,
            "Not Found",
            "not found; try /metrics, /healthz or /readyz",
        );
    }
    if request.method != Some("GET") {
        return Response {
            extra_headers: "Allow: GET\r\n".into(),
            ..Response::text(405, "Method Not Allowed", "use GET")
        };
    }
    match Probe::from_path(path) {
        Some(probe) => probe.answer(health),
        None => Response {
            status: 200,
            reason: "OK",
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            extra_headers: "".into(),
            body: metrics.encode(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let (health, metrics) = (Health::new(), Metrics::new());
        let status = |head: &str| answer(head.as_bytes(), &health, &metrics).status;
        assert_eq!(status("GET /metrics HTTP/1.1\r\n\r\n"), 200);
        assert_eq!(status("GET /healthz HTTP/1.1\r\n\r\n"), 200);
        assert_eq!(
            status("GET /readyz HTTP/1.1\r\n\r\n"),
            503,
            "no database answer yet"
        );
        assert_eq!(status("GET /v1/websocket HTTP/1.1\r\n\r\n"), 404);
        assert_eq!(status("POST /metrics HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status("nonsense\r\n\r\n"), 400);
        let body = answer(b"GET /metrics HTTP/1.1\r\n\r\n", &health, &metrics).body;
        assert!(body.contains("relay_connections "), "{body}");
        assert!(body.contains("relay_build_info{"), "{body}");
    }
}
