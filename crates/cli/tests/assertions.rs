//! Client assertions and Coffer's own token signatures under attack, against the real binary:
//! replayed, long-lived, not-yet-valid and foreign-audience certificate assertions, federated
//! credentials sharing an issuer, and a re-encoded (high-S) ECDSA access token.

mod common;

use base64::Engine;
use common::{free_port, TestServer};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

struct Harness {
    server: TestServer,
    http: reqwest::Client,
    admin_token: String,
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

impl Harness {
    fn start(dir: &std::path::Path) -> Harness {
        let server = TestServer::start(&dir.join("data"), free_port(), &[]);
        let http = server.https(&[]);
        let admin_token = server.env("COFFER_TOKEN");
        Harness { server, http, admin_token }
    }

    fn login(&self) -> String {
        format!("https://login.localhost:{}", self.server.port)
    }

    async fn admin(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.server.admin_request(&self.http, token, method, path, body).await
    }

    /// Posts a client-assertion token request to `path` on the token service, with an optional
    /// forged `Host` header. Returns the status and the OAuth body.
    async fn assert_with(
        &self,
        path: &str,
        host: Option<&str>,
        client_id: &str,
        assertion: &str,
    ) -> (u16, Value) {
        let scope = format!("https://localhost:{}/.default", self.server.port);
        let mut req = self.http.post(format!("{}{path}", self.login())).form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", assertion),
            ("scope", &scope),
        ]);
        if let Some(h) = host {
            req = req.header(reqwest::header::HOST, h);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    async fn assert(&self, client_id: &str, assertion: &str) -> (u16, Value) {
        self.assert_with("/adfs/oauth2/v2.0/token", None, client_id, assertion).await
    }
}

/// A self-signed P-256 certificate and its key, as a client registers and signs with.
fn certificate() -> (String, EncodingKey) {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["client.test".to_owned()]).unwrap().self_signed(&pair).unwrap();
    (cert.pem(), EncodingKey::from_ec_der(&pair.serialize_der()))
}

fn sign(key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn description(body: &Value) -> &str {
    body["error_description"].as_str().unwrap_or_default()
}

/// A service principal with a registered certificate, and a signer of its assertions.
struct CertApp {
    client_id: String,
    key: EncodingKey,
    endpoint: String,
}

impl CertApp {
    async fn register(h: &Harness) -> CertApp {
        let (pem, key) = certificate();
        let (status, sp) = h
            .admin(
                &h.admin_token,
                reqwest::Method::POST,
                "principals",
                Some(json!({"name": "cert-app", "type": "service-principal", "certificate": pem})),
            )
            .await;
        assert_eq!(status, 201, "{sp}");
        let client_id = sp["clientId"].as_str().unwrap().to_owned();
        CertApp { client_id, key, endpoint: format!("{}/adfs/oauth2/v2.0/token", h.login()) }
    }

    /// An assertion as MSAL signs it (10 minutes, fresh jti), edited by `edit`.
    fn assertion(&self, edit: impl FnOnce(&mut Value)) -> String {
        let t = now();
        let mut c = json!({
            "iss": self.client_id, "sub": self.client_id, "aud": self.endpoint,
            "iat": t, "nbf": t, "exp": t + 600, "jti": uuid_like(),
        });
        edit(&mut c);
        sign(&self.key, None, &c)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_certificate_assertion_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path());
    let app = CertApp::register(&h).await;
    let assertion = app.assertion(|_| {});
    let (status, body) = h.assert(&app.client_id, &assertion).await;
    assert_eq!(status, 200, "{body}");
    // The same assertion again (captured from a log or a proxy): refused.
    let (status, body) = h.assert(&app.client_id, &assertion).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_client")), "replay accepted: {body}");
    assert!(description(&body).contains("used before"), "{body}");
    // No jti: it could not be kept from being replayed.
    let (status, body) = h
        .assert(
            &app.client_id,
            &app.assertion(|c| {
                c.as_object_mut().unwrap().remove("jti");
            }),
        )
        .await;
    assert_eq!(status, 401, "an assertion without jti was accepted: {body}");
    // The AD FS form of the endpoint (what MSAL names with the adfs authority) works, once.
    let adfs = app.assertion(|c| c["aud"] = json!(format!("{}/adfs/oauth2/token", h.login())));
    let (status, body) = h.assert_with("/adfs/oauth2/token", None, &app.client_id, &adfs).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(h.assert_with("/adfs/oauth2/token", None, &app.client_id, &adfs).await.0, 401);
    // As MSAL Python signs it: fractional exp and iat (time.time()), no nbf.
    let python = app.assertion(|c| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        c["iat"] = json!(t);
        c["exp"] = json!(t + 600.0);
        c.as_object_mut().unwrap().remove("nbf");
    });
    let (status, body) = h.assert(&app.client_id, &python).await;
    assert_eq!(status, 200, "{body}");
    // A fresh assertion is still fine.
    let (status, body) = h.assert(&app.client_id, &app.assertion(|_| {})).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_certificate_assertion_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path());
    let app = CertApp::register(&h).await;
    // Valid for a year: as good as a stored secret.
    let (status, body) =
        h.assert(&app.client_id, &app.assertion(|c| c["exp"] = json!(now() + 365 * 86_400))).await;
    assert_eq!(status, 401, "a year-long assertion was accepted: {body}");
    assert!(description(&body).contains("expires more than 600 seconds"), "{body}");
    // Long-lived counted from its iat, too.
    let (status, body) = h
        .assert(
            &app.client_id,
            &app.assertion(|c| {
                c["iat"] = json!(now() - 3000);
                c["nbf"] = json!(now() - 3000);
            }),
        )
        .await;
    assert_eq!(status, 401, "an assertion valid for 3600 s was accepted: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_yet_valid_certificate_assertion_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path());
    let app = CertApp::register(&h).await;
    // Not valid before five minutes from now.
    let (status, body) = h.assert(&app.client_id, &app.assertion(|c| c["nbf"] = json!(now() + 300))).await;
    assert_eq!(status, 401, "an assertion not valid yet was accepted: {body}");
    assert!(description(&body).contains("ImmatureSignature"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_assertion_for_another_endpoint_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path());
    let app = CertApp::register(&h).await;
    // An assertion meant for another server (login.localhost:1), sent with that Host header: its
    // audience is not this server's token endpoint, whatever the request says.
    let foreign = app.assertion(|c| c["aud"] = json!("https://login.localhost:1/adfs/oauth2/v2.0/token"));
    let (status, body) =
        h.assert_with("/adfs/oauth2/v2.0/token", Some("login.localhost:1"), &app.client_id, &foreign).await;
    assert_eq!(status, 401, "the audience was taken from the Host header: {body}");
    assert!(description(&body).contains("audience"), "{body}");
    // Nor does the OpenID configuration (whose token_endpoint MSAL signs for) echo the Host.
    let r = h
        .http
        .get(format!("{}/adfs/.well-known/openid-configuration", h.login()))
        .header(reqwest::header::HOST, "login.localhost:1")
        .send()
        .await
        .unwrap();
    let oidc: Value = r.json().await.unwrap();
    assert_eq!(oidc["token_endpoint"], json!(format!("{}/adfs/oauth2/token", h.login())), "{oidc}");
    // Another tenant's path (and an assertion naming it) is not this server's endpoint.
    let other_tenant = app.assertion(|c| c["aud"] = json!(format!("{}/evil/oauth2/v2.0/token", h.login())));
    let (status, body) = h.assert_with("/evil/oauth2/v2.0/token", None, &app.client_id, &other_tenant).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_tenant")), "{body}");
}

/// Unique enough for a test's `jti`s without another dependency.
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{:x}-{}-{}", now(), std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

const FEDERATED_ISSUER: &str = "https://issuer.example";
const FEDERATED_AUDIENCE: &str = "api://AzureADTokenExchange";

/// A service principal trusting two subjects of one outside issuer (two pipelines of one
/// repository, each its own federated credential), and that issuer's signing key.
struct FedApp {
    client_id: String,
    key: EncodingKey,
}

impl FedApp {
    async fn register(h: &Harness) -> FedApp {
        let (status, sp) = h
            .admin(
                &h.admin_token,
                reqwest::Method::POST,
                "principals",
                Some(json!({"name": "ci-app", "type": "service-principal"})),
            )
            .await;
        assert_eq!(status, 201, "{sp}");
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let point = pair.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "k1",
                                    "x": b64(&point[1..33]), "y": b64(&point[33..])}]});
        for subject in ["repo:main", "repo:release"] {
            let (status, body) = h
                .admin(
                    &h.admin_token,
                    reqwest::Method::POST,
                    "federated-credentials",
                    Some(json!({"principal": "ci-app", "issuer": FEDERATED_ISSUER, "subject": subject,
                                "audience": FEDERATED_AUDIENCE, "jwks": jwks})),
                )
                .await;
            assert_eq!(status, 201, "{body}");
        }
        FedApp {
            client_id: sp["clientId"].as_str().unwrap().to_owned(),
            key: EncodingKey::from_ec_der(&pair.serialize_der()),
        }
    }

    /// A token as the issuer writes it (10 minutes), edited by `edit`.
    fn token(&self, subject: &str, edit: impl FnOnce(&mut Value)) -> String {
        let t = now();
        let mut c = json!({"iss": FEDERATED_ISSUER, "sub": subject, "aud": FEDERATED_AUDIENCE,
                           "iat": t, "nbf": t, "exp": t + 600});
        edit(&mut c);
        sign(&self.key, Some("k1"), &c)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_federated_credential_of_an_issuer_is_tried() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path());
    let app = FedApp::register(&h).await;
    for subject in ["repo:main", "repo:release"] {
        let (status, body) = h.assert(&app.client_id, &app.token(subject, |_| {})).await;
        assert_eq!(status, 200, "the credential for {subject} was never tried: {body}");
    }
    let (status, body) = h.assert(&app.client_id, &app.token("repo:fork", |_| {})).await;
    assert_eq!(status, 401, "an untrusted subject was accepted: {body}");
    // A federated token is re-read from its file until the issuer rotates it: reuse within its
    // life is accepted, as Entra does.
    let reused = app.token("repo:main", |_| {});
    assert_eq!(h.assert(&app.client_id, &reused).await.0, 200);
    assert_eq!(h.assert(&app.client_id, &reused).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_federated_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path());
    let app = FedApp::register(&h).await;
    let year = app.token("repo:main", |c| c["exp"] = json!(now() + 365 * 86_400));
    let (status, body) = h.assert(&app.client_id, &year).await;
    assert_eq!(status, 401, "a year-long federated token was accepted: {body}");
    assert!(description(&body).contains("expires more than 3600 seconds"), "{body}");
    // One hour, as Kubernetes projects them, is fine.
    let (status, body) =
        h.assert(&app.client_id, &app.token("repo:main", |c| c["exp"] = json!(now() + 3600))).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_yet_valid_federated_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path());
    let app = FedApp::register(&h).await;
    let early = app.token("repo:main", |c| c["nbf"] = json!(now() + 300));
    let (status, body) = h.assert(&app.client_id, &early).await;
    assert_eq!(status, 401, "a federated token not valid yet was accepted: {body}");
    assert!(description(&body).contains("ImmatureSignature"), "{body}");
}

/// P-256's group order n, big-endian.
const P256_ORDER: &str = "FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551";

/// The same token with its signature's S replaced by n − S: the other valid encoding of the
/// same ECDSA signature, a different string.
fn high_s_twin(token: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let mut sig = b64.decode(signature).unwrap();
    assert_eq!(sig.len(), 64);
    let n = num_bigint::BigUint::parse_bytes(P256_ORDER.as_bytes(), 16).unwrap();
    let s = num_bigint::BigUint::from_bytes_be(&sig[32..]);
    let flipped = (&n - &s).to_bytes_be();
    sig[32..].fill(0);
    sig[64 - flipped.len()..].copy_from_slice(&flipped);
    format!("{signed}.{}", b64.encode(sig))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_encoded_high_s_access_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path());
    let (status, sp) = h
        .admin(
            &h.admin_token,
            reqwest::Method::POST,
            "principals",
            Some(json!({"name": "sig-app", "type": "service-principal"})),
        )
        .await;
    assert_eq!(status, 201, "{sp}");
    let (status, secret) =
        h.admin(&h.admin_token, reqwest::Method::POST, "principals/sig-app/secrets", None).await;
    assert_eq!(status, 201, "{secret}");
    let scope = format!("https://localhost:{}/.default", h.server.port);
    // The admin token and a few fresh ones: each signature's S is a coin toss for the signer, so
    // several tokens exercise both halves; every token Coffer mints must be low-S.
    let mut tokens = vec![h.admin_token.clone()];
    for _ in 0..6 {
        let r = h
            .http
            .post(format!("{}/adfs/oauth2/v2.0/token", h.login()))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", secret["clientId"].as_str().unwrap()),
                ("client_secret", secret["clientSecret"].as_str().unwrap()),
                ("scope", &scope),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let body: Value = r.json().await.unwrap();
        tokens.push(body["access_token"].as_str().unwrap().to_owned());
    }
    for original in &tokens {
        let twin = high_s_twin(original);
        assert_ne!(&twin, original);
        let (status, body) = h.admin(&twin, reqwest::Method::GET, "principals", None).await;
        assert_eq!(status, 401, "the high-S twin of a valid token was accepted: {body}");
        // sig-app holds no role: 403 (authenticated, not authorized) is the answer it gets.
        let (status, body) = h.admin(original, reqwest::Method::GET, "principals", None).await;
        assert!(matches!(status, 200 | 403), "the token as minted is not accepted: {status} {body}");
    }
}
