//! The writer thread: resumes the chain on open, then group-commits records (one write, one
//! fsync and one signed-head rewrite per batch; their index rows go to the index thread), writes
//! checkpoints, rotates and prunes files.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use crate::canon::{canonical, parse_rfc3339_us, seal, unix_us, GENESIS_HASH};
use crate::event::{self, now_rfc3339, Encoded};
use crate::files::{
    list_rotated, parse_lines, parse_signed_bytes, read_head_file, rotated_name, sync_dir, Entry, Kind,
    Signed, ACTIVE, ACTIVE_TMP, HEAD, INDEX, LOCK,
};
use crate::index::{self, Index, IndexRow};
use crate::indexer::{self, IndexMsg};
use crate::journal::{self, FileKey, Journal};
use crate::keys::{Signer, Verifier};
use crate::{AuditConfig, AuditError, Counters, Msg};

/// How often retention is applied (and once right after open).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Wait before retrying a failed rotation.
const ROTATE_RETRY: Duration = Duration::from_secs(5);

type Ack = oneshot::Sender<Result<u64, AuditError>>;

/// The chain state the head attests.
struct HeadState {
    n: u64,
    seq: u64,
    hash: String,
    pruned_through: u64,
}

/// The signed head line for `h`.
fn head_line(signer: &Signer, h: &HeadState) -> Vec<u8> {
    let body = canonical(&json!({
        "type": "head",
        "n": h.n,
        "seq": h.seq,
        "hash": h.hash,
        "time": now_rfc3339(),
        "keyId": signer.key_id,
        "prunedThrough": h.pruned_through,
    }));
    let sig = signer.sign(&body);
    seal(body, "signature", &sig)
}
type Pending = (Encoded, event::Cols);

/// Group commit pacing (see [`crate::AuditConfig::pace`]): whether the writer is pacing, and
/// since when the next commit may start.
///
/// Why: on a busy log every commit's fsync and head signature cost the same whatever the batch
/// size, so waiting a little for more records to join saves CPU for the requests; when few
/// requests are in flight the wait would only add latency.
pub(crate) struct Pacer {
    interval: Duration,
    busy: bool,
    last_start: Instant,
}

impl Pacer {
    /// A batch larger than this starts pacing …
    const START_BATCH: usize = 16;
    /// … and one smaller than this stops it.
    const STOP_BATCH: usize = 8;

    pub(crate) fn new(interval: Duration) -> Self {
        Self { interval, busy: false, last_start: Instant::now() }
    }

    /// Until when a commit with records waiting should wait for more, if at all.
    pub(crate) fn hold_until(&self, now: Instant) -> Option<Instant> {
        let due = self.last_start + self.interval;
        (self.busy && now < due).then_some(due)
    }

    /// A commit of `records` records starts now.
    pub(crate) fn started(&mut self, records: usize, now: Instant) {
        self.last_start = now;
        if self.interval.is_zero() || records < Self::STOP_BATCH {
            self.busy = false;
        } else if records > Self::START_BATCH {
            self.busy = true;
        }
    }
}

/// When a batch writes a checkpoint.
enum CpWant {
    /// When `checkpoint_every` records or `checkpoint_interval` have passed (and there are new
    /// records).
    Auto,
    /// If there are records after the last checkpoint.
    IfNew,
    /// In any case, with these extra fields.
    Always(Map<String, Value>),
}

pub(crate) struct Writer {
    dir: PathBuf,
    stdout: bool,
    max_file_bytes: u64,
    max_file_age: Duration,
    retention: Option<Duration>,
    max_total_bytes: Option<u64>,
    checkpoint_every: u64,
    checkpoint_interval: Duration,
    max_batch: usize,
    pacer: Pacer,
    signer: Arc<Signer>,
    /// The index while opening; then owned by the index thread, fed through `to_index`.
    index: Option<Index>,
    to_index: Option<Sender<IndexMsg>>,
    indexer: Option<JoinHandle<()>>,
    /// The signed head, rewritten in place after every group commit.
    head_file: File,
    stats: Arc<Counters>,
    _lock: File,

    /// The active file (opened for append), shared with the journal's flusher thread.
    file: Arc<File>,
    /// Identifies the active file in journal entries.
    file_key: FileKey,
    /// Makes commits durable; `None`: each commit fsyncs the active file.
    journal: Option<Journal>,
    /// Length of the active file up to the last durable, acknowledged byte.
    len: u64,
    /// First record of the active file, once it has one.
    file_first: Option<u64>,
    file_created: SystemTime,

    last_seq: u64,
    last_hash: String,
    cp_n: u64,
    cp_seq: u64,
    cp_at: Instant,
    pruned_through: u64,

    /// The checkpoint line last written, while nothing has been written after it.
    tail_cp: Option<Vec<u8>>,
    /// A failed batch could not be cut off the file again: retry before writing anything.
    poisoned: bool,
    /// A directory fsync after a rename failed: retry before acknowledging anything.
    dir_dirty: bool,
    next_prune: Instant,
    rotate_after: Option<Instant>,
}

fn io_err(what: &str, path: &Path, e: io::Error) -> AuditError {
    AuditError::Io(format!("{what} {}: {e}", path.display()))
}

/// Creates `path` (0600) holding `bytes`, fsync'd, open for append.
fn create_with(path: &Path, bytes: &[u8]) -> io::Result<File> {
    let _ = fs::remove_file(path);
    let mut f = OpenOptions::new().append(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(f)
}

fn hex_str(hex: &[u8; 64]) -> &str {
    std::str::from_utf8(hex).expect("hex digits are ASCII")
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().append(true).open(path)
}

/// Opens `path` for reading and writing, creating it (0600) if missing, never truncating.
fn open_private(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_err("open", path, e))
}

fn lock_dir(dir: &Path) -> Result<File, AuditError> {
    use std::os::unix::io::AsRawFd;
    let path = dir.join(LOCK);
    let f = open_private(&path)?;
    // SAFETY: flock on a valid, owned file descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(AuditError::Locked(dir.to_path_buf()));
        }
        return Err(io_err("lock", &path, e));
    }
    Ok(f)
}

/// What open found in the active file.
struct Scan {
    anchor: Option<Signed>,
    /// Offset after the last consistent line.
    good_end: usize,
    last_seq: u64,
    last_hash: String,
    cp_n: u64,
    cp_seq: u64,
    pruned_through: u64,
    first_seq: Option<u64>,
    /// Consistent records: (seq, hash, offset after the line).
    recs: Vec<(u64, String, usize)>,
    /// First inconsistency: (offset, line, reason).
    problem: Option<(usize, u64, String)>,
    /// Highest seq of any record whose own hash is right, and that hash (for recovery).
    max_seen: Option<(u64, String)>,
    first_seen: Option<u64>,
    max_cp_n: u64,
    created: Option<SystemTime>,
    key_ids: Vec<String>,
}

fn scan(entries: &[Entry], torn: Option<(usize, usize)>, verifier: &Verifier) -> Scan {
    let mut s = Scan {
        anchor: None,
        good_end: 0,
        last_seq: 0,
        last_hash: GENESIS_HASH.to_string(),
        cp_n: 0,
        cp_seq: 0,
        pruned_through: 0,
        first_seq: None,
        recs: Vec::new(),
        problem: None,
        max_seen: None,
        first_seen: None,
        max_cp_n: 0,
        created: None,
        key_ids: Vec::new(),
    };
    for (i, e) in entries.iter().enumerate() {
        if let Kind::Rec(r) = &e.kind {
            if r.hash_ok() && s.max_seen.as_ref().is_none_or(|(m, _)| r.seq > *m) {
                s.max_seen = Some((r.seq, r.hash.clone()));
            }
            if r.hash_ok() && s.first_seen.is_none() {
                s.first_seen = Some(r.seq);
            }
        }
        if let Kind::Cp(c) = &e.kind {
            s.max_cp_n = s.max_cp_n.max(c.n);
            s.pruned_through = s.pruned_through.max(c.pruned_through);
        }
        if s.problem.is_some() {
            continue;
        }
        let fail = |why: String| Some((e.start, e.line, why));
        let problem = match (&e.kind, i) {
            (Kind::Cp(c), 0) => match check_sig(verifier, c) {
                Err(why) => fail(why),
                Ok(()) => {
                    s.last_seq = c.seq;
                    s.last_hash = c.hash.clone();
                    s.cp_n = c.n;
                    s.cp_seq = c.seq;
                    s.created = c
                        .value
                        .get("time")
                        .and_then(Value::as_str)
                        .and_then(parse_rfc3339_us)
                        .map(crate::canon::from_unix_us);
                    s.key_ids.push(c.key_id.clone());
                    s.anchor = Some(c.clone());
                    None
                }
            },
            (_, 0) => fail("the file does not begin with a signed checkpoint".into()),
            (Kind::Bad { reason, .. }, _) => fail(reason.clone()),
            (Kind::Rec(r), _) => {
                if !r.hash_ok() {
                    fail(format!("record seq {} does not match its hash (modified)", r.seq))
                } else if r.seq != s.last_seq + 1 || r.prev != s.last_hash {
                    fail(format!(
                        "record seq {} does not follow seq {} (deleted, inserted or reordered records)",
                        r.seq, s.last_seq
                    ))
                } else {
                    s.last_seq = r.seq;
                    s.last_hash = r.hash.clone();
                    s.first_seq.get_or_insert(r.seq);
                    s.recs.push((r.seq, r.hash.clone(), e.next_offset()));
                    None
                }
            }
            (Kind::Cp(c), _) => {
                if let Err(why) = check_sig(verifier, c) {
                    fail(why)
                } else if c.n != s.cp_n + 1 || c.seq != s.last_seq || c.hash != s.last_hash {
                    fail(format!("checkpoint {} does not match the chain before it", c.n))
                } else {
                    s.cp_n = c.n;
                    s.cp_seq = c.seq;
                    if !s.key_ids.contains(&c.key_id) {
                        s.key_ids.push(c.key_id.clone());
                    }
                    None
                }
            }
        };
        match problem {
            Some(p) => s.problem = Some(p),
            None => s.good_end = e.next_offset(),
        }
    }
    if s.problem.is_none() {
        if let Some((start, _)) = torn {
            s.problem =
                Some((start, entries.len() as u64 + 1, "the last line is incomplete (torn write)".into()));
        }
    }
    s
}

/// Checks a signature when it is by our key; a checkpoint by another (older) key is taken on
/// trust here and left to `verify`, which is given every public key.
fn check_sig(verifier: &Verifier, c: &Signed) -> Result<(), String> {
    if verifier.knows(&c.key_id) {
        verifier.verify(&c.key_id, &c.body, &c.signature).map_err(|e| format!("checkpoint {}: {e}", c.n))
    } else {
        Ok(())
    }
}

/// Opens the journal in `dir` and, after an unclean shutdown, rewrites the batches it holds for
/// the active file into it (so `resume` finds every acknowledged record even if the OS lost
/// bytes that were not yet fsync'd), then starts a new journal epoch. `None` if there is no
/// room to create it: commits then fsync the active file, as durable and only slower.
fn open_journal(dir: &Path, bytes: u64) -> Result<Option<Journal>, AuditError> {
    let path = dir.join(journal::JOURNAL);
    let (epoch, pending) = journal::read_pending(dir).map_err(|e| io_err("read", &path, e))?;
    if !pending.is_empty() {
        let active = dir.join(ACTIVE);
        let (rewritten, left, cut) =
            replay(&active, &pending).map_err(|e| io_err("replay the journal into", &active, e))?;
        if rewritten > 0 || cut > 0 {
            tracing::warn!(
                batches = rewritten,
                cut_bytes = cut,
                "audit: after an unclean shutdown, rewrote group commits the OS had not written from the journal, \
                 and cut what no commit acknowledged"
            );
        }
        if left > 0 {
            tracing::error!(
                batches = left,
                "audit: {ACTIVE} differs from the commit journal where the OS cannot have lost bytes: it was \
                 changed; left as found"
            );
        }
    }
    // An unused journal must not stay behind: a later open would replay it.
    let unused = |dir: &Path| journal::remove(dir).map_err(|e| io_err("remove", &path, e));
    if bytes == 0 {
        unused(dir)?;
        return Ok(None);
    }
    match Journal::start(dir, bytes, epoch) {
        Ok(journal) => Ok(Some(journal)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) => {
            tracing::warn!(
                "audit: no room for the {bytes}-byte commit journal in {} ({e}); every commit fsyncs {ACTIVE} \
                 instead (as durable, slower)",
                dir.display()
            );
            unused(dir)?;
            Ok(None)
        }
        Err(e) => Err(io_err("create", &path, e)),
    }
}

/// Rewrites the journal's batches for `active` (those whose file key is its first line's) in
/// commit order, and cuts the file after the last: later bytes were never acknowledged. A batch
/// whose bytes in the file are neither its own nor zeros (the file was changed, not merely not
/// written) is left as found, for `resume` to judge. Returns the batches rewritten, those left
/// and the bytes cut.
fn replay(active: &Path, pending: &[journal::Pending]) -> io::Result<(usize, usize, u64)> {
    let file = match OpenOptions::new().read(true).write(true).open(active) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0, 0)),
        Err(e) => return Err(e),
    };
    let bytes = fs::read(active)?;
    let Some(key) = journal::key_of(&bytes) else { return Ok((0, 0, 0)) };
    let (mut end, mut rewritten, mut left) = (None, 0, 0);
    for p in journal::batches_for(pending, key) {
        let have = p.found_in(&bytes);
        if have != &p.bytes[..] {
            if journal::lost_not_changed(have, &p.bytes) {
                file.write_all_at(&p.bytes, p.offset)?;
                rewritten += 1;
            } else {
                left += 1;
            }
        }
        end = Some(p.offset + p.bytes.len() as u64);
    }
    let Some(end) = end else { return Ok((0, 0, 0)) };
    let cut = (bytes.len() as u64).saturating_sub(end);
    if rewritten > 0 || cut > 0 {
        file.set_len(end)?;
        file.sync_all()?;
    }
    Ok((rewritten, left, cut))
}

/// Only NUL bytes and newlines (zero-filled blocks after a crash), ignoring a torn last line.
fn is_debris(rest: &[u8]) -> bool {
    let complete = match rest.iter().rposition(|&b| b == b'\n') {
        Some(p) => &rest[..=p],
        None => return true,
    };
    complete.iter().all(|&b| b == 0 || b == b'\n')
}

/// Index rows for the records of `bytes` with `seq > above` whose own hash is right.
fn rows_from(bytes: &[u8], above: u64) -> Vec<IndexRow> {
    let parsed = parse_lines(bytes);
    let mut rows = Vec::new();
    for e in &parsed.entries {
        if let Kind::Rec(r) = &e.kind {
            if r.seq > above && r.hash_ok() {
                let line = &bytes[e.start..e.end];
                let cols = serde_json::from_slice::<Value>(line).ok().as_ref().and_then(event::cols);
                let hash = hex::decode(&r.hash).ok().and_then(|h| <[u8; 32]>::try_from(h).ok());
                if let (Some(cols), Ok(len), Some(hash)) = (cols, u32::try_from(line.len()), hash) {
                    rows.push(IndexRow { seq: r.seq, cols, offset: e.start as u64, len, hash });
                }
            }
        }
    }
    rows
}

impl Writer {
    pub(crate) fn open(cfg: AuditConfig, signer: Signer, stats: Arc<Counters>) -> Result<Self, AuditError> {
        let dir = cfg.dir.clone();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| io_err("create", &dir, e))?;
        let lock = lock_dir(&dir)?;
        let index = Index::open(&dir.join(INDEX))?;
        let head_file = open_private(&dir.join(HEAD))?;
        let active = dir.join(ACTIVE);
        let tmp = dir.join(ACTIVE_TMP);

        // A rotation interrupted between its two renames leaves the new file as the temporary.
        if tmp.exists() {
            if active.exists() {
                fs::remove_file(&tmp).map_err(|e| io_err("remove", &tmp, e))?;
            } else {
                fs::rename(&tmp, &active).map_err(|e| io_err("rename", &tmp, e))?;
            }
            sync_dir(&dir).map_err(|e| io_err("fsync", &dir, e))?;
        }

        let journal = open_journal(&dir, cfg.journal_bytes)?;

        let mut w = Writer {
            stdout: cfg.stdout,
            max_file_bytes: cfg.max_file_bytes,
            max_file_age: cfg.max_file_age,
            retention: cfg.retention,
            max_total_bytes: cfg.max_total_bytes,
            checkpoint_every: cfg.checkpoint_every,
            checkpoint_interval: cfg.checkpoint_interval,
            max_batch: cfg.max_batch,
            pacer: Pacer::new(cfg.pace),
            signer: Arc::new(signer),
            index: Some(index),
            to_index: None,
            indexer: None,
            head_file,
            stats,
            _lock: lock,
            // A placeholder handle: `resume` always installs the active file.
            file: Arc::new(File::open(&dir).map_err(|e| io_err("open", &dir, e))?),
            file_key: [0; 16],
            journal: None,
            len: 0,
            file_first: None,
            file_created: SystemTime::now(),
            last_seq: 0,
            last_hash: GENESIS_HASH.to_string(),
            cp_n: 0,
            cp_seq: 0,
            cp_at: Instant::now(),
            pruned_through: 0,
            tail_cp: None,
            poisoned: false,
            dir_dirty: false,
            next_prune: Instant::now(),
            rotate_after: None,
            dir,
        };
        w.journal = journal;
        w.resume(cfg.recover)?;
        Ok(w)
    }

    fn damaged(&self, reason: String) -> AuditError {
        AuditError::Damaged(format!(
            "{reason} (in {}); run `verify` on the directory for details, or open with the recovery flag \
             (AuditConfig::recover) to keep the damaged file as evidence and continue in a new one",
            self.dir.display()
        ))
    }

    fn resume(&mut self, recover: bool) -> Result<(), AuditError> {
        let active = self.dir.join(ACTIVE);
        let head_file = read_head_file(&self.dir).map_err(|e| io_err("read", &self.dir.join(HEAD), e))?;
        let head_line = match head_file.filter(|line| !line.is_empty()) {
            Some(line) => Some(line),
            // A log written before the head file existed keeps its head in the index.
            None => self.index_mut().legacy_head()?.map(String::into_bytes),
        };
        let head = match head_line {
            None => None,
            Some(line) => match parse_signed_bytes(&line, "head") {
                Ok(h) => Some(h),
                Err(e) => {
                    return self.refuse_or_recover(
                        recover,
                        format!("the signed head ({HEAD}) is unreadable: {e}"),
                        None,
                    )
                }
            },
        };
        let verifier = self.signer.verifier();
        if let Some(h) = &head {
            if verifier.knows(&h.key_id) {
                if let Err(e) = verifier.verify(&h.key_id, &h.body, &h.signature) {
                    return self.refuse_or_recover(recover, format!("the signed head ({HEAD}): {e}"), None);
                }
            }
        }
        let rotated = list_rotated(&self.dir).map_err(|e| io_err("list", &self.dir, e))?;

        if !active.exists() {
            match (rotated.last(), &head) {
                (None, None) => return self.start_fresh(),
                (None, Some(h)) => {
                    return self.refuse_or_recover(
                        recover,
                        format!("there is a signed head (seq {}) but there are no audit files", h.seq),
                        head.clone(),
                    )
                }
                (Some((_, _, last)), _) => {
                    // Continue from the closing checkpoint of the newest rotated file; the
                    // head check below tells whether records after it are missing.
                    let bytes = fs::read(last).map_err(|e| io_err("read", last, e))?;
                    let parsed = parse_lines(&bytes);
                    let closing = match parsed.entries.last() {
                        Some(e) if matches!(e.kind, Kind::Cp(_)) && parsed.torn.is_none() => {
                            bytes[e.start..=e.end].to_vec()
                        }
                        _ => {
                            return self.refuse_or_recover(
                                recover,
                                format!(
                                    "{ACTIVE} is missing and {} does not end with a closing checkpoint",
                                    last.display()
                                ),
                                head.clone(),
                            )
                        }
                    };
                    create_with(&active, &closing).map_err(|e| io_err("create", &active, e))?;
                    sync_dir(&self.dir).map_err(|e| io_err("fsync", &self.dir, e))?;
                    tracing::warn!(dir = %self.dir.display(), "audit: {ACTIVE} was missing; continuing after the last rotated file");
                }
            }
        }

        let bytes = fs::read(&active).map_err(|e| io_err("read", &active, e))?;
        let parsed = parse_lines(&bytes);
        let s = scan(&parsed.entries, parsed.torn, &verifier);
        let Some(h) = head.clone() else {
            return self.refuse_or_recover(
                recover,
                format!("there is no signed head ({HEAD}) although audit files exist (deleted or replaced)"),
                None,
            );
        };
        let Some(anchor) = s.anchor.clone() else {
            let why = s.problem.as_ref().map_or("empty file".into(), |p| p.2.clone());
            return self.refuse_or_recover(
                recover,
                format!("{ACTIVE} is damaged at its start: {why}"),
                Some(h),
            );
        };
        // Where the signed head lies in the file: everything up to it was acknowledged.
        let head_end = if h.seq == anchor.seq && h.hash == anchor.hash {
            parsed.entries[0].next_offset()
        } else if h.seq < anchor.seq {
            return self.refuse_or_recover(
                recover,
                format!(
                    "the signed head (seq {}) is older than {ACTIVE} (which starts after seq {}): the head was \
                     rolled back or replaced",
                    h.seq, anchor.seq
                ),
                Some(h),
            );
        } else {
            match s.recs.iter().find(|(seq, _, _)| *seq == h.seq) {
                Some((_, hash, end)) if *hash == h.hash => *end,
                Some(_) => {
                    return self.refuse_or_recover(
                        recover,
                        format!("record seq {} differs from the signed head", h.seq),
                        Some(h),
                    )
                }
                None => {
                    let why = match &s.problem {
                        Some((_, line, why)) => format!("{ACTIVE} line {line}: {why}"),
                        None => format!("{ACTIVE} ends at seq {}", s.last_seq),
                    };
                    return self.refuse_or_recover(
                        recover,
                        format!(
                            "records up to seq {} were acknowledged (signed head) but {why}: the log was truncated or damaged",
                            h.seq
                        ),
                        Some(h),
                    );
                }
            }
        };

        // After the head: a crash between the file fsync and the head rewrite leaves complete,
        // chained records (adopted) and possibly a torn or zero-filled tail (cut).
        let mut discarded = 0usize;
        if let Some((offset, line, why)) = &s.problem {
            debug_assert!(*offset >= head_end);
            if is_debris(&bytes[*offset..]) {
                discarded = bytes.len() - offset;
            } else {
                return self.refuse_or_recover(
                    recover,
                    format!("{ACTIVE} line {line} (after the signed head, seq {}): {why}", h.seq),
                    Some(h),
                );
            }
        }
        self.file = Arc::new(open_append(&active).map_err(|e| io_err("open", &active, e))?);
        self.file_key = journal::file_key(&bytes[..parsed.entries[0].next_offset()]);
        if discarded > 0 {
            self.file
                .set_len(s.good_end as u64)
                .and_then(|()| self.file.sync_data())
                .map_err(|e| io_err("truncate", &active, e))?;
            tracing::warn!(bytes = discarded, "audit: cut a torn tail after the last acknowledged record");
        }
        self.len = s.good_end as u64;
        self.file_first = s.first_seq;
        self.file_created = s.created.unwrap_or_else(SystemTime::now);
        self.last_seq = s.last_seq;
        self.last_hash = s.last_hash.clone();
        self.cp_n = s.cp_n;
        self.cp_seq = s.cp_seq;
        self.pruned_through = s.pruned_through.max(h.pruned_through);

        let mut notes = Map::new();
        if s.last_seq > h.seq {
            notes.insert("adopted".into(), json!([h.seq + 1, s.last_seq]));
            tracing::warn!(
                from = h.seq + 1,
                to = s.last_seq,
                "audit: adopting records written but not acknowledged before a crash"
            );
        }
        if discarded > 0 {
            notes.insert("discardedBytes".into(), json!(discarded));
        }
        if let Some(old) =
            s.key_ids.iter().chain(std::iter::once(&h.key_id)).find(|k| **k != self.signer.key_id)
        {
            notes.insert("previousKeyId".into(), json!(old));
        }
        self.reindex(&rotated)?;
        if !notes.is_empty() {
            self.write_batch(Vec::new(), CpWant::Always(notes), None)?;
        }
        Ok(())
    }

    /// A new, empty log: the genesis anchor (checkpoint 0 at seq 0).
    fn start_fresh(&mut self) -> Result<(), AuditError> {
        let line = self.checkpoint_line(0, 0, GENESIS_HASH, 0, Map::new());
        self.install_active(&line)?;
        self.write_head()
    }

    /// Rewrites the signed head in place. Not fsync'd: like the file's own metadata it survives a
    /// process crash; after an OS crash it may lag the file, and open adopts what follows it.
    fn write_head(&mut self) -> Result<(), AuditError> {
        let mut line = head_line(&self.signer, &self.head_state());
        line.push(b'\n');
        self.head_file.write_all_at(&line, 0).map_err(|e| io_err("write", &self.dir.join(HEAD), e))?;
        if let Some(index) = self.index.as_mut() {
            // Opening a log whose head was in the index: it is in the head file now.
            index.forget_legacy_head()?;
        }
        Ok(())
    }

    /// The index while opening (before the index thread takes it).
    fn index_mut(&mut self) -> &mut Index {
        self.index.as_mut().expect("the index is used directly only while opening")
    }

    fn head_state(&self) -> HeadState {
        HeadState {
            n: self.cp_n,
            seq: self.last_seq,
            hash: self.last_hash.clone(),
            pruned_through: self.pruned_through,
        }
    }

    /// Writes a new active file holding `anchor` (via the temporary name) and makes it current.
    fn install_active(&mut self, anchor: &[u8]) -> Result<(), AuditError> {
        let (active, tmp) = (self.dir.join(ACTIVE), self.dir.join(ACTIVE_TMP));
        let mut line = anchor.to_vec();
        line.push(b'\n');
        let file = create_with(&tmp, &line).map_err(|e| io_err("create", &tmp, e))?;
        fs::rename(&tmp, &active).map_err(|e| io_err("rename", &tmp, e))?;
        sync_dir(&self.dir).map_err(|e| io_err("fsync", &self.dir, e))?;
        self.file = Arc::new(file);
        self.file_key = journal::file_key(&line);
        self.len = line.len() as u64;
        self.file_first = None;
        self.file_created = SystemTime::now();
        Ok(())
    }

    fn refuse_or_recover(
        &mut self,
        recover: bool,
        reason: String,
        head: Option<Signed>,
    ) -> Result<(), AuditError> {
        if !recover {
            return Err(self.damaged(reason));
        }
        self.recovery(reason, head)
    }

    /// Keeps the damaged active file as a rotated file, starts a new one with a signed
    /// checkpoint naming the reason, and continues after the highest sequence number seen.
    fn recovery(&mut self, reason: String, head: Option<Signed>) -> Result<(), AuditError> {
        tracing::error!(dir = %self.dir.display(), "audit: recovering a damaged log: {reason}");
        let active = self.dir.join(ACTIVE);
        let verifier = self.signer.verifier();
        let s = match fs::read(&active) {
            Ok(bytes) => {
                let parsed = parse_lines(&bytes);
                scan(&parsed.entries, parsed.torn, &verifier)
            }
            Err(_) => scan(&[], None, &verifier),
        };
        let rotated = list_rotated(&self.dir).map_err(|e| io_err("list", &self.dir, e))?;
        // The highest point anything attests: the head, the active file, the rotated files.
        let mut end: (u64, String) = (0, GENESIS_HASH.to_string());
        let mut n = 0;
        let mut pruned = s.pruned_through;
        fn consider(seq: u64, hash: &str, end: &mut (u64, String)) {
            if seq > end.0 {
                *end = (seq, hash.to_string());
            }
        }
        if let Some(h) = &head {
            consider(h.seq, &h.hash, &mut end);
            n = n.max(h.n);
            pruned = pruned.max(h.pruned_through);
        }
        if let Some((seq, hash)) = &s.max_seen {
            consider(*seq, hash, &mut end);
        }
        if let Some(a) = &s.anchor {
            consider(a.seq, &a.hash, &mut end);
        }
        n = n.max(s.max_cp_n);
        if let Some((_, _, path)) = rotated.last() {
            if let Ok(bytes) = fs::read(path) {
                for e in parse_lines(&bytes).entries {
                    match e.kind {
                        Kind::Rec(r) if r.hash_ok() => consider(r.seq, &r.hash, &mut end),
                        Kind::Cp(c) => {
                            consider(c.seq, &c.hash, &mut end);
                            n = n.max(c.n);
                            pruned = pruned.max(c.pruned_through);
                        }
                        _ => {}
                    }
                }
            }
        }
        if active.exists() {
            let first = s.first_seen.or(s.anchor.as_ref().map(|a| a.seq + 1)).unwrap_or(end.0 + 1);
            let last = s.max_seen.as_ref().map_or(first, |(m, _)| (*m).max(first));
            let mut target = self.dir.join(rotated_name(first, last));
            if target.exists() {
                // Keep both; the odd name makes `verify` skip it, so say so in the log.
                target = self.dir.join(format!(
                    "{}.damaged-{}",
                    rotated_name(first, last),
                    unix_us(SystemTime::now())
                ));
            }
            fs::rename(&active, &target).map_err(|e| io_err("rename", &active, e))?;
            tracing::error!(file = %target.display(), "audit: the damaged file was kept as evidence");
        }
        self.last_seq = end.0;
        self.last_hash = end.1.clone();
        self.cp_n = n;
        self.pruned_through = pruned;
        let mut extra = Map::new();
        extra.insert("recovery".into(), Value::String(reason));
        let line = self.checkpoint_line(n + 1, end.0, &end.1, pruned, extra);
        self.install_active(&line)?;
        self.cp_n = n + 1;
        self.cp_seq = end.0;
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        let rotated = list_rotated(&self.dir).map_err(|e| io_err("list", &self.dir, e))?;
        self.reindex(&rotated)
    }

    /// Adds index rows for records in the files that the index does not have (a crash before
    /// the index commit, or a rebuilt index), then writes the head.
    fn reindex(&mut self, rotated: &[(u64, u64, PathBuf)]) -> Result<(), AuditError> {
        let above = self.index_mut().max_seq()?.unwrap_or(0).max(self.pruned_through);
        if above < self.last_seq {
            // File by file, one commit each: memory stays within one file's rows however long
            // the history (a rebuilt index after an upgrade reads all of it).
            let mut rebuilt = 0;
            for (_, last, path) in rotated {
                if *last > above {
                    let bytes = fs::read(path).map_err(|e| io_err("read", path, e))?;
                    let rows = rows_from(&bytes, above);
                    rebuilt += rows.len();
                    self.index_mut().commit(&rows, None)?;
                    tracing::info!(rows = rebuilt, file = %path.display(), "audit: rebuilding index rows from the files");
                }
            }
            let active = self.dir.join(ACTIVE);
            let bytes = fs::read(&active).map_err(|e| io_err("read", &active, e))?;
            let rows = rows_from(&bytes[..self.len as usize], above);
            rebuilt += rows.len();
            self.index_mut().commit(&rows, None)?;
            if rebuilt > 0 {
                tracing::info!(rows = rebuilt, "audit: index rows rebuilt from the files");
            }
        }
        self.write_head()
    }

    fn checkpoint_line(
        &self,
        n: u64,
        seq: u64,
        hash: &str,
        pruned: u64,
        mut extra: Map<String, Value>,
    ) -> Vec<u8> {
        extra.insert("type".into(), json!("checkpoint"));
        extra.insert("n".into(), json!(n));
        extra.insert("seq".into(), json!(seq));
        extra.insert("hash".into(), json!(hash));
        extra.insert("time".into(), json!(now_rfc3339()));
        extra.insert("keyId".into(), json!(self.signer.key_id));
        extra.insert("prunedThrough".into(), json!(pruned));
        let body = canonical(&Value::Object(extra));
        let sig = self.signer.sign(&body);
        seal(body, "signature", &sig)
    }

    /// Makes `bytes`, just appended at `offset`, durable: through the journal, or without
    /// one by fsyncing the active file.
    fn make_durable(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        match self.journal.as_mut() {
            Some(journal) => journal.commit(&self.file, self.file_key, offset, bytes),
            None => self.file.sync_data(),
        }
    }

    fn sync_active(&self) -> io::Result<()> {
        match &self.journal {
            Some(journal) => journal.sync_log(&self.file),
            None => self.file.sync_data(),
        }
    }

    /// On a clean close: the active file is fsync'd, so the journal need not be replayed.
    fn close_journal(&mut self) {
        if self.journal.is_none() {
            return;
        }
        let synced = self.sync_active();
        let Some(mut journal) = self.journal.take() else { return };
        if let Err(e) = synced.and_then(|()| journal.mark_clean()) {
            tracing::warn!("audit: closing the journal: {e}; the next open replays it");
        }
    }

    fn rollback(&mut self, len: u64) {
        if let Err(e) = self.file.set_len(len).and_then(|()| self.file.sync_data()) {
            tracing::error!(
                "audit: could not cut a failed batch off {ACTIVE}: {e}; will retry before the next write"
            );
            self.poisoned = true;
        }
    }

    fn repair(&mut self) -> Result<(), AuditError> {
        if self.poisoned {
            self.file.set_len(self.len).and_then(|()| self.file.sync_data()).map_err(|e| {
                AuditError::Unavailable(format!("cannot cut a failed batch off {ACTIVE}: {e}"))
            })?;
            self.poisoned = false;
        }
        if self.dir_dirty {
            sync_dir(&self.dir)
                .map_err(|e| AuditError::Unavailable(format!("fsync {}: {e}", self.dir.display())))?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// One group commit: appends the records (and a checkpoint if due) in one write, fsyncs,
    /// rewrites the signed head; then hands their index rows to the index thread (while opening:
    /// commits them directly). On a write, fsync or head failure the file is cut back and
    /// nothing is acknowledged. Returns the first seq and the checkpoint line.
    fn write_batch(
        &mut self,
        bodies: Vec<Pending>,
        want: CpWant,
        prune_through: Option<u64>,
    ) -> Result<(u64, Option<Vec<u8>>), AuditError> {
        self.repair()?;
        let start_len = self.len;
        let first = self.last_seq + 1;
        let mut seq = self.last_seq;
        // The chain hash in hex, without a String per record.
        let mut hash: [u8; 64] = self.last_hash.as_bytes().try_into().map_err(|_| {
            AuditError::Unavailable(format!(
                "the chain's last hash is not a SHA-256 hex digest: {}",
                self.last_hash
            ))
        })?;
        let mut buf = Vec::with_capacity(bodies.iter().map(|(b, _)| b.len() + 200).sum());
        let mut rows = Vec::with_capacity(bodies.len());
        for (body, cols) in bodies {
            seq += 1;
            let start = buf.len();
            body.write_body(seq, hex_str(&hash), &mut buf);
            let digest = ring::digest::digest(&ring::digest::SHA256, &buf[start..]);
            let digest: [u8; 32] = digest.as_ref().try_into().expect("SHA-256 is 32 bytes");
            hex::encode_to_slice(digest, &mut hash).expect("64 hex digits for 32 bytes");
            // Seal: the body's closing brace becomes `,"hash":"<hex>"}`.
            buf.pop();
            buf.extend_from_slice(b",\"hash\":\"");
            buf.extend_from_slice(&hash);
            buf.extend_from_slice(b"\"}");
            let len = u32::try_from(buf.len() - start).expect("a record line is far below 4 GiB");
            rows.push(IndexRow { seq, cols, offset: start_len + start as u64, len, hash: digest });
            buf.push(b'\n');
        }
        let since_cp = seq - self.cp_seq;
        let pruned = prune_through.unwrap_or(self.pruned_through).max(self.pruned_through);
        let cp_extra = match want {
            CpWant::Always(extra) => Some(extra),
            CpWant::IfNew if since_cp > 0 => Some(Map::new()),
            CpWant::Auto
                if since_cp > 0
                    && (since_cp >= self.checkpoint_every
                        || self.cp_at.elapsed() >= self.checkpoint_interval) =>
            {
                Some(Map::new())
            }
            _ => None,
        };
        let hash = hex_str(&hash).to_owned();
        let cp = cp_extra.map(|extra| self.checkpoint_line(self.cp_n + 1, seq, &hash, pruned, extra));
        if let Some(cp) = &cp {
            buf.extend_from_slice(cp);
            buf.push(b'\n');
        }
        if buf.is_empty() {
            return Ok((first, None));
        }
        if let Err(e) = (&*self.file).write_all(&buf).and_then(|()| self.make_durable(start_len, &buf)) {
            self.rollback(start_len);
            return Err(AuditError::Unavailable(format!("write {}: {e}", self.dir.join(ACTIVE).display())));
        }
        let (old_n, old_seq, old_hash, old_pruned) =
            (self.cp_n, self.last_seq, self.last_hash.clone(), self.pruned_through);
        if cp.is_some() {
            self.cp_n += 1;
        }
        self.last_seq = seq;
        self.last_hash = hash;
        self.pruned_through = pruned;
        let record_count = rows.len() as u64;
        let has_records = !rows.is_empty();
        // Opening: no index thread yet, and open must leave the index complete.
        let direct = match self.index.as_mut() {
            Some(index) => index.commit(&rows, prune_through),
            None => Ok(()),
        };
        if let Err(e) = direct.and_then(|()| self.write_head()) {
            (self.cp_n, self.last_seq, self.last_hash, self.pruned_through) =
                (old_n, old_seq, old_hash, old_pruned);
            self.rollback(start_len);
            return Err(e);
        }
        if let Some(tx) = &self.to_index {
            // The records are durable in the file; the index is rebuilt from it if this fails.
            if tx.send(IndexMsg::Rows { rows, delete_through: prune_through }).is_err() {
                tracing::error!("audit: the index thread has stopped; queries will miss new records");
            }
        }
        self.len = start_len + buf.len() as u64;
        if has_records && self.file_first.is_none() {
            self.file_first = Some(first);
        }
        if let Some(cp) = &cp {
            self.cp_seq = seq;
            self.cp_at = Instant::now();
            self.tail_cp = Some(cp.clone());
            self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        } else if has_records {
            self.tail_cp = None;
        }
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.records.fetch_add(record_count, Ordering::Relaxed);
        if self.stdout {
            let mut out = io::stdout().lock();
            let _ = out.write_all(&buf).and_then(|()| out.flush());
        }
        Ok((first, cp))
    }

    /// Closes the active file with a checkpoint, renames it `audit-<first>-<last>.jsonl` and
    /// starts a new one that begins with the same checkpoint.
    fn rotate(&mut self) -> Result<(), AuditError> {
        let Some(first) = self.file_first else { return Ok(()) };
        // Never rename a file that still holds the bytes of a failed batch.
        self.repair()?;
        // The file ends with a checkpoint covering its last record: the one just written, or a
        // new one.
        let mut line = match self.tail_cp.clone() {
            Some(cp) => cp,
            None => {
                self.write_batch(Vec::new(), CpWant::Always(Map::new()), None)?.1.expect("always written")
            }
        };
        line.push(b'\n');
        // A rotated file is complete on disk: the journal keeps only the active file's bytes.
        self.sync_active().map_err(|e| io_err("fsync", &self.dir.join(ACTIVE), e))?;
        let (active, tmp) = (self.dir.join(ACTIVE), self.dir.join(ACTIVE_TMP));
        let rotated = self.dir.join(rotated_name(first, self.last_seq));
        let file = create_with(&tmp, &line).map_err(|e| io_err("create", &tmp, e))?;
        fs::rename(&active, &rotated).map_err(|e| io_err("rename", &active, e))?;
        if let Err(e) = fs::rename(&tmp, &active) {
            let _ = fs::rename(&rotated, &active);
            return Err(io_err("rename", &tmp, e));
        }
        // From here the new file is current; if the directory cannot be synced, nothing is
        // acknowledged until it can.
        self.file = Arc::new(file);
        self.file_key = journal::file_key(&line);
        self.len = line.len() as u64;
        self.file_first = None;
        self.file_created = SystemTime::now();
        self.tail_cp = None;
        self.stats.rotations.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = sync_dir(&self.dir) {
            self.dir_dirty = true;
            return Err(io_err("fsync", &self.dir, e));
        }
        Ok(())
    }

    /// Deletes the oldest rotated files whose newest record is older than the retention, and
    /// then, while the rotated files together exceed `max_total_bytes`, the oldest of the rest;
    /// always whole files, in chain order, and only after a signed checkpoint has recorded
    /// `prunedThrough` (so `verify` tells pruning from deletion). The active file is never
    /// pruned.
    fn prune(&mut self) -> Result<(), AuditError> {
        let cutoff = self.retention.and_then(|r| SystemTime::now().checked_sub(r)).map(unix_us);
        if cutoff.is_none() && self.max_total_bytes.is_none() {
            return Ok(());
        }
        let rotated = list_rotated(&self.dir).map_err(|e| io_err("list", &self.dir, e))?;
        let mut sizes = Vec::with_capacity(rotated.len());
        for (_, _, path) in &rotated {
            sizes.push(fs::metadata(path).map_err(|e| io_err("stat", path, e))?.len());
        }
        let mut total: u64 = sizes.iter().sum();
        let mut doomed = Vec::new();
        let mut through = self.pruned_through;
        let mut over_size = 0usize;
        let mut reader = None;
        for ((_, last, path), size) in rotated.into_iter().zip(sizes) {
            if last > self.last_seq {
                break;
            }
            if last > self.pruned_through {
                let too_big = self.max_total_bytes.is_some_and(|max| total > max);
                if !too_big {
                    let Some(cutoff) = cutoff else { break };
                    let reader = match &reader {
                        Some(r) => r,
                        None => reader.insert(index::open_reader(&self.dir.join(INDEX))?),
                    };
                    let newest = match index::time_of(reader, last)? {
                        Some(t) => t,
                        None => fs::metadata(&path)
                            .and_then(|m| m.modified())
                            .map(unix_us)
                            .map_err(|e| io_err("stat", &path, e))?,
                    };
                    if newest >= cutoff {
                        break;
                    }
                } else {
                    over_size += 1;
                }
                through = last;
            }
            total = total.saturating_sub(size);
            doomed.push(path);
        }
        if through > self.pruned_through {
            self.write_batch(Vec::new(), CpWant::Always(Map::new()), Some(through))?;
            // No query may find an index row whose file is gone.
            self.sync_index()?;
        }
        let mut removed = 0;
        let removal = doomed.iter().try_for_each(|path| {
            fs::remove_file(path).map_err(|e| io_err("remove", path, e))?;
            removed += 1;
            Ok(())
        });
        // Counted once per pass, so a reader of the stats sees whole passes: the retention test
        // compared the files left with a count taken between two removals (under load).
        self.stats.pruned_files.fetch_add(removed, Ordering::Relaxed);
        removal?;
        if !doomed.is_empty() {
            sync_dir(&self.dir).map_err(|e| io_err("fsync", &self.dir, e))?;
            tracing::info!(files = doomed.len(), through, "audit: retention pruned rotated files");
        }
        if over_size > 0 {
            // Records leave before their age: an operator should know the bound is what keeps
            // the log, and ship the files off the host if they must be kept longer.
            tracing::warn!(
                files = over_size,
                through,
                max_total_bytes = self.max_total_bytes,
                "audit: the size bound pruned rotated files before their retention age; records through \
                 seq {through} are gone from this host"
            );
        }
        Ok(())
    }

    fn maintenance(&mut self) {
        let now = Instant::now();
        if self.last_seq > self.cp_seq && self.cp_at.elapsed() >= self.checkpoint_interval {
            if let Err(e) = self.write_batch(Vec::new(), CpWant::IfNew, None) {
                tracing::error!("audit: checkpoint failed: {e}");
            }
        }
        let age = SystemTime::now().duration_since(self.file_created).unwrap_or_default();
        if self.file_first.is_some()
            && (self.len >= self.max_file_bytes || age >= self.max_file_age)
            && self.rotate_after.is_none_or(|t| now >= t)
        {
            match self.rotate() {
                Ok(()) => {
                    self.rotate_after = None;
                    // A rotation is what grows the rotated files: apply the size bound now.
                    if self.max_total_bytes.is_some() {
                        self.next_prune = now;
                    }
                }
                Err(e) => {
                    tracing::error!("audit: rotation failed (will retry): {e}");
                    self.rotate_after = Some(now + ROTATE_RETRY);
                }
            }
        }
        if (self.retention.is_some() || self.max_total_bytes.is_some()) && now >= self.next_prune {
            self.next_prune = now + PRUNE_EVERY;
            if let Err(e) = self.prune() {
                tracing::error!("audit: retention failed: {e}");
            }
        }
    }

    /// When the loop must wake up without a message.
    fn next_wakeup(&self) -> Instant {
        let now = Instant::now();
        let mut at = now + Duration::from_secs(3600);
        if self.last_seq > self.cp_seq {
            at = at.min(self.cp_at + self.checkpoint_interval);
        }
        if self.file_first.is_some() {
            let age = SystemTime::now().duration_since(self.file_created).unwrap_or_default();
            let rotate = now + self.max_file_age.saturating_sub(age);
            at = at.min(self.rotate_after.map_or(rotate, |t| rotate.max(t)));
        }
        if self.retention.is_some() || self.max_total_bytes.is_some() {
            at = at.min(self.next_prune);
        }
        at
    }

    /// Starts the index thread, which takes over the index from here on.
    pub(crate) fn start_indexer(&mut self) -> Result<(), AuditError> {
        let Some(index) = self.index.take() else { return Ok(()) };
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("coffer-audit-index".into())
            .spawn(move || indexer::run(index, rx))
            .map_err(|e| AuditError::Io(format!("cannot start the audit index thread: {e}")))?;
        self.to_index = Some(tx);
        self.indexer = Some(thread);
        Ok(())
    }

    /// Waits until the index thread has committed everything sent so far.
    fn sync_index(&self) -> Result<(), AuditError> {
        let Some(tx) = &self.to_index else { return Ok(()) };
        let (ack, done) = oneshot::channel();
        tx.send(IndexMsg::Sync(ack))
            .map_err(|_| AuditError::Unavailable("the audit index thread has stopped".into()))?;
        done.blocking_recv()
            .map_err(|_| AuditError::Unavailable("the audit index thread has stopped".into()))?
    }

    /// Commits everything to the index and ends the index thread.
    fn stop_indexer(&mut self) {
        if let Some(tx) = self.to_index.take() {
            let _ = tx.send(IndexMsg::Stop);
        }
        if let Some(thread) = self.indexer.take() {
            let _ = thread.join();
        }
    }

    pub(crate) fn run(mut self, rx: Receiver<Msg>) {
        type Waiter = oneshot::Sender<Result<(), AuditError>>;
        fn take(
            msg: Msg,
            records: &mut Vec<(Pending, Ack)>,
            waiters: &mut Vec<Waiter>,
            stop: &mut bool,
            to_index: Option<&Sender<IndexMsg>>,
        ) {
            match msg {
                Msg::Record { body, cols, ack } => records.push(((body, cols), ack)),
                // Forwarded in order: the index thread answers once it has committed the rows
                // of every record acknowledged before.
                Msg::SyncIndex(ack) => match to_index {
                    Some(tx) => {
                        if let Err(mpsc::SendError(IndexMsg::Sync(ack))) = tx.send(IndexMsg::Sync(ack)) {
                            let _ = ack.send(Err(AuditError::Closed));
                        }
                    }
                    None => {
                        let _ = ack.send(Ok(()));
                    }
                },
                Msg::Checkpoint(ack) => waiters.push(ack),
                Msg::Shutdown(ack) => {
                    waiters.push(ack);
                    *stop = true;
                }
            }
        }
        loop {
            let timeout = self.next_wakeup().saturating_duration_since(Instant::now());
            let mut records: Vec<(Pending, Ack)> = Vec::new();
            let mut waiters = Vec::new();
            let mut stop = false;
            let mut closed = false;
            match rx.recv_timeout(timeout) {
                Ok(msg) => take(msg, &mut records, &mut waiters, &mut stop, self.to_index.as_ref()),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => closed = true,
            }
            while !closed && records.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(msg) => take(msg, &mut records, &mut waiters, &mut stop, self.to_index.as_ref()),
                    Err(TryRecvError::Empty) => {
                        // Checkpoint requests and shutdown do not wait.
                        let hold = if records.is_empty() || !waiters.is_empty() || stop {
                            None
                        } else {
                            self.pacer.hold_until(Instant::now())
                        };
                        match hold {
                            // Sleeping (not blocking on the channel) also spares senders a wake-up.
                            Some(due) => std::thread::sleep(due.saturating_duration_since(Instant::now())),
                            None => break,
                        }
                    }
                    Err(TryRecvError::Disconnected) => closed = true,
                }
            }
            if !records.is_empty() {
                self.pacer.started(records.len(), Instant::now());
            }
            if !records.is_empty() || !waiters.is_empty() || closed {
                let want = if waiters.is_empty() && !closed { CpWant::Auto } else { CpWant::IfNew };
                let (bodies, acks): (Vec<_>, Vec<_>) = records.into_iter().unzip();
                let count = bodies.len();
                let result = self.write_batch(bodies, want, None);
                if result.is_err() && count > 0 {
                    self.stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                }
                self.stats.failing.store(result.is_err(), Ordering::Relaxed);
                if let Err(e) = &result {
                    tracing::error!("audit: {count} record(s) not written, requests fail closed: {e}");
                }
                for (i, ack) in acks.into_iter().enumerate() {
                    let _ =
                        ack.send(result.as_ref().map(|(first, _)| first + i as u64).map_err(Clone::clone));
                }
                // A checkpoint request or shutdown returns once the index holds everything before
                // it (the head already covers it). Shutdown ends the index thread.
                let mut result = result.map(|_| ());
                if stop || closed {
                    self.stop_indexer();
                } else if !waiters.is_empty() && result.is_ok() {
                    result = self.sync_index();
                }
                for ack in waiters {
                    let _ = ack.send(result.clone());
                }
            }
            if stop || closed {
                self.close_journal();
                // The batch above ran (a shutdown has its waiter, a closed channel forces it) and
                // stopped the index thread.
                let st = self.stats.snapshot();
                tracing::info!(
                    records = st.records,
                    group_commits = st.batches,
                    checkpoints = st.checkpoints,
                    rotations = st.rotations,
                    failed = st.failed_batches,
                    "audit: log closed"
                );
                return;
            }
            self.maintenance();
        }
    }
}

#[cfg(test)]
mod pacer_tests {
    use super::Pacer;
    use std::time::{Duration, Instant};

    #[test]
    fn pacing_starts_with_busy_commits_and_stops_with_quiet_ones() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut p = Pacer::new(ms(2));
        // Light and moderate concurrency: never held.
        for records in [1, 2, 8, 16] {
            p.started(records, t0);
            assert_eq!(p.hold_until(t0), None, "batch of {records}");
        }
        // A busy commit: the next one waits until 2 ms after it began, and no longer.
        p.started(17, t0);
        assert_eq!(p.hold_until(t0 + ms(1)), Some(t0 + ms(2)));
        assert_eq!(p.hold_until(t0 + ms(2)), None);
        // Batches of 8 to 16 keep pacing (hysteresis) …
        p.started(8, t0 + ms(2));
        assert_eq!(p.hold_until(t0 + ms(3)), Some(t0 + ms(4)));
        // … one of fewer than 8 stops it.
        p.started(7, t0 + ms(4));
        assert_eq!(p.hold_until(t0 + ms(4)), None);
        // Zero turns pacing off.
        let mut off = Pacer::new(Duration::ZERO);
        off.started(500, t0);
        assert_eq!(off.hold_until(t0), None);
    }
}
