//! Runs the real `coffer` binary as a dev server on a free loopback port, like a user would.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use coffer_client::{ClientConfig, CofferClient};
use zeroize::Zeroizing;

pub const BIN: &str = env!("CARGO_BIN_EXE_coffer");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct TestServer {
    pub child: Child,
    pub data_dir: PathBuf,
    pub port: u16,
    pub log: PathBuf,
}

/// Reads `export KEY='value'` lines.
pub fn read_env_file(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
        .collect()
}

impl TestServer {
    pub fn start(data_dir: &Path, port: u16, extra_args: &[&str]) -> TestServer {
        Self::try_start(data_dir, port, extra_args)
            .unwrap_or_else(|log| panic!("server did not start:\n{log}"))
    }

    /// Starts the server; on failure returns its output.
    pub fn try_start(data_dir: &Path, port: u16, extra_args: &[&str]) -> Result<TestServer, String> {
        Self::try_start_with(data_dir, port, extra_args, |_| ())
    }

    /// Starts the server with extra environment variables (e.g. `SSL_CERT_FILE`).
    pub fn try_start_with_env(
        data_dir: &Path,
        port: u16,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<TestServer, String> {
        Self::try_start_with(data_dir, port, extra_args, |command| {
            command.envs(env.iter().copied());
        })
    }

    /// [`TestServer::try_start`], with `prepare` applied to the command before it runs.
    pub fn try_start_with(
        data_dir: &Path,
        port: u16,
        extra_args: &[&str],
        prepare: impl FnOnce(&mut Command),
    ) -> Result<TestServer, String> {
        let log = data_dir.with_extension(format!("{port}.log"));
        let log_file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(BIN);
        command
            .args(["server", "--dev", "--data-dir"])
            .arg(data_dir)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--agent-listen", "127.0.0.1:0"])
            .args(extra_args)
            .env("COFFER_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log_file);
        prepare(&mut command);
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log_copy = log.clone();
        std::thread::spawn(move || {
            let mut out = std::fs::OpenOptions::new().append(true).open(&log_copy).unwrap();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                use std::io::Write;
                let _ = writeln!(out, "{line}");
                if line.contains("ready") {
                    let _ = tx.send(());
                }
            }
        });
        let ready = rx.recv_timeout(Duration::from_secs(60)).is_ok();
        if !ready {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::fs::read_to_string(&log).unwrap_or_default());
        }
        Ok(TestServer { child, data_dir: data_dir.to_path_buf(), port, log })
    }

    pub fn admin_env(&self) -> Vec<(String, String)> {
        read_env_file(&self.data_dir.join("admin.env"))
    }

    pub fn env(&self, key: &str) -> String {
        self.admin_env().into_iter().find(|(k, _)| k == key).map(|(_, v)| v).unwrap()
    }

    pub fn client(&self) -> CofferClient {
        CofferClient::new(ClientConfig {
            server_url: self.env("COFFER_URL"),
            token: Zeroizing::new(self.env("COFFER_TOKEN")),
            ca_pem: Some(std::fs::read(self.data_dir.join("ca.pem")).unwrap()),
        })
        .unwrap()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// An HTTPS client that trusts the dev CA and reaches this server as `localhost`,
    /// `login.localhost`, `dev.localhost` and `<vault>.localhost` for each of `vaults`.
    pub fn https_builder(&self, vaults: &[&str]) -> reqwest::ClientBuilder {
        let ca =
            reqwest::Certificate::from_pem(&std::fs::read(self.data_dir.join("ca.pem")).unwrap()).unwrap();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(ca)
            .resolve("localhost", addr)
            .resolve("login.localhost", addr)
            .resolve("dev.localhost", addr);
        for vault in vaults {
            builder = builder.resolve(&format!("{vault}.localhost"), addr);
        }
        builder
    }

    /// [`TestServer::https_builder`], built.
    pub fn https(&self, vaults: &[&str]) -> reqwest::Client {
        self.https_builder(vaults).build().unwrap()
    }

    /// A `client_credentials` token request to this server's AD FS token endpoint with `form`
    /// (client id and secret or assertion) and the server's scope; the status and JSON body.
    pub async fn client_credentials(
        &self,
        http: &reqwest::Client,
        form: &[(&str, &str)],
    ) -> (u16, serde_json::Value) {
        let url = format!("https://login.localhost:{}/adfs/oauth2/token", self.port);
        let scope = format!("https://localhost:{}/.default", self.port);
        let mut fields = vec![("grant_type", "client_credentials"), ("scope", scope.as_str())];
        fields.extend_from_slice(form);
        let r = http.post(url).form(&fields).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// An admin-API request (`/admin/{path}`) with `token`; the status and JSON body.
    pub async fn admin_request(
        &self,
        http: &reqwest::Client,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let url = format!("https://localhost:{}/admin/{path}", self.port);
        let mut req = http.request(method, url).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the CLI with the server's admin environment; returns (success, stdout, stderr).
pub fn cli(server: &TestServer, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).envs(server.admin_env()).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}
