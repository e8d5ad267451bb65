//! Identity scenarios with the official `azure_identity` crate (1.x) and NO custom credential.
//!
//! Rust has no `DefaultAzureCredential` and no environment credential (azure_identity 1.0), so the
//! "application" here builds the one credential the scenario is about, from the environment, exactly as the
//! crate's documentation shows, and hands it to the unmodified `SecretClient`:
//!
//! * `managed`:  `ManagedIdentityCredential::new(None)` (App Service source: `IDENTITY_ENDPOINT` +
//!   `IDENTITY_HEADER`; the crate's IMDS source is hard-coded to 169.254.169.254 and is not used);
//! * `secret`:   `ClientSecretCredential::new(AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_CLIENT_SECRET, None)`
//!   (with no cloud configured the crate takes the authority from `AZURE_AUTHORITY_HOST`);
//! * `workload`: `WorkloadIdentityCredential::new(None)` (reads `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`,
//!   `AZURE_FEDERATED_TOKEN_FILE`, `AZURE_AUTHORITY_HOST`).
//!
//! That application is this same binary started as `coffer-compat-rust identity-client KIND` in a child
//! process with an explicit, minimal environment (nothing inherited), under another uid for the managed
//! identity scenarios (`setpriv --reuid U --regid U --clear-groups`). It serves one JSON command per stdin
//! line (`{"op":"get","name":"…"}`) with one JSON line on stdout (`ok`, `sha256` of the value, or `status`,
//! `code`, `inner`, `message`), keeping ONE credential and ONE client for its lifetime, so revocation can be
//! checked on the very next call with a cached token. Values and tokens are never printed.
//!
//! The driver side (the `identity_*` tests) creates principals with the coffer CLI (`COFFER_BIN`, admin.env
//! already in the environment), sets secrets with the admin client and checks the child's answers.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc, Arc, Mutex,
    },
    thread,
    time::{Duration as StdDuration, SystemTime, UNIX_EPOCH},
};

use azure_core::{credentials::Secret as ClientSecret, credentials::TokenCredential, error::ErrorKind};
use azure_identity::{ClientSecretCredential, ManagedIdentityCredential, WorkloadIdentityCredential};
use azure_security_keyvault_secrets::{models::KeyVaultError, SecretClient};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use ring::{
    rand::SystemRandom,
    signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING},
};
use serde_json::{json, Value};

use crate::{describe, truncate, Ctx, TestResult};

/// argv[1] that turns this binary into the workload.
pub const CLIENT_ARG: &str = "identity-client";

const SECRETS_USER: &str = "Key Vault Secrets User";
const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "api://AzureADTokenExchange";
const NOT_BOUND: &str = "No managed identity is bound to this process";
/// Uids this suite binds or runs children under (the Python and JS suites use 41xxx and 42xxx).
const OUR_UIDS: std::ops::Range<u64> = 43000..44000;
const UNBOUND_UID: u32 = 43999;
static NEXT_UID: AtomicU32 = AtomicU32::new(43001);
/// Variables dev.env gives a workload (the only ones the managed-identity children get, plus PATH/HOME).
const DEV_ENV_VARS: [&str; 7] = [
    "AZURE_KEYVAULT_URL",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
];
const CA_VARS: [&str; 3] = ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"];

macro_rules! check {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

// ------------------------------------------------------------------------------------------------
// Child mode: the workload
// ------------------------------------------------------------------------------------------------

fn reply(v: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn env_var(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is not set"))
}

fn build_credential(kind: &str) -> Result<Arc<dyn TokenCredential>, String> {
    let cred: Arc<dyn TokenCredential> = match kind {
        "managed" => {
            // Without IDENTITY_ENDPOINT the crate would use IMDS at 169.254.169.254: never go there.
            env_var("IDENTITY_ENDPOINT")?;
            ManagedIdentityCredential::new(None).map_err(|e| describe(&e))?
        }
        "secret" => ClientSecretCredential::new(
            &env_var("AZURE_TENANT_ID")?,
            env_var("AZURE_CLIENT_ID")?,
            ClientSecret::new(env_var("AZURE_CLIENT_SECRET")?),
            None,
        )
        .map_err(|e| describe(&e))?,
        "workload" => WorkloadIdentityCredential::new(None).map_err(|e| describe(&e))?,
        other => return Err(format!("unknown credential kind {other:?}")),
    };
    Ok(cred)
}

/// `coffer-compat-rust identity-client KIND`: the workload. Returns the exit code.
pub async fn client_main(kind: &str) -> i32 {
    let fail = |message: String| {
        reply(json!({"ok": false, "type": "Setup", "status": null, "code": null, "inner": null, "message": message}));
        2
    };
    let vault = match env_var("AZURE_KEYVAULT_URL") {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    let credential = match build_credential(kind) {
        Ok(c) => c,
        Err(e) => return fail(format!("credential: {e}")),
    };
    let client = match SecretClient::new(&vault, credential, None) {
        Ok(c) => c,
        Err(e) => return fail(format!("SecretClient::new: {}", describe(&e))),
    };
    reply(json!({"ready": true, "pid": std::process::id()}));
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let cmd: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        match cmd["op"].as_str() {
            Some("exit") => break,
            Some("get") => {}
            _ => {
                reply(json!({"ok": false, "type": "BadCommand", "status": null, "code": null, "inner": null,
                             "message": format!("bad command {line:?}")}));
                continue;
            }
        }
        let name = cmd["name"].as_str().unwrap_or_default();
        let result = match client.get_secret(name, None).await {
            Ok(resp) => resp.into_model(),
            Err(e) => Err(e),
        };
        match result {
            Ok(secret) => reply(json!({
                "ok": true,
                "sha256": sha256_hex(secret.value.unwrap_or_default().as_bytes()),
                "credential": kind,
            })),
            Err(e) => {
                let (kind_name, status, code, inner) = match e.kind() {
                    ErrorKind::HttpResponse { status, error_code, raw_response } => {
                        let body = raw_response.as_ref().map(|r| r.body().as_ref().to_vec()).unwrap_or_default();
                        let parsed: Option<KeyVaultError> = azure_core::json::from_json(&body).ok();
                        let err = parsed.and_then(|p| p.error);
                        let code = error_code.clone().or_else(|| err.as_ref().and_then(|e| e.code.clone()));
                        let inner = err.as_ref().and_then(|e| e.inner_error.as_ref()).and_then(|i| i.code.clone());
                        ("HttpResponse".to_string(), Some(u16::from(*status)), code, inner)
                    }
                    other => (format!("{other:?}"), None, None, None),
                };
                reply(json!({"ok": false, "type": kind_name, "status": status, "code": code, "inner": inner,
                             "message": truncate(&describe(&e), 4000)}));
            }
        }
    }
    0
}

// ------------------------------------------------------------------------------------------------
// Driver side: environment, CLI, child processes
// ------------------------------------------------------------------------------------------------

/// Parse `export KEY='value'` lines (what dev.env / admin.env contain).
fn parse_env_file(path: &str) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("read {path}: {e}"))?;
    let mut out = Vec::new();
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else { continue };
        let v = v.trim();
        let v = if v.len() >= 2 && v.starts_with('\'') && v.ends_with('\'') {
            v[1..v.len() - 1].replace("'\\''", "'")
        } else if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
            v[1..v.len() - 1].to_string()
        } else {
            v.to_string()
        };
        out.push((k.trim().to_string(), v));
    }
    Ok(out)
}

fn lookup<'a>(vars: &'a [(String, String)], key: &str) -> Option<&'a str> {
    vars.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

type EnvVars = Vec<(String, String)>;

struct Setup {
    dev: EnvVars,
    admin: EnvVars,
    coffer_bin: String,
    vault_name: String,
}

fn setup(ctx: &Ctx) -> Result<Setup, String> {
    let data_dir = env_var("COFFER_DATA_DIR")?;
    let coffer_bin = env_var("COFFER_BIN")?;
    let dev = parse_env_file(&format!("{data_dir}/dev.env"))?;
    let admin = parse_env_file(&format!("{data_dir}/admin.env"))?;
    let host = ctx.vault.split("://").nth(1).unwrap_or_default();
    let vault_name = host.split('.').next().unwrap_or_default().to_string();
    Ok(Setup { dev, admin, coffer_bin, vault_name })
}

fn base_env() -> EnvVars {
    // PATH and HOME only; HOME points nowhere.
    vec![("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()), ("HOME".into(), "/nonexistent".into())]
}

impl Setup {
    /// dev.env's variables verbatim, except AZURE_KEYVAULT_URL, which names this suite's vault.
    fn dev_env(&self, ctx: &Ctx) -> Result<EnvVars, String> {
        let mut env = base_env();
        for k in DEV_ENV_VARS {
            if k == "AZURE_KEYVAULT_URL" {
                env.push((k.into(), ctx.vault.clone()));
            } else {
                let v = lookup(&self.dev, k).filter(|v| !v.is_empty()).ok_or(format!("dev.env lacks {k}"))?;
                env.push((k.into(), v.into()));
            }
        }
        Ok(env)
    }

    /// What a CI job has besides its credential: CA trust, the vault URL, the tenant and the authority host.
    fn entra_env(&self, ctx: &Ctx) -> Result<EnvVars, String> {
        let mut env = base_env();
        for k in CA_VARS {
            let v = lookup(&self.dev, k).ok_or(format!("dev.env lacks {k}"))?;
            env.push((k.into(), v.into()));
        }
        env.push(("AZURE_KEYVAULT_URL".into(), ctx.vault.clone()));
        env.push(("AZURE_TENANT_ID".into(), lookup(&self.admin, "AZURE_TENANT_ID").unwrap_or("adfs").into()));
        let authority = lookup(&self.admin, "AZURE_AUTHORITY_HOST").ok_or("admin.env lacks AZURE_AUTHORITY_HOST")?;
        env.push(("AZURE_AUTHORITY_HOST".into(), authority.into()));
        Ok(env)
    }

    /// `coffer ARGS -o json`. `sensitive`: never show stdout (it holds a client secret).
    fn cli(&self, args: &[&str], sensitive: bool) -> Result<Value, String> {
        let out = Command::new(&self.coffer_bin)
            .args(args)
            .args(["-o", "json"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("coffer {}: {e}", args.join(" ")))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let shown = if sensitive { String::new() } else { format!("; stdout: {}", truncate(&stdout, 2000)) };
            return Err(format!("coffer {} failed ({}): {}{shown}", args.join(" "), out.status, truncate(&stderr, 2000)));
        }
        Ok(serde_json::from_str(&stdout).unwrap_or(Value::String(stdout)))
    }

    fn assign_secrets_user(&self, principal: &str) -> Result<(), String> {
        let scope = format!("/vaults/{}", self.vault_name);
        self.cli(&["role", "assign", "--principal", principal, "--role", SECRETS_USER, "--scope", &scope], false)?;
        Ok(())
    }

    fn remove_secrets_user(&self, principal: &str) -> Result<(), String> {
        let scope = format!("/vaults/{}", self.vault_name);
        self.cli(&["role", "remove", "--principal", principal, "--role", SECRETS_USER, "--scope", &scope], false)?;
        Ok(())
    }

    fn make_identity(&self, ctx: &Ctx, uid: u32, exe: Option<&str>) -> Result<String, String> {
        let name = ctx.name(&format!("mi-{uid}"));
        self.cli(&["identity", "create", &name], false)?;
        let uid_s = uid.to_string();
        let mut bind = vec!["identity", "bind", &name, "--uid", &uid_s];
        if let Some(exe) = exe {
            bind.extend(["--exe", exe]);
        }
        self.cli(&bind, false)?;
        self.assign_secrets_user(&name)?;
        Ok(name)
    }

    /// `coffer sp create` + Secrets User on the vault: (name, client id, client secret).
    fn make_sp(&self, ctx: &Ctx, what: &str) -> Result<(String, String, String), String> {
        let name = ctx.name(&format!("sp-{what}"));
        let sp = self.cli(&["sp", "create", &name], true)?;
        let client_id = sp["clientId"].as_str().ok_or("sp create: no clientId")?.to_string();
        let secret = sp["clientSecret"].as_str().ok_or("sp create: no clientSecret")?.to_string();
        self.assign_secrets_user(&name)?;
        Ok((name, client_id, secret))
    }

    /// Remove bindings left on this suite's uids by an earlier run against the same server.
    fn unbind_our_uids(&self) -> Result<(), String> {
        let listing = self.cli(&["identity", "bindings"], false)?;
        let rows = listing.get("value").cloned().unwrap_or(listing);
        for row in rows.as_array().cloned().unwrap_or_default() {
            if row["uid"].as_u64().is_some_and(|u| OUR_UIDS.contains(&u)) {
                if let Some(id) = row["id"].as_str() {
                    self.cli(&["identity", "unbind", id], false)?;
                }
            }
        }
        Ok(())
    }
}

/// Whether children can run under other uids here; Err(reason) if not.
fn uid_switching() -> Result<(), String> {
    static CHECKED: Mutex<Option<Result<(), String>>> = Mutex::new(None);
    let mut guard = CHECKED.lock().unwrap();
    if let Some(r) = guard.as_ref() {
        return r.clone();
    }
    let uid = UNBOUND_UID.to_string();
    let r = match Command::new("setpriv")
        .args(["--reuid", &uid, "--regid", &uid, "--clear-groups", "true"])
        .stdin(Stdio::null())
        .output()
    {
        Err(e) => Err(format!("setpriv (util-linux) cannot be run: {e}")),
        Ok(o) if !o.status.success() => Err(format!(
            "setpriv cannot switch uid here (not root, or a user namespace): {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => Ok(()),
    };
    *guard = Some(r.clone());
    r
}

struct Workload {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Option<String>>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Workload {
    fn start(kind: &str, env: &EnvVars, uid: Option<u32>) -> Result<Workload, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut cmd = match uid {
            Some(uid) => {
                let mut c = Command::new("setpriv");
                let u = uid.to_string();
                c.args(["--reuid", &u, "--regid", &u, "--clear-groups"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args([CLIENT_ARG, kind])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("spawn workload: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(Some(l)).is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            let _ = tx.send(None);
        });
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let tail = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                let mut t = tail.lock().unwrap();
                t.push_back(line);
                while t.len() > 20 {
                    t.pop_front();
                }
            }
        });
        let stdin = child.stdin.take();
        let mut w = Workload { child, stdin, lines: rx, stderr };
        let ready = w.read(StdDuration::from_secs(60))?;
        if ready["ready"] != Value::Bool(true) {
            return Err(format!("workload did not start: {ready}"));
        }
        Ok(w)
    }

    fn stderr_tail(&self) -> String {
        self.stderr.lock().unwrap().iter().cloned().collect::<Vec<_>>().join("\n")
    }

    fn read(&mut self, timeout: StdDuration) -> Result<Value, String> {
        match self.lines.recv_timeout(timeout) {
            Ok(Some(line)) => serde_json::from_str(&line).map_err(|e| format!("workload printed {line:?}: {e}")),
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.try_wait().ok().flatten();
                Err(format!("workload exited ({status:?}); stderr tail:\n{}", self.stderr_tail()))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "workload gave no answer within {}s; stderr tail:\n{}",
                timeout.as_secs(),
                self.stderr_tail()
            )),
        }
    }

    fn get(&mut self, name: &str) -> Result<Value, String> {
        let stdin = self.stdin.as_mut().ok_or("workload stdin closed")?;
        writeln!(stdin, "{}", json!({"op": "get", "name": name})).map_err(|e| format!("write to workload: {e}"))?;
        stdin.flush().map_err(|e| format!("write to workload: {e}"))?;
        self.read(StdDuration::from_secs(120))
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "{}", json!({"op": "exit"}));
        }
        for _ in 0..150 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(StdDuration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn msg(v: &Value) -> &str {
    v["message"].as_str().unwrap_or_default()
}

fn assert_read(result: &Value, value: &str) -> TestResult {
    check!(result["ok"] == Value::Bool(true), "the workload could not read the secret: {result}");
    check!(result["sha256"].as_str() == Some(&sha256_hex(value.as_bytes())), "the workload read a different value");
    Ok(())
}

fn assert_refused(result: &Value, fragments: &[&str]) -> TestResult {
    check!(result["ok"] != Value::Bool(true), "the workload read the secret, but it should have been refused");
    for f in fragments {
        check!(msg(result).contains(f), "{f:?} not in the error: {result}");
    }
    Ok(())
}

fn assert_forbidden_by_rbac(result: &Value) -> TestResult {
    check!(result["ok"] != Value::Bool(true), "the secret was still readable after the role was removed");
    check!(
        result["status"] == json!(403) && result["code"] == json!("Forbidden") && result["inner"] == json!("ForbiddenByRbac"),
        "expected 403 Forbidden/ForbiddenByRbac, got {result}"
    );
    Ok(())
}

fn assert_principal_disabled(result: &Value) -> TestResult {
    check!(result["ok"] != Value::Bool(true), "the secret was still readable after the principal was disabled");
    check!(result["status"] == json!(401), "expected HTTP 401, got {result}");
    Ok(())
}

async fn put_secret(ctx: &Ctx, what: &str) -> Result<(String, String), String> {
    let name = ctx.name(&format!("id-{what}"));
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    let value = format!("value-{what}-{nanos:x}");
    ctx.set(&name, &value).await?;
    Ok((name, value))
}

fn next_uid() -> u32 {
    NEXT_UID.fetch_add(1, Ordering::SeqCst)
}

/// Setup for a managed-identity scenario: Err("SKIP: …") where children cannot run under other uids.
fn prepare_mi(ctx: &Ctx) -> Result<Setup, String> {
    if let Err(reason) = uid_switching() {
        return Err(format!("{}{reason}", crate::SKIP_PREFIX));
    }
    let s = setup(ctx)?;
    static UNBOUND: Mutex<bool> = Mutex::new(false);
    let mut done = UNBOUND.lock().unwrap();
    if !*done {
        s.unbind_our_uids()?;
        *done = true;
    }
    Ok(s)
}

// ------------------------------------------------------------------------------------------------
// (a) managed identity (App Service source)
// ------------------------------------------------------------------------------------------------

pub async fn test_mi_bound_uid(ctx: &Ctx) -> TestResult {
    let s = prepare_mi(ctx)?;
    let uid = next_uid();
    s.make_identity(ctx, uid, None)?;
    let (name, value) = put_secret(ctx, "mi-uid").await?;
    let mut w = Workload::start("managed", &s.dev_env(ctx)?, Some(uid))?;
    assert_read(&w.get(&name)?, &value)
}

pub async fn test_mi_unbound_uid(ctx: &Ctx) -> TestResult {
    let s = prepare_mi(ctx)?;
    let (name, _) = put_secret(ctx, "mi-unbound").await?;
    let mut w = Workload::start("managed", &s.dev_env(ctx)?, Some(UNBOUND_UID))?;
    let result = w.get(&name)?;
    assert_refused(&result, &[NOT_BOUND, &format!("uid {UNBOUND_UID}")])?;
    check!(result["type"] == json!("Credential") && result["status"].is_null(), "expected a credential error: {result}");
    Ok(())
}

pub async fn test_mi_bound_uid_exe(ctx: &Ctx) -> TestResult {
    let s = prepare_mi(ctx)?;
    let uid = next_uid();
    let exe = std::fs::canonicalize(std::env::current_exe().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    s.make_identity(ctx, uid, Some(&exe.to_string_lossy()))?;
    let (name, value) = put_secret(ctx, "mi-exe").await?;
    let mut w = Workload::start("managed", &s.dev_env(ctx)?, Some(uid))?;
    assert_read(&w.get(&name)?, &value)
}

pub async fn test_mi_bound_uid_other_exe(ctx: &Ctx) -> TestResult {
    let s = prepare_mi(ctx)?;
    let uid = next_uid();
    let exe = std::fs::canonicalize(std::env::current_exe().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let other = std::fs::canonicalize("/bin/true").map_err(|e| format!("/bin/true: {e}"))?;
    check!(other != exe, "/bin/true is this program");
    s.make_identity(ctx, uid, Some(&other.to_string_lossy()))?;
    let (name, _) = put_secret(ctx, "mi-other-exe").await?;
    let mut w = Workload::start("managed", &s.dev_env(ctx)?, Some(uid))?;
    let result = w.get(&name)?;
    assert_refused(&result, &[NOT_BOUND, &format!("uid {uid}"), &exe.to_string_lossy()])
}

// ------------------------------------------------------------------------------------------------
// (b) client secret
// ------------------------------------------------------------------------------------------------

fn secret_env(s: &Setup, ctx: &Ctx, client_id: &str, secret: &str) -> Result<EnvVars, String> {
    let mut env = s.entra_env(ctx)?;
    env.push(("AZURE_CLIENT_ID".into(), client_id.into()));
    env.push(("AZURE_CLIENT_SECRET".into(), secret.into()));
    Ok(env)
}

pub async fn test_client_secret(ctx: &Ctx) -> TestResult {
    let s = setup(ctx)?;
    let (_, client_id, secret) = s.make_sp(ctx, "ci")?;
    let (name, value) = put_secret(ctx, "sp").await?;
    let mut w = Workload::start("secret", &secret_env(&s, ctx, &client_id, &secret)?, None)?;
    assert_read(&w.get(&name)?, &value)
}

pub async fn test_client_secret_wrong(ctx: &Ctx) -> TestResult {
    let s = setup(ctx)?;
    let (_, client_id, _) = s.make_sp(ctx, "ci-wrong")?;
    let (name, _) = put_secret(ctx, "sp-wrong").await?;
    let wrong = format!("not-the-secret-{}", ctx.run);
    let mut w = Workload::start("secret", &secret_env(&s, ctx, &client_id, &wrong)?, None)?;
    let result = w.get(&name)?;
    assert_refused(&result, &["AADSTS7000215", "Invalid client secret"])?;
    check!(result["type"] == json!("Credential"), "expected a credential error, got {result}");
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// (c) workload identity federation (ES256 test issuer)
// ------------------------------------------------------------------------------------------------

struct TestIssuer {
    kid: String,
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl TestIssuer {
    fn new(kid: &str) -> Result<TestIssuer, String> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| "EC key generation failed".to_string())?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| "EC key parse failed".to_string())?;
        Ok(TestIssuer { kid: kid.to_string(), key, rng })
    }

    fn jwks(&self) -> Value {
        let point = self.key.public_key().as_ref(); // 0x04 || X || Y
        let (x, y) = point[1..].split_at(32);
        json!({"keys": [{"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
                         "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)}]})
    }

    fn token(&self, sub: &str) -> Result<String, String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let claims = json!({"iss": ISSUER, "sub": sub, "aud": AUDIENCE, "iat": now, "nbf": now - 5,
                            "exp": now + 600, "jti": format!("{now:x}-{}", std::process::id())});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self.key.sign(&self.rng, input.as_bytes()).map_err(|_| "signing failed".to_string())?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
    }
}

struct Federated {
    client_id: String,
    issuer: TestIssuer,
    subject: String,
    dir: std::path::PathBuf,
}

/// One service principal trusting (ISSUER, rs-<run> subject, AUDIENCE) with a fresh ES256 key.
fn federated(s: &Setup, ctx: &Ctx, what: &str) -> Result<Federated, String> {
    let (name, client_id, _) = s.make_sp(ctx, what)?;
    let issuer = TestIssuer::new(&ctx.name(&format!("issuer-{what}")))?;
    let subject = format!("system:serviceaccount:rs-{}-{what}:app", ctx.run);
    let dir = std::env::temp_dir().join(format!("coffer-rs-identity-{}-{what}", ctx.run));
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {dir:?}: {e}"))?;
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, issuer.jwks().to_string()).map_err(|e| format!("write {jwks:?}: {e}"))?;
    s.cli(
        &["federation", "add", &name, "--issuer", ISSUER, "--subject", &subject, "--audience", AUDIENCE,
          "--jwks-file", &jwks.to_string_lossy()],
        false,
    )?;
    Ok(Federated { client_id, issuer, subject, dir })
}

impl Drop for Federated {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn workload_env(s: &Setup, ctx: &Ctx, f: &Federated, token: &str) -> Result<EnvVars, String> {
    static NEXT_FILE: AtomicU32 = AtomicU32::new(1);
    let path = f.dir.join(format!("token-{}", NEXT_FILE.fetch_add(1, Ordering::SeqCst)));
    std::fs::write(&path, token).map_err(|e| format!("write {path:?}: {e}"))?;
    let mut env = s.entra_env(ctx)?;
    env.push(("AZURE_CLIENT_ID".into(), f.client_id.clone()));
    env.push(("AZURE_FEDERATED_TOKEN_FILE".into(), path.to_string_lossy().into_owned()));
    Ok(env)
}

pub async fn test_workload_identity(ctx: &Ctx) -> TestResult {
    let s = setup(ctx)?;
    let f = federated(&s, ctx, "wi")?;
    let (name, value) = put_secret(ctx, "wi").await?;
    let token = f.issuer.token(&f.subject)?;
    let mut w = Workload::start("workload", &workload_env(&s, ctx, &f, &token)?, None)?;
    assert_read(&w.get(&name)?, &value)
}

pub async fn test_workload_identity_untrusted(ctx: &Ctx) -> TestResult {
    let s = setup(ctx)?;
    let f = federated(&s, ctx, "wi-bad")?;
    let other_subject = f.subject.replace(":app", ":other");
    let other_key = TestIssuer::new(&f.issuer.kid)?; // same kid and claims, another key
    for (what, token, reason) in [
        ("another subject", f.issuer.token(&other_subject)?, "InvalidSubject"),
        ("another signing key", other_key.token(&f.subject)?, "InvalidSignature"),
    ] {
        let (name, _) = put_secret(ctx, "wi-bad").await?;
        let mut w = Workload::start("workload", &workload_env(&s, ctx, &f, &token)?, None)?;
        let result = w.get(&name)?;
        assert_refused(&result, &["AADSTS7000215", reason]).map_err(|e| format!("{what}: {e}"))?;
        check!(result["status"].is_null() || result["type"] == json!("Credential"), "{what}: the vault was reached: {result}");
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// (d) revocation on the very next call (same credential, cached token)
// ------------------------------------------------------------------------------------------------

pub async fn test_mi_role_removed(ctx: &Ctx) -> TestResult {
    let s = prepare_mi(ctx)?;
    let uid = next_uid();
    let ident = s.make_identity(ctx, uid, None)?;
    let (name, value) = put_secret(ctx, "mi-revoke").await?;
    let mut w = Workload::start("managed", &s.dev_env(ctx)?, Some(uid))?;
    assert_read(&w.get(&name)?, &value)?;
    s.remove_secrets_user(&ident)?;
    assert_forbidden_by_rbac(&w.get(&name)?)
}

pub async fn test_mi_disabled(ctx: &Ctx) -> TestResult {
    let s = prepare_mi(ctx)?;
    let uid = next_uid();
    let ident = s.make_identity(ctx, uid, None)?;
    let (name, value) = put_secret(ctx, "mi-disable").await?;
    let mut w = Workload::start("managed", &s.dev_env(ctx)?, Some(uid))?;
    assert_read(&w.get(&name)?, &value)?;
    s.cli(&["identity", "disable", &ident], false)?;
    assert_principal_disabled(&w.get(&name)?)
}

pub async fn test_client_secret_role_removed(ctx: &Ctx) -> TestResult {
    let s = setup(ctx)?;
    let (sp, client_id, secret) = s.make_sp(ctx, "ci-revoke")?;
    let (name, value) = put_secret(ctx, "sp-revoke").await?;
    let mut w = Workload::start("secret", &secret_env(&s, ctx, &client_id, &secret)?, None)?;
    assert_read(&w.get(&name)?, &value)?;
    s.remove_secrets_user(&sp)?;
    assert_forbidden_by_rbac(&w.get(&name)?)
}

pub async fn test_workload_identity_disabled(ctx: &Ctx) -> TestResult {
    let s = setup(ctx)?;
    let f = federated(&s, ctx, "wi-disable")?;
    let (name, value) = put_secret(ctx, "wi-disable").await?;
    let token = f.issuer.token(&f.subject)?;
    let mut w = Workload::start("workload", &workload_env(&s, ctx, &f, &token)?, None)?;
    assert_read(&w.get(&name)?, &value)?;
    s.cli(&["identity", "disable", &ctx.name("sp-wi-disable")], false)?;
    assert_principal_disabled(&w.get(&name)?)
}
