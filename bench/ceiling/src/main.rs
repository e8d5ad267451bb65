//! `ceiling`: the HTTP/TLS stack Coffer uses (tokio + hyper-util auto (HTTP/1.1 and HTTP/2) +
//! tokio-rustls 0.26 with the ring provider + rustls 0.23, TLS 1.3/1.2, ALPN h2 and http/1.1,
//! a per-connection handshake timeout) answering every request with one fixed JSON body the size
//! of a Coffer secret GET response. No authentication, storage or crypto beyond TLS: what it
//! serves is what the stack allows on this machine.
//!
//! The certificate is self-signed (rcgen, ECDSA P-256 like Coffer's dev certificates) for
//! `localhost`, `ceiling.localhost` and 127.0.0.1; `--cert-out` writes it for clients to trust.
//! Prints a line containing `ready` once it accepts connections.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Shaped like a Key Vault secret bundle as Coffer returns it (same field names, similar sizes).
const BODY: &str = concat!(
    r#"{"value":"ceiling-value-0123456789abcdefghijklmnopqrstuvwxyz","#,
    r#""id":"https://bench.localhost:8443/secrets/bench-123/0123456789abcdef0123456789abcdef","#,
    r#""attributes":{"enabled":true,"created":1764345600,"updated":1764345600,"#,
    r#""recoveryLevel":"Recoverable+Purgeable","recoverableDays":7},"tags":{}}"#
);

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(name = "ceiling", about = "Fixed-body HTTPS server on Coffer's stack (loopback only)")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:18444")]
    listen: SocketAddr,
    /// Write the self-signed certificate (PEM) here.
    #[arg(long)]
    cert_out: Option<PathBuf>,
    /// Tokio worker threads (default: one per core, like Coffer).
    #[arg(long)]
    threads: Option<usize>,
    /// Body size override in bytes (default: the built-in secret-bundle-shaped body).
    #[arg(long)]
    body_bytes: Option<usize>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if !args.listen.ip().is_loopback() {
        return Err("ceiling listens on loopback only".into());
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        rt.worker_threads(n);
    }
    rt.enable_all().build()?.block_on(serve(args))
}

async fn serve(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "ceiling.localhost".to_string()])?;
    params.subject_alt_names.push(rcgen::SanType::IpAddress("127.0.0.1".parse()?));
    params.is_ca = rcgen::IsCa::NoCa;
    let cert = params.self_signed(&key)?;
    if let Some(p) = &args.cert_out {
        std::fs::write(p, cert.pem())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let body = match args.body_bytes {
        Some(n) => Bytes::from(format!("{{\"value\":\"{}\"}}", "x".repeat(n.saturating_sub(12)))),
        None => Bytes::from_static(BODY.as_bytes()),
    };
    let listener = TcpListener::bind(args.listen).await?;
    println!("ceiling ready: listening on https://{} ({} byte body)", listener.local_addr()?, body.len());
    loop {
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(p) => p,
                Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; }
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let body = body.clone();
        tokio::spawn(async move {
            let Ok(Ok(tls_stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
            else {
                return;
            };
            let service = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                let body = body.clone();
                async move {
                    let mut resp = Response::new(Full::new(body));
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json; charset=utf-8"),
                    );
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls_stream), service)
                .await;
        });
    }
}
