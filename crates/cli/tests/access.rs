//! Identity and access over HTTP, against the real binary: the role × operation matrix at
//! vault and secret scope, immediate revocation, and token attacks.

mod common;

use std::collections::HashMap;

use base64::Engine;
use common::{free_port, TestServer};
use serde_json::{json, Value};

struct Harness {
    server: TestServer,
    http: reqwest::Client,
    admin_token: String,
}

impl Harness {
    fn start(dir: &std::path::Path) -> Harness {
        let server = TestServer::start(&dir.join("data"), free_port(), &[]);
        let http = server.https(&["matrix"]);
        let admin_token = server.env("COFFER_TOKEN");
        Harness { server, http, admin_token }
    }

    fn root(&self) -> String {
        format!("https://localhost:{}", self.server.port)
    }

    fn vault(&self) -> String {
        format!("https://matrix.localhost:{}", self.server.port)
    }

    async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req =
            self.http.request(method, format!("{}/admin/{path}", self.root())).bearer_auth(&self.admin_token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Client-credentials token for a service principal, from the token endpoint.
    async fn token(&self, client_id: &str, secret: &str) -> Result<String, (u16, Value)> {
        let url = format!("https://login.localhost:{}/adfs/oauth2/v2.0/token", self.server.port);
        let scope = format!("https://localhost:{}/.default", self.server.port);
        let r = self
            .http
            .post(url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                ("client_secret", secret),
                ("scope", &scope),
            ])
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        if status == 200 {
            Ok(body["access_token"].as_str().unwrap().to_owned())
        } else {
            Err((status, body))
        }
    }

    async fn call(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut req = self
            .http
            .request(method, format!("{}{path}{sep}api-version=7.5", self.vault()))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn service_principal(&self, name: &str) -> (String, String) {
        let (status, sp) = self
            .admin(
                reqwest::Method::POST,
                "principals",
                Some(json!({"name": name, "type": "service-principal"})),
            )
            .await;
        assert_eq!(status, 201, "{sp}");
        (sp["clientId"].as_str().unwrap().to_owned(), sp["clientSecret"].as_str().unwrap().to_owned())
    }
}

const OPS: [&str; 10] =
    ["get", "set", "list", "list-versions", "update", "delete", "recover", "purge", "backup", "restore"];

/// Runs one secret operation on secret `s` as `token`; returns the HTTP status.
async fn run_op(h: &Harness, token: &str, op: &str, backup_blob: &str) -> u16 {
    use reqwest::Method as M;
    let (status, body) = match op {
        "get" => h.call(token, M::GET, "/secrets/s/", None).await,
        "set" => h.call(token, M::PUT, "/secrets/s", Some(json!({"value": "v"}))).await,
        "list" => h.call(token, M::GET, "/secrets", None).await,
        "list-versions" => h.call(token, M::GET, "/secrets/s/versions", None).await,
        "update" => h.call(token, M::PATCH, "/secrets/s/", Some(json!({"contentType": "x"}))).await,
        "delete" => h.call(token, M::DELETE, "/secrets/s", None).await,
        "recover" => h.call(token, M::POST, "/deletedsecrets/s/recover", None).await,
        "purge" => h.call(token, M::DELETE, "/deletedsecrets/s", None).await,
        "backup" => h.call(token, M::POST, "/secrets/s/backup", None).await,
        "restore" => h.call(token, M::POST, "/secrets/restore", Some(json!({"value": backup_blob}))).await,
        _ => unreachable!(),
    };
    if status == 403 {
        assert_eq!(body["error"]["innererror"]["code"], "ForbiddenByRbac", "{op}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains("Microsoft.KeyVault/vaults/secrets/"),
            "{body}"
        );
    }
    status
}

/// Every built-in role × every secret operation, at vault scope and at secret scope: denied
/// (403 ForbiddenByRbac) or allowed (anything else) exactly as Key Vault's roles define.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_by_operation_matrix_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path());
    let (status, _) =
        h.admin(reqwest::Method::POST, "vaults", Some(json!({"name": "matrix", "retentionDays": 7}))).await;
    assert_eq!(status, 201);
    // A backup blob to restore, made by the administrator from another secret.
    h.call(&h.admin_token, reqwest::Method::PUT, "/secrets/source", Some(json!({"value": "x"}))).await;
    let (_, blob) = h.call(&h.admin_token, reqwest::Method::POST, "/secrets/source/backup", None).await;
    let blob = blob["value"].as_str().unwrap().to_owned();

    let all: Vec<&str> = OPS.to_vec();
    let metadata = ["list", "list-versions"];
    let roles: [(&str, Vec<&str>); 6] = [
        ("Key Vault Administrator", all.clone()),
        ("Key Vault Secrets Officer", all.clone()),
        ("Key Vault Secrets User", ["get"].into_iter().chain(metadata).collect()),
        ("Key Vault Reader", metadata.to_vec()),
        ("Key Vault Purge Operator", vec![]),
        ("Key Vault Data Access Administrator", vec![]),
    ];
    let mut failures = Vec::new();
    for (i, (role, allowed)) in roles.iter().enumerate() {
        for scope in ["/vaults/matrix", "/vaults/matrix/secrets/s"] {
            let name = format!("sp-{i}-{}", if scope.contains("secrets") { "secret" } else { "vault" });
            let (client_id, secret) = h.service_principal(&name).await;
            let (status, body) = h
                .admin(
                    reqwest::Method::POST,
                    "role-assignments",
                    Some(json!({"principal": name, "role": role, "scope": scope})),
                )
                .await;
            assert_eq!(status, 201, "{body}");
            let token = h.token(&client_id, &secret).await.unwrap();
            // Fresh state for each principal: `s` exists and is active.
            h.call(&h.admin_token, reqwest::Method::DELETE, "/secrets/s", None).await;
            h.call(&h.admin_token, reqwest::Method::DELETE, "/deletedsecrets/s", None).await;
            h.call(&h.admin_token, reqwest::Method::DELETE, "/secrets/source", None).await;
            h.call(&h.admin_token, reqwest::Method::DELETE, "/deletedsecrets/source", None).await;
            h.call(&h.admin_token, reqwest::Method::PUT, "/secrets/s", Some(json!({"value": "v0"}))).await;
            for op in OPS {
                // Operations on the vault itself (list, restore) are not covered by a
                // secret-scope assignment.
                let vault_level = op == "list" || op == "restore";
                let expect_allowed = allowed.contains(&op) && !(vault_level && scope.contains("/secrets/"));
                // Keep preconditions so an allowed operation is not masked by a 404.
                if op == "recover" || op == "purge" {
                    h.call(&h.admin_token, reqwest::Method::DELETE, "/secrets/s", None).await;
                }
                let status = run_op(&h, &token, op, &blob).await;
                if (status != 403) != expect_allowed {
                    failures.push(format!(
                        "{role} at {scope}: {op} -> {status}, expected allowed={expect_allowed}"
                    ));
                }
                // Reset for the next operation.
                h.call(&h.admin_token, reqwest::Method::POST, "/deletedsecrets/s/recover", None).await;
                if h.call(&h.admin_token, reqwest::Method::GET, "/secrets/s/", None).await.0 == 404 {
                    h.call(&h.admin_token, reqwest::Method::DELETE, "/deletedsecrets/s", None).await;
                    h.call(&h.admin_token, reqwest::Method::PUT, "/secrets/s", Some(json!({"value": "v0"})))
                        .await;
                }
                h.call(&h.admin_token, reqwest::Method::DELETE, "/secrets/source", None).await;
                h.call(&h.admin_token, reqwest::Method::DELETE, "/deletedsecrets/source", None).await;
            }
        }
    }
    assert!(failures.is_empty(), "matrix mismatches:\n{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_is_immediate_and_token_attacks_fail() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path());
    h.admin(reqwest::Method::POST, "vaults", Some(json!({"name": "matrix", "retentionDays": 7}))).await;
    h.call(&h.admin_token, reqwest::Method::PUT, "/secrets/s", Some(json!({"value": "v"}))).await;
    let (client_id, secret) = h.service_principal("ci").await;
    // A wrong secret gets no token.
    let (status, body) = h.token(&client_id, "cfs_wrong.secret").await.unwrap_err();
    assert_eq!(status, 401);
    assert_eq!(body["error"], "invalid_client");
    let token = h.token(&client_id, &secret).await.unwrap();
    // Deny by default: authenticated but no role.
    assert_eq!(h.call(&token, reqwest::Method::GET, "/secrets/s/", None).await.0, 403);
    let (_, assignment) = h
        .admin(
            reqwest::Method::POST,
            "role-assignments",
            Some(json!({"principal": "ci", "role": "Key Vault Secrets User", "scope": "/vaults/matrix"})),
        )
        .await;
    assert_eq!(
        h.call(&token, reqwest::Method::GET, "/secrets/s/", None).await.0,
        200,
        "grant applies at once"
    );
    // Removing the assignment applies to the very next request, same token.
    let id = assignment["id"].as_str().unwrap();
    assert_eq!(h.admin(reqwest::Method::DELETE, &format!("role-assignments/{id}"), None).await.0, 204);
    assert_eq!(h.call(&token, reqwest::Method::GET, "/secrets/s/", None).await.0, 403);
    // Groups: a role on a group reaches its members; disabling the member is immediate.
    h.admin(reqwest::Method::POST, "principals", Some(json!({"name": "readers", "type": "group"}))).await;
    h.admin(reqwest::Method::POST, "principals/readers/members", Some(json!({"member": "ci"}))).await;
    h.admin(
        reqwest::Method::POST,
        "role-assignments",
        Some(json!({"principal": "readers", "role": "Key Vault Secrets User", "scope": "/vaults/matrix/secrets/s"})),
    )
    .await;
    assert_eq!(h.call(&token, reqwest::Method::GET, "/secrets/s/", None).await.0, 200);
    assert_eq!(
        h.admin(reqwest::Method::PATCH, "principals/ci", Some(json!({"enabled": false}))).await.0,
        200
    );
    assert_eq!(
        h.call(&token, reqwest::Method::GET, "/secrets/s/", None).await.0,
        401,
        "a disabled principal's token"
    );
    assert!(h.token(&client_id, &secret).await.is_err(), "a disabled principal gets no new token");
    h.admin(reqwest::Method::PATCH, "principals/ci", Some(json!({"enabled": true}))).await;
    assert_eq!(h.call(&token, reqwest::Method::GET, "/secrets/s/", None).await.0, 200);
    assert_eq!(h.admin(reqwest::Method::DELETE, "principals/ci", None).await.0, 204);
    assert_eq!(
        h.call(&token, reqwest::Method::GET, "/secrets/s/", None).await.0,
        401,
        "a deleted principal's token"
    );

    // Token attacks: every one is a 401 with the challenge.
    let admin = h.admin_token.clone();
    let parts: Vec<&str> = admin.split('.').collect();
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let header: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(parts[0]).unwrap())
            .unwrap();
    let claims: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(parts[1]).unwrap())
            .unwrap();
    let with_claims = |edit: &dyn Fn(&mut Value)| {
        let mut c = claims.clone();
        edit(&mut c);
        format!("{}.{}.{}", parts[0], b64(&c), parts[2])
    };
    let now = claims["iat"].as_u64().unwrap();
    // The JWKS is public: an HS256 token "signed" with the public key must not pass.
    let jwks: Value = h
        .http
        .get(format!("https://login.localhost:{}/adfs/discovery/keys", h.server.port))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let public_key_text = jwks["keys"][0].to_string();
    let mut hs_header = header.clone();
    hs_header["alg"] = json!("HS256");
    let hs256 = {
        let key = jsonwebtoken::EncodingKey::from_secret(public_key_text.as_bytes());
        let mut hdr = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        hdr.kid = header["kid"].as_str().map(str::to_owned);
        jsonwebtoken::encode(&hdr, &claims, &key).unwrap()
    };
    let mut none_header = header.clone();
    none_header["alg"] = json!("none");
    let mut unknown_kid = header.clone();
    unknown_kid["kid"] = json!("not-a-key");
    let attacks: HashMap<&str, String> = HashMap::from([
        ("expired", with_claims(&|c| c["exp"] = json!(now - 7200))),
        ("not yet valid", with_claims(&|c| c["nbf"] = json!(now + 7200))),
        ("wrong audience", with_claims(&|c| c["aud"] = json!("https://elsewhere:1"))),
        ("wrong issuer", with_claims(&|c| c["iss"] = json!("https://login.evil/adfs/v2.0"))),
        ("tampered payload", with_claims(&|c| c["oid"] = json!("00000000-0000-0000-0000-000000000000"))),
        ("alg none", format!("{}.{}.", b64(&none_header), parts[1])),
        ("HS256 with the public key", hs256),
        ("unknown kid", format!("{}.{}.{}", b64(&unknown_kid), parts[1], parts[2])),
    ]);
    for (name, forged) in &attacks {
        let (status, body) = h.call(forged, reqwest::Method::GET, "/secrets/s/", None).await;
        assert_eq!(status, 401, "{name}: {body}");
    }
    assert_eq!(
        h.call(&admin, reqwest::Method::GET, "/secrets/s/", None).await.0,
        200,
        "the genuine token still works"
    );
}

impl Harness {
    /// An admin-API request with `token` (not necessarily the administrator's).
    async fn admin_as(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.server.admin_request(&self.http, token, method, path, body).await
    }

    /// As the administrator; panics unless the answer is a success.
    async fn admin_ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (status, out) = self.admin(method.clone(), path, body).await;
        assert!((200..300).contains(&status), "{method} {path}: {status} {out}");
        out
    }

    async fn assign(&self, principal: &str, role: &str, scope: &str) -> String {
        let out = self
            .admin_ok(
                reqwest::Method::POST,
                "role-assignments",
                Some(json!({"principal": principal, "role": role, "scope": scope})),
            )
            .await;
        out["id"].as_str().unwrap().to_owned()
    }
}

/// What the escalation walk needs of one target: names of principals the administrator set up.
struct Targets {
    /// A service principal (credentials, federation, enabled state, deletion).
    sp: String,
    /// A group (membership, deletion).
    group: String,
    /// A member of that group, to remove.
    member: String,
    /// A managed identity (bindings).
    identity: String,
    /// An agent with `identity` bound to it (a new join token).
    agent: String,
}

/// The administrator creates the principals of `targets`, each holding `role` at `scope` (no
/// role when `role` is `None`), plus a federated credential and a binding to delete.
async fn set_up_targets(h: &Harness, t: &Targets, role: Option<(&str, &str)>) -> (String, String) {
    use reqwest::Method as M;
    if t.sp != "coffer-admin" {
        h.service_principal(&t.sp).await;
    }
    h.admin_ok(M::POST, "principals", Some(json!({"name": t.group, "type": "group"}))).await;
    h.service_principal(&t.member).await;
    h.admin_ok(M::POST, &format!("principals/{}/members", t.group), Some(json!({"member": t.member}))).await;
    h.admin_ok(M::POST, "principals", Some(json!({"name": t.identity, "type": "managed-identity"}))).await;
    h.admin_ok(M::POST, "agents", Some(json!({"name": t.agent}))).await;
    if let Some((role, scope)) = role {
        if t.sp != "coffer-admin" {
            h.assign(&t.sp, role, scope).await;
        }
        h.assign(&t.group, role, scope).await;
        h.assign(&t.identity, role, scope).await;
    }
    let federated = h
        .admin_ok(
            M::POST,
            "federated-credentials",
            Some(json!({"principal": t.sp, "issuer": "https://issuer.example", "subject": format!("{}-made", t.sp),
                        "jwks": {"keys": []}})),
        )
        .await;
    let binding = h
        .admin_ok(M::POST, "bindings", Some(json!({"identity": t.identity, "agent": t.agent, "uid": 4242})))
        .await;
    (federated["id"].as_str().unwrap().to_owned(), binding["id"].as_str().unwrap().to_owned())
}

/// Walks every route that changes a principal's credentials, federation, memberships,
/// bindings, enabled state or existence, as `token`, against `t`; returns (route, status).
async fn walk_principal_changes(
    h: &Harness,
    token: &str,
    t: &Targets,
    ids: &(String, String),
) -> Vec<(String, u16, Value)> {
    use reqwest::Method as M;
    let (federated_id, binding_id) = ids;
    let routes: Vec<(M, String, Option<Value>)> = vec![
        (M::POST, format!("principals/{}/secrets", t.sp), None),
        (
            M::POST,
            "federated-credentials".into(),
            Some(
                json!({"principal": t.sp, "issuer": "https://attacker.example", "subject": format!("{}-walk", t.sp),
                        "jwks": {"keys": []}}),
            ),
        ),
        (M::DELETE, format!("federated-credentials/{federated_id}"), None),
        (M::POST, format!("principals/{}/members", t.group), Some(json!({"member": "operator"}))),
        (M::DELETE, format!("principals/{}/members/{}", t.group, t.member), None),
        (M::POST, "bindings".into(), Some(json!({"identity": t.identity, "agent": "dev-agent", "uid": 1}))),
        (M::DELETE, format!("bindings/{binding_id}"), None),
        (M::POST, "agents".into(), Some(json!({"name": t.agent}))),
        (M::PATCH, format!("principals/{}", t.sp), Some(json!({"enabled": false}))),
        (M::PATCH, format!("principals/{}", t.sp), Some(json!({"enabled": true}))),
        (M::DELETE, format!("principals/{}", t.group), None),
        (M::DELETE, format!("principals/{}", t.sp), None),
    ];
    let mut out = Vec::new();
    for (method, path, body) in routes {
        let (status, answer) = h.admin_as(token, method.clone(), &path, body).await;
        out.push((format!("{method} /admin/{path}"), status, answer));
    }
    out
}

/// Issue 15, item 3: a principal holding only Coffer Identity Operator changes nothing about a
/// principal that holds more than it does (403 ForbiddenByRbac naming the missing permission),
/// and still manages principals that hold no more than it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_operator_cannot_escalate_through_principal_management() {
    use reqwest::Method as M;
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path());
    h.admin_ok(M::POST, "vaults", Some(json!({"name": "matrix", "retentionDays": 7}))).await;
    h.call(&h.admin_token, M::PUT, "/secrets/s", Some(json!({"value": "crown-jewels"}))).await;
    let (op_client, op_secret) = h.service_principal("operator").await;
    h.assign("operator", "Coffer Identity Operator", "/").await;
    let operator = h.token(&op_client, &op_secret).await.unwrap();
    // The dev agent exists for the binding routes.
    h.admin_ok(M::POST, "agents", Some(json!({"name": "dev-agent"}))).await;

    let (_, all) = h.admin(M::GET, "role-assignments", None).await;
    let admin_assignment = all["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["principalName"] == "coffer-admin")
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .unwrap();
    let mut failures = Vec::new();
    // The attack of the issue: a client secret for the administrator, then its token.
    let (status, body) = h.admin_as(&operator, M::POST, "principals/coffer-admin/secrets", None).await;
    if status == 201 {
        let stolen = h
            .token(body["clientId"].as_str().unwrap(), body["clientSecret"].as_str().unwrap())
            .await
            .unwrap();
        let (read, _) = h.call(&stolen, M::GET, "/secrets/s/", None).await;
        failures.push(format!("the operator signed in as the administrator and read a secret: {read}"));
    } else {
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"]["innererror"]["code"], "ForbiddenByRbac", "{body}");
    }

    // Administrator targets: the dev administrator, a group holding Coffer Administrator, an
    // identity holding it (bound to an agent).
    let admin = Targets {
        sp: "coffer-admin".into(),
        group: "admins".into(),
        member: "admin-member".into(),
        identity: "mi-admin".into(),
        agent: "agent-admin".into(),
    };
    let ids = set_up_targets(&h, &admin, Some(("Coffer Administrator", "/"))).await;
    for (route, status, body) in walk_principal_changes(&h, &operator, &admin, &ids).await {
        let named = body["error"]["message"].as_str().unwrap_or_default().contains("Action: '");
        if status != 403 || body["error"]["innererror"]["code"] != "ForbiddenByRbac" || !named {
            failures.push(format!("against an administrator: {route} -> {status} {body}"));
        }
    }
    // Signing keys and role assignments are not the operator's either.
    let (status, _) = h.admin_as(&operator, M::POST, "signing-keys/rotate", None).await;
    if status != 403 {
        failures.push(format!("POST /admin/signing-keys/rotate -> {status}"));
    }
    let (status, _) = h
        .admin_as(
            &operator,
            M::POST,
            "role-assignments",
            Some(json!({"principal": "operator", "role": "Coffer Administrator", "scope": "/"})),
        )
        .await;
    if status != 403 {
        failures.push(format!("POST /admin/role-assignments (itself, Coffer Administrator) -> {status}"));
    }
    let (status, _) =
        h.admin_as(&operator, M::DELETE, &format!("role-assignments/{admin_assignment}"), None).await;
    if status != 403 {
        failures.push(format!("DELETE the administrator's role assignment -> {status}"));
    }
    // Nothing changed: the administrator is still enabled and still works.
    let (status, _) = h.call(&h.admin_token, M::GET, "/secrets/s/", None).await;
    if status != 200 {
        failures.push(format!("the administrator's own token after the walk -> {status}"));
    }

    // Positive control: targets that hold no role at all.
    let plain = Targets {
        sp: "plain-sp".into(),
        group: "plain-group".into(),
        member: "plain-member".into(),
        identity: "mi-plain".into(),
        agent: "agent-plain".into(),
    };
    let ids = set_up_targets(&h, &plain, None).await;
    for (route, status, body) in walk_principal_changes(&h, &operator, &plain, &ids).await {
        if !(200..300).contains(&status) {
            failures.push(format!("against a principal with no role: {route} -> {status} {body}"));
        }
    }

    // Second control: the operator also holds Secrets User on the vault; a target holding it
    // on one secret of that vault is manageable, one holding it on another vault is not.
    h.assign("operator", "Key Vault Secrets User", "/vaults/matrix").await;
    let inside = Targets {
        sp: "inside-sp".into(),
        group: "inside-group".into(),
        member: "inside-member".into(),
        identity: "mi-inside".into(),
        agent: "agent-inside".into(),
    };
    let ids = set_up_targets(&h, &inside, Some(("Key Vault Secrets User", "/vaults/matrix/secrets/s"))).await;
    for (route, status, body) in walk_principal_changes(&h, &operator, &inside, &ids).await {
        if !(200..300).contains(&status) {
            failures.push(format!("against a target holding less: {route} -> {status} {body}"));
        }
    }
    h.admin_ok(M::POST, "vaults", Some(json!({"name": "other", "retentionDays": 7}))).await;
    let outside = Targets {
        sp: "outside-sp".into(),
        group: "outside-group".into(),
        member: "outside-member".into(),
        identity: "mi-outside".into(),
        agent: "agent-outside".into(),
    };
    let ids = set_up_targets(&h, &outside, Some(("Key Vault Secrets User", "/vaults/other"))).await;
    for (route, status, body) in walk_principal_changes(&h, &operator, &outside, &ids).await {
        if status != 403 {
            failures.push(format!("against a target holding a role elsewhere: {route} -> {status} {body}"));
        }
    }
    assert!(failures.is_empty(), "escalation routes:\n{}", failures.join("\n"));
}

/// Issue 15, item 6: scope strings that name nothing real are refused (400 BadParameter) by the
/// API and by `coffer role assign`, and nothing is stored; valid ones are stored canonically.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_assignment_scopes_are_parsed_strictly() {
    use reqwest::Method as M;
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path());
    h.service_principal("app").await;
    let bad = [
        "",
        "//",
        "/vaults/*",
        "/vaults/dev%2f..%2fprod",
        "/vaults/dev/",
        "/vaults//secrets/x",
        "/vaults/dev/secrets/a.b",
        "/vaults/dev/secrets/x/",
        "/vaults/dev/keys/x",
        "/vaults/ab",
    ];
    let mut failures = Vec::new();
    for scope in bad {
        let body = json!({"principal": "app", "role": "Key Vault Secrets User", "scope": scope});
        let (status, answer) = h.admin(M::POST, "role-assignments", Some(body)).await;
        if status != 400 || answer["error"]["code"] != "BadParameter" {
            failures.push(format!("POST {scope:?} -> {status} {answer}"));
        }
        let (ok, _, stderr) = common::cli(
            &h.server,
            &["role", "assign", "--principal", "app", "--role", "Key Vault Secrets User", "--scope", scope],
        );
        if ok || !stderr.contains("scope") {
            failures.push(format!("coffer role assign --scope {scope:?}: success={ok} {stderr}"));
        }
    }
    let (_, all) = h.admin(M::GET, "role-assignments", None).await;
    let stored: Vec<&str> = all["value"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["principalName"] == "app")
        .map(|a| a["scope"].as_str().unwrap())
        .collect();
    assert!(failures.is_empty(), "bad scopes accepted:\n{}\nstored: {stored:?}", failures.join("\n"));
    assert!(stored.is_empty(), "{stored:?}");
    // A valid scope is stored in its canonical form.
    let id = h.assign("app", "Key Vault Secrets User", "/vaults/Dev/secrets/DB-Password").await;
    let (_, all) = h.admin(M::GET, "role-assignments", None).await;
    let stored = all["value"].as_array().unwrap().iter().find(|a| a["id"] == id.as_str()).unwrap().clone();
    assert_eq!(stored["scope"], "/vaults/dev/secrets/db-password");
    // The role definitions still list (Coffer Administrator's `*` now also covers rotation).
    let (ok, out, err) = common::cli(&h.server, &["role", "definitions"]);
    assert!(ok && out.contains("Coffer Administrator") && out.contains("Coffer Identity Operator"), "{err}");
}

/// A Key Vault Data Access Administrator grants access to others within its scope, as on
/// Azure, but does not raise itself (or its group) and does not touch the administrator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_access_administrator_grants_others_but_not_itself() {
    use reqwest::Method as M;
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path());
    h.admin_ok(M::POST, "vaults", Some(json!({"name": "matrix", "retentionDays": 7}))).await;
    h.call(&h.admin_token, M::PUT, "/secrets/s", Some(json!({"value": "v"}))).await;
    let (client_id, secret) = h.service_principal("daa").await;
    h.assign("daa", "Key Vault Data Access Administrator", "/vaults/matrix").await;
    h.admin_ok(M::POST, "principals", Some(json!({"name": "daa-team", "type": "group"}))).await;
    h.admin_ok(M::POST, "principals/daa-team/members", Some(json!({"member": "daa"}))).await;
    h.service_principal("app").await;
    let daa = h.token(&client_id, &secret).await.unwrap();
    let assign = |principal: &str, role: &str, scope: &str| json!({"principal": principal, "role": role, "scope": scope});

    let (status, body) = h
        .admin_as(
            &daa,
            M::POST,
            "role-assignments",
            Some(assign("app", "Key Vault Secrets User", "/vaults/matrix")),
        )
        .await;
    assert_eq!(status, 201, "granting others is its job: {body}");
    for (who, role) in [("daa", "Key Vault Administrator"), ("daa-team", "Key Vault Secrets User")] {
        let (status, body) =
            h.admin_as(&daa, M::POST, "role-assignments", Some(assign(who, role, "/vaults/matrix"))).await;
        assert_eq!(status, 403, "{who} {role}: {body}");
        assert_eq!(body["error"]["innererror"]["code"], "ForbiddenByRbac", "{body}");
    }
    assert_eq!(h.call(&daa, M::GET, "/secrets/s/", None).await.0, 403, "still no data access");
    let (_, all) = h.admin(M::GET, "role-assignments", None).await;
    let admin_assignment = all["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["principalName"] == "coffer-admin")
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .unwrap();
    let (status, _) =
        h.admin_as(&daa, M::DELETE, &format!("role-assignments/{admin_assignment}"), None).await;
    assert_eq!(status, 403);
}
