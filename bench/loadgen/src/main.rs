//! `loadgen`: the Coffer benchmark's load generator.
//!
//! * `run`: a fixed number of HTTP/1.1 keep-alive connections, each issuing requests back to
//!   back for a warm-up period and then a measured period; every request completed in the
//!   measured window is recorded in an HDR histogram (µs). Optionally samples a server process'
//!   CPU time (`/proc/PID/stat` utime+stime) exactly at the window's edges.
//! * `populate`: N requests with sequential `{i}` (e.g. PUT secret i) over concurrent
//!   connections, with retries, progress on stderr and a time bound.
//! * `coldstart`: spawns a server command and measures process start → first 2xx response.
//! * `commit-probe`: what one durable commit costs on this disk, without Coffer: an overwrite
//!   of a preallocated file and `fdatasync`, repeated; latency percentiles and CPU per commit.
//!
//! URL and body are templates: `{i}` is a key index (random in `0..keys` for `run`, sequential
//! for `populate`), `{seq}` a process-wide unique counter, `{conn}` the connection number.
//! Every target must be a loopback address: anything else is refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

type AnyError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser)]
#[command(name = "loadgen", about = "HTTP/1.1 keep-alive load generator (loopback only)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Timed load: warm-up, then a measured window; prints JSON.
    Run(RunArgs),
    /// Sequential population: requests for {i} in start..start+count; prints JSON.
    Populate(PopulateArgs),
    /// Spawn a server (after `--`) and time process start → first 2xx response; prints JSON.
    Coldstart(ColdArgs),
    /// Time durable commits on the disk under DIR (write + fdatasync); prints JSON.
    CommitProbe(CommitProbeArgs),
}

#[derive(Args, Clone)]
struct CommitProbeArgs {
    /// Directory on the filesystem to measure (a scratch file is created and removed there).
    #[arg(long)]
    dir: PathBuf,
    /// Commits to time.
    #[arg(long, default_value_t = 500)]
    count: usize,
    /// Bytes per commit (a group commit of ~30 audit records is ~24 KiB).
    #[arg(long, default_value_t = 24 * 1024)]
    bytes: usize,
    /// Write the JSON result here as well as to stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct TargetArgs {
    /// URL template, e.g. https://dev.localhost:8443/secrets/k-{i}/?api-version=7.5
    #[arg(long)]
    url: String,
    #[arg(long, default_value = "GET")]
    method: String,
    /// Body template (sent with content-type application/json).
    #[arg(long)]
    body: Option<String>,
    /// Extra header "Name: value" (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// PEM file with the CA certificate(s) to trust (required for https).
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// Connect to this address instead of resolving the URL's host (SNI and Host stay the URL's).
    #[arg(long)]
    connect: Option<String>,
    /// Per-request timeout.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// Tokio worker threads (1 = single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Write the JSON result here as well as to stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Free-form label copied into the JSON.
    #[arg(long)]
    label: Option<String>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[arg(long, short = 'c', default_value_t = 64)]
    connections: usize,
    #[arg(long, short = 'd', default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    #[arg(long, short = 'w', default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// `{i}` is drawn uniformly from 0..keys.
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Server process whose CPU time (utime+stime) and RSS are sampled over the window.
    #[arg(long)]
    pid: Option<u32>,
    /// Print a progress line to stderr every N seconds (0 = never).
    #[arg(long, default_value_t = 0)]
    progress: u64,
}

#[derive(Args)]
struct PopulateArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[arg(long, short = 'c', default_value_t = 32)]
    connections: usize,
    #[arg(long)]
    count: u64,
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Stop (and report how far it got) after this long.
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    max_time: Duration,
    /// Attempts per item before it counts as failed.
    #[arg(long, default_value_t = 3)]
    attempts: u32,
    /// Stop everything after this many failed attempts.
    #[arg(long, default_value_t = 1000)]
    max_errors: u64,
    #[arg(long)]
    pid: Option<u32>,
    /// Progress line interval on stderr, seconds (0 = never).
    #[arg(long, default_value_t = 5)]
    progress: u64,
}

#[derive(Args)]
struct ColdArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Give up after this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// After the first success, wait this long and read the process' VmRSS (idle RSS).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    idle_wait: Duration,
    /// Server stdout/stderr go here (default: discarded).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Leave the server running (print its pid) instead of stopping it.
    #[arg(long)]
    keep: bool,
    /// The server command line.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("not a duration: {s:?} (e.g. 10s, 500ms, 2m)"))?;
    if !(v >= 0.0 && v.is_finite()) {
        return Err(format!("not a duration: {s:?}"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

// ---------------------------------------------------------------------------------------------
// Templates

#[derive(Clone, Debug)]
enum Part {
    Lit(String),
    I,
    Seq,
    Conn,
}

#[derive(Clone, Debug)]
struct Template(Vec<Part>);

impl Template {
    fn parse(s: &str) -> Template {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = s;
        while !rest.is_empty() {
            let (tok, part) = if rest.starts_with("{i}") {
                (3, Some(Part::I))
            } else if rest.starts_with("{seq}") {
                (5, Some(Part::Seq))
            } else if rest.starts_with("{conn}") {
                (6, Some(Part::Conn))
            } else {
                (0, None)
            };
            if let Some(p) = part {
                if !lit.is_empty() {
                    parts.push(Part::Lit(std::mem::take(&mut lit)));
                }
                parts.push(p);
                rest = &rest[tok..];
            } else {
                let c = rest.chars().next().unwrap();
                lit.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Template(parts)
    }

    fn render(&self, i: u64, seq: u64, conn: usize) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(96);
        for p in &self.0 {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::I => write!(out, "{i}").unwrap(),
                Part::Seq => write!(out, "{seq}").unwrap(),
                Part::Conn => write!(out, "{conn}").unwrap(),
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Target: URL, TLS, connecting

struct Target {
    authority: String,
    server_name: ServerName<'static>,
    addr: SocketAddr,
    path: Template,
    body: Option<Template>,
    method: Method,
    headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
    tls: Option<TlsConnector>,
    request_timeout: Duration,
    seq: AtomicU64,
}

fn parse_url(url: &str) -> Result<(bool, String, String, u16, String), AnyError> {
    let (scheme, rest) = url.split_once("://").ok_or("URL needs a scheme (https:// or http://)")?;
    let https = match scheme.to_ascii_lowercase().as_str() {
        "https" => true,
        "http" => false,
        other => return Err(format!("unsupported scheme {other:?}").into()),
    };
    let cut = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..cut];
    let mut path = rest[cut..].to_string();
    if path.is_empty() {
        path = "/".into();
    } else if path.starts_with('?') {
        path.insert(0, '/');
    }
    let default_port = if https { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("bad IPv6 authority")?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse()?,
            None => default_port,
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse()?),
            None => (authority.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err("URL has no host".into());
    }
    Ok((https, authority.to_string(), host, port, path))
}

impl Target {
    async fn new(a: &TargetArgs) -> Result<Arc<Target>, AnyError> {
        let (https, authority, host, port, path) = parse_url(&a.url)?;
        let addr: SocketAddr = match &a.connect {
            Some(c) => c.parse().map_err(|e| format!("--connect {c:?}: {e}"))?,
            None => tokio::net::lookup_host((host.as_str(), port))
                .await?
                .next()
                .ok_or_else(|| format!("{host} does not resolve"))?,
        };
        if !addr.ip().is_loopback() {
            return Err(format!("refusing to send load to {addr}: only loopback targets are allowed").into());
        }
        let tls = if https {
            let cacert = a.cacert.as_ref().ok_or("https needs --cacert")?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in
                CertificateDer::pem_file_iter(cacert).map_err(|e| format!("{}: {e}", cacert.display()))?
            {
                roots.add(cert.map_err(|e| format!("{}: {e}", cacert.display()))?)?;
            }
            if roots.is_empty() {
                return Err(format!("{}: no certificate", cacert.display()).into());
            }
            let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(TlsConnector::from(Arc::new(cfg)))
        } else {
            None
        };
        let server_name =
            ServerName::try_from(host.clone()).map_err(|e| format!("server name {host:?}: {e}"))?;
        let mut headers = Vec::new();
        for h in &a.headers {
            let (n, v) = h.split_once(':').ok_or_else(|| format!("header {h:?} is not \"Name: value\""))?;
            headers.push((
                hyper::header::HeaderName::from_bytes(n.trim().as_bytes())?,
                hyper::header::HeaderValue::from_str(v.trim())?,
            ));
        }
        Ok(Arc::new(Target {
            authority,
            server_name,
            addr,
            path: Template::parse(&path),
            body: a.body.as_deref().map(Template::parse),
            method: Method::from_bytes(a.method.to_ascii_uppercase().as_bytes())?,
            headers,
            tls,
            request_timeout: a.request_timeout,
            seq: AtomicU64::new(0),
        }))
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, AnyError> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let io: Box<dyn Io> = match &self.tls {
            Some(tls) => Box::new(tls.connect(self.server_name.clone(), tcp).await?),
            None => Box::new(tcp),
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn request(&self, i: u64, conn: usize) -> Request<Full<Bytes>> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut b = Request::builder()
            .method(self.method.clone())
            .uri(self.path.render(i, seq, conn))
            .header(hyper::header::HOST, self.authority.as_str());
        for (n, v) in &self.headers {
            b = b.header(n, v);
        }
        let body = match &self.body {
            Some(t) => {
                b = b.header(hyper::header::CONTENT_TYPE, "application/json");
                Bytes::from(t.render(i, seq, conn))
            }
            None => Bytes::new(),
        };
        b.body(Full::new(body)).expect("valid request")
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One request on an open connection: Ok(status, connection reusable) or a transport error.
async fn exchange(
    t: &Target,
    sender: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, bool), AnyError> {
    let fut = async {
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let close = resp
            .headers()
            .get(hyper::header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        resp.into_body().collect().await?;
        Ok::<_, AnyError>((status, !close))
    };
    match tokio::time::timeout(t.request_timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err("request timed out".into()),
    }
}

// ---------------------------------------------------------------------------------------------
// /proc sampling

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as f64
    } else {
        100.0
    }
}

/// utime+stime of a process, in seconds.
fn proc_cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after "(comm)" start at field 3 (state); utime is field 14, stime 15.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clk_tck())
}

/// CPU time spent busy by the whole machine (all cores; everything but idle and iowait), seconds.
fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    let total: f64 = v.iter().take(8).sum(); // user nice system idle iowait irq softirq steal
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0.0);
    Some((total - idle) / clk_tck())
}

/// (VmRSS, VmHWM) in KiB.
fn proc_rss_kib(pid: &str) -> (Option<u64>, Option<u64>) {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return (None, None) };
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    (field("VmRSS:"), field("VmHWM:"))
}

// ---------------------------------------------------------------------------------------------
// Timed and counted load

#[derive(Default)]
struct Stats {
    ok: u64,
    non2xx: u64,
    transport: u64,
    warmup_errors: u64,
    status: BTreeMap<u16, u64>,
    sample: Option<String>,
}

impl Stats {
    fn merge(&mut self, o: Stats) {
        self.ok += o.ok;
        self.non2xx += o.non2xx;
        self.transport += o.transport;
        self.warmup_errors += o.warmup_errors;
        for (k, v) in o.status {
            *self.status.entry(k).or_default() += v;
        }
        if self.sample.is_none() {
            self.sample = o.sample;
        }
    }
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// What a connection works on.
enum Work {
    /// Until `end`; record completions in [ws, end); `{i}` random in 0..keys.
    Timed { ws: Instant, end: Instant, keys: u64 },
    /// Sequential `{i}` from a shared counter, until `end_index` or `deadline`.
    Counted {
        next: Arc<AtomicU64>,
        end_index: u64,
        deadline: Instant,
        attempts: u32,
        done: Arc<AtomicU64>,
        /// Lowest index given up on (u64::MAX: none): everything below it is stored.
        first_failed: Arc<AtomicU64>,
        /// Failed attempts so far, and the limit past which everything stops (server gone).
        errors: Arc<AtomicU64>,
        max_errors: u64,
    },
}

async fn connection(
    t: Arc<Target>,
    id: usize,
    mut sender: Option<SendRequest<Full<Bytes>>>,
    work: Arc<Work>,
    stop: Arc<AtomicBool>,
) -> (Histogram<u64>, Stats) {
    let mut hist = new_hist();
    let mut st = Stats::default();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ ((id as u64 + 1) * 0xD1B5_4A32_D192_ED03));
    // For counted work: the item in progress and its attempts so far.
    let mut pending: Option<(u64, u32)> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let now = Instant::now();
        let (i, counted) = match &*work {
            Work::Timed { end, keys, .. } => {
                if now >= *end {
                    break;
                }
                (rng.next() % (*keys).max(1), false)
            }
            Work::Counted { next, end_index, deadline, .. } => {
                if now >= *deadline {
                    break;
                }
                match pending {
                    Some((i, _)) => (i, true),
                    None => {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= *end_index {
                            break;
                        }
                        pending = Some((i, 0));
                        (i, true)
                    }
                }
            }
        };
        let s = match sender.as_mut() {
            Some(s) => s,
            None => match t.connect().await {
                Ok(s) => sender.insert(s),
                Err(e) => {
                    let in_window = match &*work {
                        Work::Timed { ws, .. } => Instant::now() >= *ws,
                        Work::Counted { .. } => true,
                    };
                    if in_window {
                        st.transport += 1;
                    } else {
                        st.warmup_errors += 1;
                    }
                    st.sample.get_or_insert_with(|| format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if counted {
                        retry_or_fail(&mut pending, &work, &stop);
                    }
                    continue;
                }
            },
        };
        let req = t.request(i, id);
        let t0 = Instant::now();
        let res = exchange(&t, s, req).await;
        let t1 = Instant::now();
        let in_window = match &*work {
            Work::Timed { ws, end, .. } => t1 >= *ws && t1 < *end,
            Work::Counted { .. } => true,
        };
        let us = (t1 - t0).as_micros().max(1) as u64;
        match res {
            Ok((status, reusable)) => {
                if !reusable {
                    sender = None;
                }
                if status.is_success() {
                    if in_window {
                        st.ok += 1;
                        let _ = hist.record(us.min(hist.high()));
                        *st.status.entry(status.as_u16()).or_default() += 1;
                    }
                    if let Work::Counted { done, .. } = &*work {
                        done.fetch_add(1, Ordering::Relaxed);
                        pending = None;
                    }
                } else {
                    if in_window {
                        st.non2xx += 1;
                        *st.status.entry(status.as_u16()).or_default() += 1;
                    } else {
                        st.warmup_errors += 1;
                    }
                    st.sample.get_or_insert_with(|| format!("HTTP {status}"));
                    if counted {
                        retry_or_fail(&mut pending, &work, &stop);
                    }
                }
            }
            Err(e) => {
                sender = None;
                if in_window {
                    st.transport += 1;
                } else {
                    st.warmup_errors += 1;
                }
                st.sample.get_or_insert_with(|| format!("transport: {e}"));
                if counted {
                    retry_or_fail(&mut pending, &work, &stop);
                }
            }
        }
    }
    if let (Some((i, _)), Work::Counted { first_failed, .. }) = (pending, &*work) {
        first_failed.fetch_min(i, Ordering::Relaxed); // abandoned at the deadline or on stop
    }
    (hist, st)
}

/// Counted work: retry the pending item until its attempts run out, then drop it. Stops all
/// connections once failures pass the limit (the server is gone: no point burning the budget).
fn retry_or_fail(pending: &mut Option<(u64, u32)>, work: &Work, stop: &AtomicBool) {
    if let (Some((i, n)), Work::Counted { attempts, first_failed, errors, max_errors, .. }) = (*pending, work)
    {
        if errors.fetch_add(1, Ordering::Relaxed) + 1 > *max_errors {
            stop.store(true, Ordering::Relaxed);
        }
        if n + 1 >= *attempts {
            first_failed.fetch_min(i, Ordering::Relaxed);
            *pending = None; // already counted as an error; give up on this item
        } else {
            *pending = Some((i, n + 1));
        }
    }
}

fn ms(us: u64) -> f64 {
    (us as f64) / 1000.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({});
    }
    json!({
        "p50_ms": round3(ms(h.value_at_quantile(0.50))),
        "p90_ms": round3(ms(h.value_at_quantile(0.90))),
        "p99_ms": round3(ms(h.value_at_quantile(0.99))),
        "p999_ms": round3(ms(h.value_at_quantile(0.999))),
        "max_ms": round3(ms(h.max())),
        "mean_ms": round3(h.mean() / 1000.0),
    })
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
    .expect("tokio runtime")
}

/// CPU time (user + system) this thread has used.
fn thread_cpu() -> Duration {
    // SAFETY: getrusage writes one `rusage` into the zeroed value it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    assert_eq!(rc, 0, "getrusage(RUSAGE_THREAD)");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The cost of the one thing a durable commit cannot avoid: journals overwrite preallocated
/// blocks and `fdatasync` them, as Coffer's audit journal does. Why in the bench: an audited
/// request waits for such a commit and pays a share of its CPU, so this is the floor under the
/// audit's cost on the machine the figures come from.
fn commit_probe(a: &CommitProbeArgs) -> Result<Value, AnyError> {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    const FILE_BYTES: usize = 8 << 20;
    if a.bytes == 0 || a.bytes > FILE_BYTES / 2 || a.count == 0 {
        return Err("commit-probe: --bytes must be 1..=4 MiB and --count at least 1".into());
    }
    let path = a.dir.join(format!(".commit-probe-{}", std::process::id()));
    let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
    let result = (|| -> Result<Value, AnyError> {
        // SAFETY: a plain syscall on an open descriptor.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, FILE_BYTES as libc::off_t) };
        if rc != 0 {
            return Err(format!(
                "posix_fallocate {}: {}",
                path.display(),
                std::io::Error::from_raw_os_error(rc)
            )
            .into());
        }
        file.sync_all()?;
        let buf: Vec<u8> = (0..a.bytes).map(|i| (i * 131 % 251) as u8).collect();
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let (mut offset, cpu0, wall0) = (0usize, thread_cpu(), Instant::now());
        for _ in 0..a.count {
            if offset + a.bytes > FILE_BYTES {
                offset = 0;
            }
            let t = Instant::now();
            file.write_all_at(&buf, offset as u64)?;
            file.sync_data()?;
            h.saturating_record(t.elapsed().as_micros() as u64);
            offset += a.bytes.div_ceil(4096) * 4096;
        }
        let (cpu, wall) = (thread_cpu() - cpu0, wall0.elapsed());
        let us = |q: f64| h.value_at_quantile(q);
        Ok(json!({
            "commits": a.count,
            "bytes_per_commit": a.bytes,
            "p50_us": us(0.50),
            "p90_us": us(0.90),
            "p99_us": us(0.99),
            "mean_us": (h.mean() * 10.0).round() / 10.0,
            "cpu_us_per_commit": (cpu.as_secs_f64() * 1e6 / a.count as f64 * 10.0).round() / 10.0,
            "wall_s": (wall.as_secs_f64() * 1000.0).round() / 1000.0,
        }))
    })();
    let _ = std::fs::remove_file(&path);
    result
}

fn emit(out: &Option<PathBuf>, v: &Value) -> Result<(), AnyError> {
    let s = serde_json::to_string_pretty(v)?;
    println!("{s}");
    if let Some(p) = out {
        std::fs::write(p, format!("{s}\n"))?;
    }
    Ok(())
}

fn merge_object(v: &mut Value, extra: Value) {
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
}

async fn preconnect(t: &Arc<Target>, n: usize) -> Vec<Option<SendRequest<Full<Bytes>>>> {
    let mut handles = Vec::with_capacity(n);
    for _ in 0..n {
        let t = t.clone();
        handles.push(tokio::spawn(async move { t.connect().await }));
    }
    let mut out = Vec::with_capacity(n);
    let mut first_err = None;
    for h in handles {
        match h.await {
            Ok(Ok(s)) => out.push(Some(s)),
            Ok(Err(e)) => {
                first_err.get_or_insert(e.to_string());
                out.push(None)
            }
            Err(e) => {
                first_err.get_or_insert(e.to_string());
                out.push(None)
            }
        }
    }
    if let Some(e) = first_err {
        eprintln!("loadgen: some connections failed to open ({e}); they retry during the run");
    }
    out
}

async fn run(a: RunArgs) -> Result<Value, AnyError> {
    let t = Target::new(&a.target).await?;
    let senders = preconnect(&t, a.connections).await;
    let start = Instant::now();
    let ws = start + a.warmup;
    let end = ws + a.duration;
    let work = Arc::new(Work::Timed { ws, end, keys: a.keys });
    let stop = Arc::new(AtomicBool::new(false));

    // CPU / RSS sampling at the window's edges.
    let pid = a.pid.map(|p| p.to_string());
    let sampler = tokio::spawn(async move {
        tokio::time::sleep_until(ws.into()).await;
        let s0 = (
            Instant::now(),
            pid.as_deref().and_then(proc_cpu_secs),
            proc_cpu_secs("self"),
            machine_busy_secs(),
        );
        tokio::time::sleep_until(end.into()).await;
        let s1 = (
            Instant::now(),
            pid.as_deref().and_then(proc_cpu_secs),
            proc_cpu_secs("self"),
            machine_busy_secs(),
        );
        let rss = pid.as_deref().map(proc_rss_kib);
        (s0, s1, rss)
    });
    if a.progress > 0 {
        let every = Duration::from_secs(a.progress);
        let label = a.target.label.clone().unwrap_or_default();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let phase = if now < ws { "warm-up" } else { "measuring" };
                eprintln!(
                    "  {label} {phase} {:.0}s/{:.0}s",
                    (now - start).as_secs_f64(),
                    (end - start).as_secs_f64()
                );
            }
        });
    }
    let mut handles = Vec::new();
    for (id, s) in senders.into_iter().enumerate() {
        handles.push(tokio::spawn(connection(t.clone(), id, s, work.clone(), stop.clone())));
    }
    let mut hist = new_hist();
    let mut st = Stats::default();
    for h in handles {
        let (hh, s) = h.await?;
        hist.add(&hh)?;
        st.merge(s);
    }
    let ((t0, srv0, cli0, m0), (t1, srv1, cli1, m1), rss) = sampler.await?;
    let window = (t1 - t0).as_secs_f64().max(1e-9);
    let completed = st.ok + st.non2xx;
    let errors = st.non2xx + st.transport;
    let mut v = json!({
        "label": a.target.label,
        "url": a.target.url,
        "method": a.target.method.to_ascii_uppercase(),
        "connections": a.connections,
        "keys": a.keys,
        "warmup_s": a.warmup.as_secs_f64(),
        "duration_s": round3(window),
        "count": st.ok,
        "rps": round3(st.ok as f64 / window),
        "errors": errors,
        "errors_non2xx": st.non2xx,
        "errors_transport": st.transport,
        "warmup_errors": st.warmup_errors,
        "status_counts": st.status.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "error_sample": st.sample,
    });
    merge_object(&mut v, latency_json(&hist));
    if let (Some(c0), Some(c1)) = (cli0, cli1) {
        v["client"] = json!({
            "cpu_s": round3(c1 - c0),
            "cpu_us_per_req": if completed > 0 { Value::from(round3((c1 - c0) * 1e6 / completed as f64)) } else { Value::Null },
            "cpu_util": round3((c1 - c0) / window),
        });
    }
    if let (Some(m0), Some(m1)) = (m0, m1) {
        let busy = m1 - m0;
        let mut machine = json!({ "busy_cores": round3(busy / window) });
        if let (Some(c0), Some(c1), Some(s0), Some(s1)) = (cli0, cli1, srv0, srv1) {
            // Whatever else ran on the machine meanwhile (other builds, background work): noise.
            machine["other_cores"] = json!(round3(((busy - (c1 - c0) - (s1 - s0)) / window).max(0.0)));
        }
        v["machine"] = machine;
    }
    if let Some(pid) = a.pid {
        let mut server = json!({ "pid": pid });
        if let (Some(c0), Some(c1)) = (srv0, srv1) {
            server["cpu_s"] = json!(round3(c1 - c0));
            server["cpu_util"] = json!(round3((c1 - c0) / window));
            server["cpu_us_per_req"] =
                if completed > 0 { json!(round3((c1 - c0) * 1e6 / completed as f64)) } else { Value::Null };
        }
        if let Some((rss, hwm)) = rss {
            server["vm_rss_kib"] = json!(rss);
            server["vm_hwm_kib"] = json!(hwm);
        }
        v["server"] = server;
    }
    Ok(v)
}

async fn populate(a: PopulateArgs) -> Result<Value, AnyError> {
    let t = Target::new(&a.target).await?;
    let senders = preconnect(&t, a.connections).await;
    let start = Instant::now();
    let deadline = start + a.max_time;
    let next = Arc::new(AtomicU64::new(a.start));
    let done = Arc::new(AtomicU64::new(0));
    let end_index = a.start.saturating_add(a.count);
    let first_failed = Arc::new(AtomicU64::new(u64::MAX));
    let work = Arc::new(Work::Counted {
        next: next.clone(),
        end_index,
        deadline,
        attempts: a.attempts.max(1),
        done: done.clone(),
        first_failed: first_failed.clone(),
        errors: Arc::new(AtomicU64::new(0)),
        max_errors: a.max_errors,
    });
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = a.pid.and_then(|p| proc_cpu_secs(&p.to_string()));
    let progress = if a.progress > 0 {
        let done = done.clone();
        let label = a.target.label.clone().unwrap_or_else(|| "populate".into());
        let count = a.count;
        let every = Duration::from_secs(a.progress);
        Some(tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(every).await;
                let d = done.load(Ordering::Relaxed);
                let now = Instant::now();
                let rate = (d - last.1) as f64 / (now - last.0).as_secs_f64();
                let eta = if rate > 0.0 { (count.saturating_sub(d)) as f64 / rate } else { f64::INFINITY };
                eprintln!(
                    "  {label}: {d}/{count} ({:.0}/s now, {:.0}s elapsed, ETA {:.0}s)",
                    rate,
                    (now - start).as_secs_f64(),
                    eta
                );
                last = (now, d);
            }
        }))
    } else {
        None
    };
    let mut handles = Vec::new();
    for (id, s) in senders.into_iter().enumerate() {
        handles.push(tokio::spawn(connection(t.clone(), id, s, work.clone(), stop.clone())));
    }
    let mut hist = new_hist();
    let mut st = Stats::default();
    for h in handles {
        let (hh, s) = h.await?;
        hist.add(&hh)?;
        st.merge(s);
    }
    if let Some(p) = progress {
        p.abort();
    }
    let secs = start.elapsed().as_secs_f64();
    let ok = done.load(Ordering::Relaxed);
    let reached = next.load(Ordering::Relaxed).min(end_index);
    let mut v = json!({
        "label": a.target.label,
        "url": a.target.url,
        "method": a.target.method.to_ascii_uppercase(),
        "connections": a.connections,
        "start": a.start,
        "requested": a.count,
        "done": ok,
        "next_index": reached,
        // Every index in start..complete_prefix is stored (the rest may have gaps).
        "complete_prefix": first_failed.load(Ordering::Relaxed).min(reached),
        "stopped_on_errors": stop.load(Ordering::Relaxed),
        "complete": ok == a.count,
        "timed_out": Instant::now() >= deadline && reached < end_index,
        "secs": round3(secs),
        "rps": round3(ok as f64 / secs.max(1e-9)),
        "errors": st.non2xx + st.transport,
        "status_counts": st.status.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "error_sample": st.sample,
    });
    merge_object(&mut v, latency_json(&hist));
    if let (Some(p), Some(c0)) = (a.pid, cpu0) {
        if let Some(c1) = proc_cpu_secs(&p.to_string()) {
            v["server_cpu_us_per_req"] = json!(round3((c1 - c0) * 1e6 / (ok.max(1)) as f64));
        }
    }
    Ok(v)
}

async fn coldstart(a: ColdArgs) -> Result<Value, AnyError> {
    let t = Target::new(&a.target).await?;
    let (stdout, stderr) = match &a.log {
        Some(p) => {
            let f = std::fs::File::create(p)?;
            (std::process::Stdio::from(f.try_clone()?), std::process::Stdio::from(f))
        }
        None => (std::process::Stdio::null(), std::process::Stdio::null()),
    };
    let t0 = Instant::now();
    let mut child = std::process::Command::new(&a.command[0])
        .args(&a.command[1..])
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", a.command[0]))?;
    let pid = child.id();
    let deadline = t0 + a.timeout;
    let mut attempts = 0u64;
    let mut last = String::from("no attempt");
    let result: Result<Duration, String> = loop {
        if Instant::now() >= deadline {
            break Err(format!("no 2xx within {:?} (last: {last})", a.timeout));
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(format!("server exited early: {status}"));
        }
        attempts += 1;
        let once = async {
            let mut s = t.connect().await?;
            exchange(&t, &mut s, t.request(0, 0)).await
        };
        match tokio::time::timeout(Duration::from_secs(2), once).await {
            Ok(Ok((status, _))) if status.is_success() => break Ok(t0.elapsed()),
            Ok(Ok((status, _))) => last = format!("HTTP {status}"),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "attempt timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let mut v = json!({ "label": a.target.label, "pid": pid, "attempts": attempts });
    match &result {
        Ok(d) => {
            v["cold_start_ms"] = json!(round3(d.as_secs_f64() * 1000.0));
            tokio::time::sleep(a.idle_wait).await;
            let (rss, hwm) = proc_rss_kib(&pid.to_string());
            v["idle_wait_s"] = json!(a.idle_wait.as_secs_f64());
            v["vm_rss_kib"] = json!(rss);
            v["vm_hwm_kib"] = json!(hwm);
        }
        Err(e) => v["error"] = json!(e),
    }
    if a.keep && result.is_ok() {
        v["kept_running"] = json!(true);
        std::mem::forget(child);
    } else {
        // SAFETY: kill(2) on the pid of the child this process spawned and has not reaped.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let stop_by = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if Instant::now() >= stop_by {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if let Err(e) = result {
        emit(&a.target.out, &v)?;
        return Err(e.into());
    }
    Ok(v)
}

fn main() {
    let cli = Cli::parse();
    if let Cmd::CommitProbe(a) = &cli.cmd {
        if let Err(e) = commit_probe(a).and_then(|v| emit(&a.out, &v)) {
            eprintln!("loadgen: {e}");
            std::process::exit(1);
        }
        return;
    }
    let (threads, out) = match &cli.cmd {
        Cmd::Run(a) => (a.target.threads, a.target.out.clone()),
        Cmd::Populate(a) => (a.target.threads, a.target.out.clone()),
        Cmd::Coldstart(a) => (1, a.target.out.clone()),
        Cmd::CommitProbe(_) => unreachable!("handled above"),
    };
    let rt = runtime(threads);
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Run(a) => run(a).await,
            Cmd::Populate(a) => populate(a).await,
            Cmd::Coldstart(a) => coldstart(a).await,
            Cmd::CommitProbe(_) => unreachable!("handled above"),
        }
    });
    match result.and_then(|v| emit(&out, &v)) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_probe_reports_its_commits_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("commit-probe-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let args = |count, bytes| CommitProbeArgs { dir: dir.clone(), count, bytes, out: None };
        let v = commit_probe(&args(5, 10_000)).unwrap();
        assert_eq!((v["commits"].as_u64(), v["bytes_per_commit"].as_u64()), (Some(5), Some(10_000)));
        let (p50, p99) = (v["p50_us"].as_u64().unwrap(), v["p99_us"].as_u64().unwrap());
        assert!(p50 >= 1 && p50 <= p99, "{v}");
        assert!(v["cpu_us_per_commit"].as_f64().unwrap() >= 0.0, "{v}");
        assert!(commit_probe(&args(0, 10)).is_err());
        assert!(commit_probe(&args(1, 8 << 20)).is_err());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "the scratch file is removed");
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn templates_render() {
        let t = Template::parse("/secrets/k-{i}/?v={seq}&c={conn}{");
        assert_eq!(t.render(7, 9, 3), "/secrets/k-7/?v=9&c=3{");
    }

    #[test]
    fn urls_parse() {
        let (https, auth, host, port, path) = parse_url("https://dev.localhost:8443/secrets?x=1").unwrap();
        assert!(https);
        assert_eq!(
            (auth.as_str(), host.as_str(), port, path.as_str()),
            ("dev.localhost:8443", "dev.localhost", 8443, "/secrets?x=1")
        );
        let (_, _, host, port, path) = parse_url("http://[::1]:99?a=b").unwrap();
        assert_eq!((host.as_str(), port, path.as_str()), ("::1", 99, "/?a=b"));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    }
}
