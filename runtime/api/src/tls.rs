//! TLS for the client: the system's roots plus the certificates given with `--tls-ca`, and one
//! more rule than webpki's: a certificate given with `--tls-ca` is also accepted as the server's
//! own certificate (pinned), as curl and OpenSSL accept it. That is what a self-signed
//! certificate from `openssl req -x509` needs: it carries `CA:TRUE`, which webpki refuses as an
//! end entity (`CaUsedAsEndEntity`). The server name must still match the certificate.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// A TLS client configuration for weir servers: native roots, `--tls-ca` certificates as
/// roots and as pinned server certificates, ALPN h2.
///
/// # Errors
/// A PEM that holds no certificate, or a certificate rustls cannot use.
pub fn client_config(ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    let mut pinned = Vec::new();
    if let Some(pem) = ca_pem {
        let certs: Vec<CertificateDer<'static>> =
            rustls_pki_types::pem::PemObject::pem_slice_iter(pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("--tls-ca is not a PEM certificate file: {e}"))?;
        if certs.is_empty() {
            return Err(
                "--tls-ca holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)".into(),
            );
        }
        for cert in certs {
            // A certificate that cannot be a root (not a CA) can still be pinned.
            let _ = roots.add(cert.clone());
            pinned.push(cert);
        }
    }
    let webpki = if roots.is_empty() {
        None
    } else {
        Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| format!("TLS roots: {e}"))?,
        )
    };
    let verifier = Arc::new(Verifier {
        webpki,
        pinned,
        provider: provider.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[derive(Debug)]
struct Verifier {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    pinned: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = match &self.webpki {
            Some(w) => {
                w.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
        };
        match verdict {
            Ok(ok) => Ok(ok),
            Err(e)
                if self
                    .pinned
                    .iter()
                    .any(|p| p.as_ref() == end_entity.as_ref()) =>
            {
                // The very certificate the user trusts: accept it whatever its CA flag, if it
                // names this server.
                let parsed =
                    rustls::server::ParsedCertificate::try_from(end_entity).map_err(|_| e)?;
                rustls::client::verify_server_name(&parsed, server_name)?;
                Ok(ServerCertVerified::assertion())
            }
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Connects TCP, then TLS with a [`client_config`], for tonic's `connect_with_connector`.
#[derive(Clone)]
pub(crate) struct Connector {
    config: Arc<rustls::ClientConfig>,
    host: String,
    port: u16,
}

impl Connector {
    pub(crate) fn new(config: rustls::ClientConfig, host: String, port: u16) -> Self {
        Connector {
            config: Arc::new(config),
            host,
            port,
        }
    }
}

type Io = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for Connector {
    type Response = Io;
    type Error = BoxError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Io, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let (config, host, port) = (self.config.clone(), self.host.clone(), self.port);
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// A TLS failure in words, with what to do about an untrusted certificate.
pub(crate) fn explain(reason: String, ca_given: bool) -> String {
    let untrusted = [
        "UnknownIssuer",
        "CaUsedAsEndEntity",
        "invalid peer certificate",
    ]
    .iter()
    .any(|s| reason.contains(s));
    match (untrusted, ca_given) {
        (true, false) => format!(
            "{reason}: the server's certificate is not signed by a CA this machine trusts; pass \
             --tls-ca FILE (or set WEIR_TLS_CA) with the server's certificate or its CA's"
        ),
        (true, true) => format!(
            "{reason}: the server's certificate is neither the --tls-ca certificate nor signed \
             by it (or it does not name this host)"
        ),
        _ => reason,
    }
}
