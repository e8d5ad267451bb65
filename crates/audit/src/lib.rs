//! Coffer's audit log: one record per request, durable before the request is answered,
//! hash-chained, with signed checkpoints, rotated JSON-lines files and an SQLite index for
//! queries. See `README.md` in this crate for the file layout, the formats and the exact
//! guarantees of [`verify`].
//!
//! * [`AuditLog::open`] resumes (or starts) the log in [`AuditConfig::dir`].
//! * [`AuditLog::record`] resolves once the record is fsync'd in the JSONL file *and* committed
//!   in the index; concurrent callers share one write, one fsync and one transaction (group
//!   commit). An `Err` means the record is not durable: the caller must fail the request (503).
//! * [`AuditLog::query`] answers from indexed columns.
//! * [`verify`] checks files offline with the exported public key.
//!
//! No field can carry a secret value, token, client secret or passphrase; credentials appear
//! only as [`AuditLog::hmac`] output (`hmac-sha256:<hex>`), which [`AuditLog::record`] enforces.

mod canon;
mod event;
mod files;
mod index;
mod indexer;
mod journal;
mod keys;
mod verify;
mod writer;

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use zeroize::Zeroizing;

pub use keys::{generate_signing_key, public_key_pem_from_pkcs8};
pub use verify::{verify, verify_with_keys, Problem, ProblemKind, VerifyReport};

/// The line parser and canonical writer that [`verify`] relies on, for the fuzz targets in
/// `fuzz/` (see `fuzz/README.md`). Not an API: nothing else calls them.
#[doc(hidden)]
pub mod fuzzing {
    use crate::files::{self, Kind};

    /// One line of a log file as verify classifies it.
    #[derive(Debug)]
    pub struct Line {
        /// 1-based line number.
        pub line: u64,
        /// Byte range of the line, without its newline.
        pub start: usize,
        pub end: usize,
        /// `Some((seq, prevHash, hash stored, hash computed))` for a record.
        pub record: Option<(u64, String, String, String)>,
    }

    /// The lines of a file and its torn tail (bytes after the last newline), as verify reads them.
    pub fn parse_lines(bytes: &[u8]) -> (Vec<Line>, Option<(usize, usize)>) {
        let parsed = files::parse_lines(bytes);
        let lines = parsed
            .entries
            .into_iter()
            .map(|e| Line {
                line: e.line,
                start: e.start,
                end: e.end,
                record: match e.kind {
                    Kind::Rec(r) => Some((r.seq, r.prev, r.hash, r.computed)),
                    _ => None,
                },
            })
            .collect();
        (lines, parsed.torn)
    }

    /// A line classified by the fast path verify takes first and by the general path alone:
    /// they must agree.
    pub fn classify_both_ways(line: &[u8]) -> (String, String) {
        (format!("{:?}", files::parse_line(line)), format!("{:?}", files::parse_line_slow(line)))
    }

    /// The canonical JSON that records' hashes and checkpoints' signatures are computed over.
    pub fn canonical(v: &serde_json::Value) -> Vec<u8> {
        crate::canon::canonical(v)
    }
}

/// Where and how the audit log is written.
#[derive(Clone)]
pub struct AuditConfig {
    /// Holds `audit.jsonl`, the rotated `audit-<first>-<last>.jsonl` files, `index.sqlite` and
    /// a `lock` file. Created (0700) if missing.
    pub dir: PathBuf,
    /// Also print every durable record and checkpoint as one JSON line on stdout.
    pub stdout: bool,
    /// Rotate `audit.jsonl` once it is at least this large (default 64 MiB).
    pub max_file_bytes: u64,
    /// … or once its first line is this old (default 24 h).
    pub max_file_age: Duration,
    /// Delete rotated files (and their index rows) whose newest record is older than this.
    /// `None` keeps everything.
    pub retention: Option<Duration>,
    /// Also delete the oldest rotated files while all rotated files together exceed this many
    /// bytes (checked after every rotation; the same signed `prunedThrough` as retention, so
    /// `verify` still passes). `None` (default): no size bound. The active file is never
    /// deleted, so the directory holds up to this plus `max_file_bytes`, the index and the
    /// journal.
    pub max_total_bytes: Option<u64>,
    /// Write a signed checkpoint after this many records (default 1000) …
    pub checkpoint_every: u64,
    /// … or this long after the previous one (default 60 s), whichever comes first, and only
    /// if there are new records.
    pub checkpoint_interval: Duration,
    /// Key of the keyed hash used for credentials ([`AuditLog::hmac`]).
    pub hmac_key: Zeroizing<[u8; 32]>,
    /// Checkpoint signing key: **Ed25519**, PKCS#8 DER (v1 or v2). See [`generate_signing_key`].
    pub signing_key_pkcs8: Zeroizing<Vec<u8>>,
    /// Group commit: at most this many records per write + fsync + transaction (default 512).
    pub max_batch: usize,
    /// Group commit pacing (default 2 ms; zero turns it off). While commits are busy (a batch of
    /// more than 16 records, until one of fewer than 8), the writer starts a commit no sooner
    /// than this after the previous one began, so each fsync and head signature covers more
    /// records. Under light or moderate concurrency it commits as soon as it can.
    pub pace: Duration,
    /// Recovery flag (default `false`). When [`AuditLog::open`] finds the log damaged where it
    /// cannot be explained by a crash (a record covered by the signed head is missing or
    /// altered, the head or the files are missing, complete but corrupt lines after the head),
    /// it refuses with [`AuditError::Damaged`]. With `recover = true` it instead keeps the
    /// damaged file as it is (renamed as a rotated file, so `verify` keeps reporting the
    /// damage), starts a new file with a signed checkpoint that names the reason, and continues
    /// the sequence numbers after everything seen.
    pub recover: bool,
    /// Size of the commit journal, a pre-zeroed file beside the log that makes each group
    /// commit durable without fsyncing the growing `audit.jsonl` (default 8 MiB; zero turns it
    /// off and every commit fsyncs `audit.jsonl`). See `journal.rs`.
    pub journal_bytes: u64,
}

impl AuditConfig {
    /// A configuration with the defaults above.
    pub fn new(
        dir: impl Into<PathBuf>,
        hmac_key: Zeroizing<[u8; 32]>,
        signing_key_pkcs8: Zeroizing<Vec<u8>>,
    ) -> Self {
        Self {
            dir: dir.into(),
            stdout: false,
            max_file_bytes: 64 * 1024 * 1024,
            max_file_age: Duration::from_secs(24 * 3600),
            retention: None,
            max_total_bytes: None,
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(60),
            hmac_key,
            signing_key_pkcs8,
            max_batch: 512,
            pace: Duration::from_millis(2),
            recover: false,
            journal_bytes: 8 * 1024 * 1024,
        }
    }
}

impl fmt::Debug for AuditConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditConfig")
            .field("dir", &self.dir)
            .field("stdout", &self.stdout)
            .field("max_file_bytes", &self.max_file_bytes)
            .field("max_file_age", &self.max_file_age)
            .field("retention", &self.retention)
            .field("max_total_bytes", &self.max_total_bytes)
            .field("checkpoint_every", &self.checkpoint_every)
            .field("checkpoint_interval", &self.checkpoint_interval)
            .field("hmac_key", &"<redacted>")
            .field("signing_key_pkcs8", &"<redacted>")
            .field("max_batch", &self.max_batch)
            .field("pace", &self.pace)
            .field("recover", &self.recover)
            .field("journal_bytes", &self.journal_bytes)
            .finish()
    }
}

/// The outcome of a request, as recorded (`resultType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AuditResult {
    /// Authorized and served (`"Success"`).
    Allowed,
    /// Refused by authentication, authorization or a limit (`"Denied"`): 401, 403, 429 ….
    Denied,
    /// Authorized but failed (`"Failed"`): 404, 409, 5xx ….
    Failed,
}

impl AuditResult {
    /// The `resultType` written in records.
    pub fn result_type(self) -> &'static str {
        match self {
            AuditResult::Allowed => "Success",
            AuditResult::Denied => "Denied",
            AuditResult::Failed => "Failed",
        }
    }
}

impl FromStr for AuditResult {
    type Err = String;
    /// Accepts `allowed`/`success`, `denied`, `failed` (any case).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "allowed" | "success" => Ok(AuditResult::Allowed),
            "denied" => Ok(AuditResult::Denied),
            "failed" => Ok(AuditResult::Failed),
            _ => Err(format!("unknown audit result {s:?} (expected allowed, denied or failed)")),
        }
    }
}

/// Attested facts about the calling process (managed identities).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessFacts {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub exe: String,
    pub cgroup: Option<String>,
}

/// Who made the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPrincipal {
    pub id: String,
    pub display_name: String,
    /// e.g. `User`, `ServicePrincipal`, `ManagedIdentity`.
    pub kind: String,
    /// The agent that vouched for a managed identity.
    pub agent: Option<String>,
    pub process: Option<ProcessFacts>,
}

/// What the request was about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditResource {
    pub vault: Option<String>,
    pub secret: Option<String>,
    pub version: Option<String>,
}

/// One request, as the server saw it. Strings longer than 1024 bytes are cut (at a character
/// boundary, marked with `…`).
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub time: SystemTime,
    pub request_id: String,
    /// Key Vault's operation name where one exists (`SecretGet`, `SecretSet`, …).
    pub operation: String,
    pub result: AuditResult,
    pub status: u16,
    pub duration_ms: f64,
    pub client_ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    pub principal: Option<AuditPrincipal>,
    pub resource: AuditResource,
    /// The role assignment or role that allowed the request.
    pub grant: Option<String>,
    pub denial_reason: Option<String>,
    /// Must be output of [`AuditLog::hmac`]; anything else is rejected by [`AuditLog::record`].
    pub credential_hmac: Option<String>,
}

/// Errors of the audit log. Every error of [`AuditLog::record`] means "not durable": fail the
/// request closed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The record could not be written durably (disk full, I/O error, index failure).
    #[error("audit log unavailable: {0}")]
    Unavailable(String),
    /// The log was shut down (or its writer stopped).
    #[error("audit log is closed")]
    Closed,
    /// [`AuditLog::open`] found damage it will not repair without [`AuditConfig::recover`].
    #[error("audit log damaged: {0}")]
    Damaged(String),
    /// Another process (or another [`AuditLog`]) holds the directory.
    #[error("audit directory {0} is in use by another audit log")]
    Locked(PathBuf),
    #[error("invalid audit configuration: {0}")]
    Config(String),
    /// The event was refused (e.g. a credential that is not an HMAC).
    #[error("invalid audit event: {0}")]
    InvalidEvent(String),
    #[error("audit query failed: {0}")]
    Query(String),
    #[error("audit I/O error: {0}")]
    Io(String),
}

/// Filters for [`AuditLog::query`]. All given filters must match. Results come in order of
/// record `time` (the request's time), ties by `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditQuery {
    /// `time >= since`.
    pub since: Option<SystemTime>,
    /// `time < until`.
    pub until: Option<SystemTime>,
    /// Principal id or display name (case-insensitive).
    pub principal: Option<String>,
    /// Secret name (case-insensitive, as Key Vault names are).
    pub secret: Option<String>,
    /// Vault name (case-insensitive).
    pub vault: Option<String>,
    /// Operation name (case-insensitive).
    pub operation: Option<String>,
    pub result: Option<AuditResult>,
    /// Page size: 0 means 100; capped at 1000.
    pub limit: usize,
    /// Cursor: only records after the record with this `seq` (results are in seq order); pass the
    /// previous page's [`AuditPage::next`].
    pub after: Option<u64>,
}

impl Default for AuditQuery {
    fn default() -> Self {
        Self {
            since: None,
            until: None,
            principal: None,
            secret: None,
            vault: None,
            operation: None,
            result: None,
            limit: 100,
            after: None,
        }
    }
}

/// One page of records (the stored JSON lines, parsed).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditPage {
    pub records: Vec<serde_json::Value>,
    /// `Some(seq of the last record)` when more records match: pass it as
    /// [`AuditQuery::after`] for the next page.
    pub next: Option<u64>,
}

/// Counters since [`AuditLog::open`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Records acknowledged.
    pub records: u64,
    /// Group commits: each is one write + fsync of the JSONL file and one index transaction.
    pub batches: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Files rotated.
    pub rotations: u64,
    /// Batches that failed (their records were not acknowledged).
    pub failed_batches: u64,
    /// Rotated files deleted by retention.
    pub pruned_files: u64,
}

/// What an audit directory takes on disk, and what its filesystem has left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskUsage {
    /// Bytes available to the server on the directory's filesystem (`statvfs`'s `f_bavail`).
    pub free_bytes: u64,
    /// Size of that filesystem.
    pub filesystem_bytes: u64,
    /// Every file in the directory (the log files, the index, the journal).
    pub dir_bytes: u64,
    /// The rotated files alone: what a size bound ([`AuditConfig::max_total_bytes`]) limits.
    pub rotated_bytes: u64,
}

/// [`AuditLog::disk_usage`] for `dir`.
pub fn disk_usage(dir: &Path) -> std::io::Result<DiskUsage> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path holds a NUL byte"))?;
    // SAFETY: `path` is NUL-terminated and `stat` is a plain C struct that statvfs fills in.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = stat.f_frsize as u64;
    let mut usage = DiskUsage {
        free_bytes: (stat.f_bavail as u64).saturating_mul(frsize),
        filesystem_bytes: (stat.f_blocks as u64).saturating_mul(frsize),
        ..DiskUsage::default()
    };
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        // A file removed meanwhile (rotation's temporary file, pruning) counts as gone.
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        usage.dir_bytes += meta.len();
        if entry.file_name().to_str().and_then(files::parse_rotated_name).is_some() {
            usage.rotated_bytes += meta.len();
        }
    }
    Ok(usage)
}

#[derive(Default)]
pub(crate) struct Counters {
    records: AtomicU64,
    batches: AtomicU64,
    checkpoints: AtomicU64,
    rotations: AtomicU64,
    failed_batches: AtomicU64,
    pruned_files: AtomicU64,
    /// The last group commit failed (cleared by the next one that succeeds).
    failing: AtomicBool,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> AuditStats {
        AuditStats {
            records: self.records.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            checkpoints: self.checkpoints.load(Ordering::Relaxed),
            rotations: self.rotations.load(Ordering::Relaxed),
            failed_batches: self.failed_batches.load(Ordering::Relaxed),
            pruned_files: self.pruned_files.load(Ordering::Relaxed),
        }
    }
}

pub(crate) enum Msg {
    Record {
        body: event::Encoded,
        cols: event::Cols,
        ack: oneshot::Sender<Result<u64, AuditError>>,
    },
    Checkpoint(oneshot::Sender<Result<(), AuditError>>),
    /// Answered once the index holds every record acknowledged before.
    SyncIndex(oneshot::Sender<Result<(), AuditError>>),
    Shutdown(oneshot::Sender<Result<(), AuditError>>),
}

/// Handle to an open audit log. Cheap to clone; the writer thread stops (after a final
/// checkpoint) when the last handle is dropped or on [`AuditLog::shutdown`].
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    tx: Option<mpsc::Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
    hmac: ring::hmac::Key,
    public_pem: String,
    key_id: String,
    dir: PathBuf,
    readers: Mutex<Vec<Connection>>,
    stats: Arc<Counters>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel makes the writer write its final checkpoint and exit; joining
        // releases the directory lock before the drop returns, so a reopen does not race it.
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog").field("dir", &self.inner.dir).field("key_id", &self.inner.key_id).finish()
    }
}

impl AuditLog {
    /// Opens the log in `config.dir`, creating it if needed, or resumes the chain after a
    /// restart or crash: the active file is checked (hash chain, checkpoints, against the
    /// signed head in the index); a torn last line or unacknowledged records after the head
    /// (a crash mid-commit) are handled as described in the README, anything else is refused
    /// with [`AuditError::Damaged`] unless [`AuditConfig::recover`] is set. Missing index rows
    /// are rebuilt from the files. Takes an exclusive lock on the directory.
    pub fn open(config: AuditConfig) -> Result<AuditLog, AuditError> {
        if config.max_batch == 0 || config.checkpoint_every == 0 || config.max_file_bytes == 0 {
            return Err(AuditError::Config(
                "max_batch, checkpoint_every and max_file_bytes must be > 0".into(),
            ));
        }
        let signer = keys::Signer::from_pkcs8(&config.signing_key_pkcs8)?;
        let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &config.hmac_key[..]);
        let public_pem = signer.pem.clone();
        let key_id = signer.key_id.clone();
        let dir = config.dir.clone();
        let stats = Arc::new(Counters::default());
        let mut writer = writer::Writer::open(config, signer, stats.clone())?;
        writer.start_indexer()?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("coffer-audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| AuditError::Io(format!("cannot start the audit writer thread: {e}")))?;
        Ok(AuditLog {
            inner: Arc::new(Inner {
                tx: Some(tx),
                thread: Some(thread),
                hmac,
                public_pem,
                key_id,
                dir,
                readers: Mutex::new(Vec::new()),
                stats,
            }),
        })
    }

    /// Appends one record and resolves with its sequence number once it is durable in the
    /// JSONL file and the index. Concurrent calls are group-committed. `Err` means the record
    /// was not written: fail the request closed.
    pub async fn record(&self, event: AuditEvent) -> Result<u64, AuditError> {
        let (body, cols) = event::encode(&event)?;
        let (ack, rx) = oneshot::channel();
        self.send(Msg::Record { body, cols, ack })?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// The keyed hash of a credential, `hmac-sha256:<64 hex>`: the only form in which a
    /// credential may appear in a record.
    pub fn hmac(&self, credential: &[u8]) -> String {
        format!("hmac-sha256:{}", hex::encode(ring::hmac::sign(&self.inner.hmac, credential).as_ref()))
    }

    /// The checkpoint verification key, PEM `PUBLIC KEY` (Ed25519 SubjectPublicKeyInfo).
    pub fn public_key_pem(&self) -> String {
        self.inner.public_pem.clone()
    }

    /// `ed25519:<16 hex>`, the `keyId` written in checkpoints.
    pub fn key_id(&self) -> &str {
        &self.inner.key_id
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Counters since open (group-commit batches, checkpoints, …).
    pub fn stats(&self) -> AuditStats {
        self.inner.stats.snapshot()
    }

    /// Whether the log can take records now: `Err` names why not (the writer thread has stopped,
    /// or its last group commit failed: requests are being refused, fail closed).
    pub fn health(&self) -> Result<(), String> {
        if self.inner.tx.is_none() || self.inner.thread.as_ref().is_none_or(|t| t.is_finished()) {
            return Err("the audit writer has stopped".into());
        }
        if self.inner.stats.failing.load(Ordering::Relaxed) {
            return Err("the last audit commit failed (see the server log); requests are refused until one \
                        succeeds"
                .into());
        }
        Ok(())
    }

    /// The log's disk footprint and its filesystem's free space (blocking: a `statvfs` and a
    /// directory listing).
    pub fn disk_usage(&self) -> std::io::Result<DiskUsage> {
        disk_usage(&self.inner.dir)
    }

    /// Answers from the index (SQLite postings over blocks of records), never a scan of all records, and reads
    /// the matching lines from the files. Sees every record acknowledged before the call.
    pub async fn query(&self, q: AuditQuery) -> Result<AuditPage, AuditError> {
        let (ack, synced) = oneshot::channel();
        // After shutdown the index is complete; a closed writer is not an error here.
        if self.send(Msg::SyncIndex(ack)).is_ok() {
            if let Ok(Err(e)) = synced.await {
                return Err(AuditError::Query(format!("the index is not up to date: {e}")));
            }
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match inner
                .readers
                .lock()
                .map_err(|_| AuditError::Query("reader pool poisoned".into()))?
                .pop()
            {
                Some(conn) => conn,
                None => index::open_reader(&inner.dir.join(files::INDEX))?,
            };
            let result = index::query(&conn, &inner.dir, &q);
            if let Ok(mut pool) = inner.readers.lock() {
                if pool.len() < 4 {
                    pool.push(conn);
                }
            }
            result
        })
        .await
        .map_err(|e| AuditError::Query(format!("query task failed: {e}")))?
    }

    /// Writes a signed checkpoint now if there are records since the last one.
    pub async fn flush_checkpoint(&self) -> Result<(), AuditError> {
        let (ack, rx) = oneshot::channel();
        self.send(Msg::Checkpoint(ack))?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// Final checkpoint, then stops the writer. Later calls to [`AuditLog::record`] fail with
    /// [`AuditError::Closed`].
    pub async fn shutdown(&self) -> Result<(), AuditError> {
        let (ack, rx) = oneshot::channel();
        self.send(Msg::Shutdown(ack))?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    fn send(&self, msg: Msg) -> Result<(), AuditError> {
        self.inner.tx.as_ref().ok_or(AuditError::Closed)?.send(msg).map_err(|_| AuditError::Closed)
    }
}
