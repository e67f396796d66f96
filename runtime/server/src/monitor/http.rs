//! The monitoring listener (`weir serve --metrics ADDR`): Prometheus `/metrics`, the status
//! page at `/` and its data at `/api/status`. Plain HTTP, or TLS with the server's certificate.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::Monitor;

/// The status page: server-rendered shell, a small script that polls `/api/status`.
const PAGE: &str = include_str!("page.html");

/// The routes, over a monitor.
pub fn router(monitor: Arc<Monitor>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .with_state(monitor)
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn metrics(State(monitor): State<Arc<Monitor>>) -> Response {
    let mut registry = weir_metrics::global().registry();
    monitor.register_gauges(&mut registry);
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        return (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {e}"),
        )
            .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[derive(serde::Serialize)]
struct Status {
    #[serde(flatten)]
    snapshot: super::Snapshot,
    history: Vec<super::LagHistory>,
    sample_ms: u64,
}

async fn status(State(monitor): State<Arc<Monitor>>) -> axum::Json<serde_json::Value> {
    let status = Status {
        snapshot: monitor.snapshot(),
        history: monitor.history(),
        sample_ms: monitor.config().sample_interval.as_millis() as u64,
    };
    axum::Json(serde_json::to_value(status).unwrap_or_default())
}

/// A TLS acceptor for the certificate chain and key PEM files, offering the `alpn` protocols
/// (none for Kafka clients, which offer none).
///
/// # Errors
/// Unreadable or invalid PEM, or a key that does not match.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
    alpn: &[&[u8]],
) -> Result<TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("certificate {}: {e}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("key {}: {e}", key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `router` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    shutdown: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(message = "Metrics accept failed.", error = %e);
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let (router, tls, shutdown) = (router.clone(), tls.clone(), shutdown.clone());
        tokio::spawn(async move {
            let service = hyper_util::service::TowerToHyperService::new(router);
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let result = match tls {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(stream) => {
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        tokio::select! { r = conn => r, _ = shutdown.cancelled() => Ok(()) }
                    }
                    Err(e) => {
                        tracing::debug!(message = "Metrics TLS handshake failed.", %peer, error = %e);
                        return;
                    }
                },
                None => {
                    let conn = builder.serve_connection(TokioIo::new(tcp), service);
                    tokio::select! { r = conn => r, _ = shutdown.cancelled() => Ok(()) }
                }
            };
            if let Err(e) = result {
                tracing::debug!(message = "Metrics connection ended with an error.", %peer, error = %e);
            }
        });
    }
}

/// Binds the metrics address.
///
/// # Errors
/// The OS refused the address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
