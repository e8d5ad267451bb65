//! Where the server connects on a user's behalf, against the real binary: a federation JWKS URL
//! that redirects is not followed, and internal addresses need the outbound allow-list, both
//! when the URL is registered and when the keys are fetched. (Webhooks: `events.rs`.)

mod common;

use std::sync::{Arc, Mutex};

use base64::Engine;
use common::{free_port, TestServer};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

const ISSUER: &str = "https://issuer.example";
const AUDIENCE: &str = "api://AzureADTokenExchange";
const LOOPBACK_ALLOWED: &[&str] = &["--outbound-allow", "127.0.0.1"];

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// An HTTPS issuer on 127.0.0.1: `/jwks` redirects to `/real`, which serves the JWKS.
struct Issuer {
    port: u16,
    ca_pem: String,
    key: EncodingKey,
    paths: Arc<Mutex<Vec<String>>>,
}

impl Issuer {
    async fn start() -> Issuer {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "outbound test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let tls_key = rcgen::KeyPair::generate().unwrap();
        let tls_cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&tls_key, &ca, &ca_key)
            .unwrap();
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![tls_cert.der().clone()],
                    rustls_pki_types::PrivateKeyDer::Pkcs8(tls_key.serialize_der().into()),
                )
                .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let signing = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let point = signing.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "k1",
                                    "x": b64(&point[1..33]), "y": b64(&point[33..])}]})
        .to_string();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let paths: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = paths.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, seen, jwks) = (acceptor.clone(), seen.clone(), jwks.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head);
                    let path = text.split_whitespace().nth(1).unwrap_or_default().to_owned();
                    seen.lock().unwrap().push(path.clone());
                    let response = if path == "/jwks" {
                        format!(
                            "HTTP/1.1 302 Found\r\nLocation: https://127.0.0.1:{port}/real\r\n\
                             Content-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                    } else {
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                             Connection: close\r\n\r\n{jwks}",
                            jwks.len()
                        )
                    };
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Issuer { port, ca_pem: ca.pem(), key: EncodingKey::from_ec_der(&signing.serialize_der()), paths }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    fn token(&self, subject: &str) -> String {
        let t = now();
        let claims =
            json!({"iss": ISSUER, "sub": subject, "aud": AUDIENCE, "iat": t, "nbf": t, "exp": t + 600});
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }

    fn fetched(&self, path: &str) -> usize {
        self.paths.lock().unwrap().iter().filter(|p| *p == path).count()
    }
}

struct Client {
    http: reqwest::Client,
    port: u16,
    admin_token: String,
}

impl Client {
    fn new(server: &TestServer) -> Client {
        let http = server.https(&[]);
        Client { http, port: server.port, admin_token: server.env("COFFER_TOKEN") }
    }

    async fn admin(&self, path: &str, body: Value) -> (u16, Value) {
        let url = format!("https://localhost:{}/admin/{path}", self.port);
        let r = self.http.post(url).bearer_auth(&self.admin_token).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// A service principal trusting ISSUER's `subject` tokens, keys at `jwks_url`.
    async fn federated_app(&self, name: &str, subject: &str, jwks_url: &str) -> (u16, Value, String) {
        let (status, sp) = self.admin("principals", json!({"name": name, "type": "service-principal"})).await;
        assert_eq!(status, 201, "{sp}");
        let (status, body) = self
            .admin(
                "federated-credentials",
                json!({"principal": name, "issuer": ISSUER, "subject": subject, "audience": AUDIENCE,
                       "jwksUrl": jwks_url}),
            )
            .await;
        (status, body, sp["clientId"].as_str().unwrap().to_owned())
    }

    async fn sign_in(&self, client_id: &str, assertion: &str) -> (u16, Value) {
        let scope = format!("https://localhost:{}/.default", self.port);
        let r = self
            .http
            .post(format!("https://login.localhost:{}/adfs/oauth2/v2.0/token", self.port))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
                ("client_assertion", assertion),
                ("scope", &scope),
            ])
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_fetches_follow_no_redirect_and_reach_internal_addresses_only_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let issuer = Issuer::start().await;
    let ca_file = dir.path().join("issuer-ca.pem");
    std::fs::write(&ca_file, &issuer.ca_pem).unwrap();
    let env = [("SSL_CERT_FILE", ca_file.to_str().unwrap())];

    let server = TestServer::try_start_with_env(&data, port, LOOPBACK_ALLOWED, &env).unwrap();
    let c = Client::new(&server);
    // Keys served directly: the fetch path works.
    let (status, body, direct) = c.federated_app("direct", "wl:direct", &issuer.url("/real")).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = c.sign_in(&direct, &issuer.token("wl:direct")).await;
    assert_eq!(status, 200, "{body}");
    // Keys behind a redirect: not followed (it could lead anywhere, checked or not).
    let (status, body, redirected) =
        c.federated_app("redirected", "wl:redirected", &issuer.url("/jwks")).await;
    assert_eq!(status, 201, "{body}");
    let fetched_before = issuer.fetched("/real");
    let (status, body) = c.sign_in(&redirected, &issuer.token("wl:redirected")).await;
    assert_eq!(status, 401, "the JWKS redirect was followed: {body}");
    assert!(body["error_description"].as_str().unwrap().contains("redirects"), "{body}");
    assert_eq!(issuer.fetched("/jwks"), 1);
    assert_eq!(issuer.fetched("/real"), fetched_before, "the redirect target was fetched");
    drop(server);

    // Without the allow-list, a loopback JWKS URL is refused when registered, and a registered
    // one is not fetched (the keys are not cached across a restart).
    let server = TestServer::try_start_with_env(&data, port, &[], &env).unwrap();
    let c = Client::new(&server);
    let (status, body, _) = c.federated_app("late", "wl:late", &issuer.url("/real")).await;
    assert_eq!(status, 400, "a loopback JWKS URL was accepted: {body}");
    assert!(body.to_string().contains("outbound_allow"), "{body}");
    let fetched_before = issuer.fetched("/real");
    let (status, body) = c.sign_in(&direct, &issuer.token("wl:direct")).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error_description"].as_str().unwrap().contains("outbound_allow"), "{body}");
    assert_eq!(issuer.fetched("/real"), fetched_before, "the issuer was reached");
}
