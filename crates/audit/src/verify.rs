//! Offline verification of the JSONL files: hash chain, checkpoint signatures, file
//! boundaries, the signed head (tail truncation) and the retention point.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::Serialize;

use crate::canon::{is_lower_hex, unseal};
use crate::files::{
    list_rotated, parse_lines, parse_rotated_name, parse_signed_bytes, Entry, Kind, Parsed, Rec, Signed,
    ACTIVE, INDEX,
};

/// The signed head of the log in `dir`: the head file, or (a log written before the head file
/// existed) the head its index holds.
fn read_head(dir: &Path, index: Option<&Connection>) -> Option<Vec<u8>> {
    if let Ok(Some(line)) = crate::files::read_head_file(dir) {
        if !line.is_empty() {
            return Some(line);
        }
    }
    index?
        .query_row("SELECT value FROM meta WHERE key = 'head'", [], |r| r.get::<_, String>(0))
        .optional()
        .ok()
        .flatten()
        .map(String::into_bytes)
}
use crate::journal;
use crate::keys::Verifier;

/// At most this many problems are listed (the first one is what matters).
const MAX_PROBLEMS: usize = 1000;

/// What is wrong at a place in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ProblemKind {
    /// A record's content no longer matches its hash, a line is corrupt, or a record was
    /// replaced.
    Modified,
    /// A record (or checkpoint) that is not part of the chain: forged or duplicated.
    Inserted,
    /// Records (or checkpoints, or whole files) are missing.
    Deleted,
    /// Records are out of order.
    Reordered,
    /// The end of the log (or of a rotated file) was cut off.
    Truncated,
    /// A checkpoint or the head has a bad signature or an unknown key.
    BadSignature,
    /// A correctly signed checkpoint attests a different chain than the one in the file: the
    /// records before it were altered and re-hashed.
    CheckpointMismatch,
    /// Records after the signed head: not covered by any signature.
    Unattested,
    /// A file, the head or the public key is missing or unreadable.
    Missing,
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProblemKind::Modified => "modified",
            ProblemKind::Inserted => "inserted",
            ProblemKind::Deleted => "deleted",
            ProblemKind::Reordered => "reordered",
            ProblemKind::Truncated => "truncated",
            ProblemKind::BadSignature => "bad signature",
            ProblemKind::CheckpointMismatch => "checkpoint mismatch",
            ProblemKind::Unattested => "unattested",
            ProblemKind::Missing => "missing",
        })
    }
}

/// One finding, located by file and line (1-based) and, where known, the record's `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub kind: ProblemKind,
    pub file: PathBuf,
    pub line: Option<u64>,
    pub seq: Option<u64>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": {}", self.kind)?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The outcome of [`verify`]. `ok` is true exactly when `problems` is empty; the first problem
/// names the first bad record.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    /// Record lines read.
    pub records: u64,
    /// Checkpoint lines read.
    pub checkpoints: u64,
    pub problems: Vec<Problem>,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The seq the signed head attests (directory mode).
    pub head_seq: Option<u64>,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
    /// Information that is not a problem (pruning, recoveries, adopted records after a crash).
    pub notes: Vec<String>,
}

/// Verifies a log directory (every rotated file in order, then `audit.jsonl`, then the signed
/// head in `index.sqlite` and the retention point), or a single file, with one public key.
pub fn verify(dir_or_file: &Path, public_key_pem: &str) -> VerifyReport {
    verify_with_keys(dir_or_file, &[public_key_pem])
}

/// [`verify`] with several public keys (after a signing-key change, give the old ones too).
///
/// A directory that a running writer appends to and rotates can be verified: the head is read
/// first, then every file is opened (handles survive a rotation's renames) until the listing
/// is stable, and records after the head are checked against the head once more at the end.
pub fn verify_with_keys(dir_or_file: &Path, public_key_pems: &[&str]) -> VerifyReport {
    let mut w = Walker::new();
    let verifier = match Verifier::from_pems(public_key_pems) {
        Ok(v) => v,
        Err(e) => {
            w.problem(ProblemKind::Missing, dir_or_file, None, None, format!("public key: {e}"));
            return w.finish_report();
        }
    };
    let meta = match fs::metadata(dir_or_file) {
        Ok(m) => m,
        Err(e) => {
            w.problem(ProblemKind::Missing, dir_or_file, None, None, format!("cannot read: {e}"));
            return w.finish_report();
        }
    };
    let dir_mode = meta.is_dir();
    let (dir, single) = if dir_mode {
        (Some(dir_or_file.to_path_buf()), None)
    } else {
        let name = dir_or_file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let range = parse_rotated_name(name);
        // The active file's head lives beside it: use it when it is there.
        let dir = (name == ACTIVE).then(|| dir_or_file.parent().unwrap_or(Path::new(".")).to_path_buf());
        (dir, Some((dir_or_file.to_path_buf(), range)))
    };

    // The head is read before the files: a live writer commits it after the file, so the
    // files read afterwards hold at least what it attests.
    let index_path = dir.as_ref().map(|d| d.join(INDEX));
    let conn = index_path.as_ref().filter(|p| p.exists()).and_then(|p| {
        Connection::open_with_flags(p, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .ok()
    });
    let head = dir.as_deref().and_then(|d| read_head(d, conn.as_ref()));
    let head = match head.map(|line| parse_signed_bytes(&line, "head")) {
        Some(Ok(h)) => Some(h),
        Some(Err(e)) => {
            let head_path = dir.as_ref().map(|d| d.join(crate::files::HEAD));
            w.problem(ProblemKind::Modified, head_path.as_deref().unwrap_or(dir_or_file), None, None, e);
            None
        }
        None => None,
    };
    w.head_seq = head.as_ref().map(|h| h.seq);
    w.index = conn;

    let files = match single {
        Some((path, range)) => vec![(path.clone(), range, File::open(&path).map_err(|e| e.to_string()))],
        None => match snapshot(dir_or_file) {
            Ok(files) => files,
            Err(e) => {
                w.problem(ProblemKind::Missing, dir_or_file, None, None, e);
                return w.finish_report();
            }
        },
    };
    if files.is_empty() {
        w.problem(ProblemKind::Missing, dir_or_file, None, None, "no audit files".into());
    }
    // One file of lookahead, so records moved across a file boundary read as reordered.
    let count = files.len();
    // What the commit journal holds beyond the active file (noted, not used: verify reports
    // the files as they are). Read before the files' contents: on a live log every batch in it
    // was appended to the file before it was journaled. An unreadable journal counts as empty.
    let journaled =
        dir.as_deref().and_then(|d| journal::read_pending(d).ok()).map(|(_, p)| p).unwrap_or_default();
    let mut unwritten = 0;
    let mut files = files.into_iter().map(|(p, r, f)| {
        let loaded = Loaded::read(p, r, f);
        if let (None, Ok(bytes)) = (loaded.range, &loaded.bytes) {
            unwritten = journal::unwritten(&journaled, bytes);
        }
        loaded
    });
    let mut next = files.next();
    for _ in 0..count {
        let current = next.take().expect("loaded");
        next = files.next();
        let mut later = current.seqs();
        if let Some(n) = &next {
            later.extend(n.seqs());
        }
        w.file(&verifier, current, &later);
    }
    drop(files);
    if unwritten > 0 {
        w.report.notes.push(format!(
            "the commit journal holds {unwritten} bytes of acknowledged records that {ACTIVE} does not: after an \
             OS crash, bytes the OS had not yet written to the file (opening the log writes them back); otherwise \
             the file was changed after they were written"
        ));
    }
    // Problems with the head are reported at the head file.
    let index_path =
        dir.as_ref().map(|d| d.join(crate::files::HEAD)).unwrap_or_else(|| dir_or_file.to_path_buf());
    match head {
        Some(head) => w.check_head(&verifier, &head, &index_path, dir_mode),
        None if dir_mode => w.problem(
            ProblemKind::Missing,
            &index_path,
            None,
            None,
            "no signed head: a cut of the tail after the last checkpoint cannot be detected".into(),
        ),
        None => w.report.notes.push(
            "single file: the tail after its last checkpoint is checked only against the signed head of its \
             directory"
                .into(),
        ),
    }
    w.finish_report()
}

type Opened = (PathBuf, Option<(u64, u64)>, Result<File, String>);

/// Opens the active file and the rotated files of `dir` as one consistent view of a log that a
/// writer may be appending to, rotating and pruning meanwhile (the handles stay valid across
/// renames).
///
/// The active file is opened first. Rotation renames the active file, so the only file that
/// can become a rotated one after that is this very file (by inode), and only then the files
/// after it: a listed rotated file with the active handle's inode, and every one after it, are
/// left out (their records are in the handle, or come after it). A directory listing is not a
/// snapshot either (a file renamed while `readdir` runs can be missed while a later one is
/// seen), so the view is taken again until the rotated files it holds are contiguous and end
/// where the active file begins.
///
/// Why: the earlier "list, open, list again until nothing changed" never settled with a busy
/// writer rotating small files every few milliseconds, and the view returned after its last
/// try missed a file (`records … are missing between the previous file and this one`, in 3 of
/// 4 runs of `verify_of_a_live_rotating_log_passes` under load).
fn snapshot(dir: &Path) -> Result<Vec<Opened>, String> {
    use std::os::unix::fs::MetadataExt;
    let list = |dir: &Path| list_rotated(dir).map_err(|e| format!("cannot list: {e}"));
    let inode = |f: &File| f.metadata().map(|m| (m.dev(), m.ino())).ok();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let active_path = dir.join(ACTIVE);
        let active = match File::open(&active_path) {
            Ok(f) => Some((inode(&f), first_record_seq(&f), Ok(f))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Some((None, None, Err(e.to_string()))),
        };
        let active_inode = active.as_ref().and_then(|(ino, _, _)| *ino);
        let mut files: Vec<Opened> = Vec::new();
        let mut consistent = true;
        let mut reached: Option<u64> = None;
        for (first, last, path) in list(dir)? {
            match File::open(&path) {
                Ok(f) => {
                    if active_inode.is_some() && inode(&f) == active_inode {
                        break;
                    }
                    consistent &= reached.is_none_or(|r| first == r + 1);
                    reached = Some(last);
                    files.push((path, Some((first, last)), Ok(f)));
                }
                // Pruned or renamed meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => consistent = false,
                Err(e) => files.push((path, Some((first, last)), Err(e.to_string()))),
            }
        }
        if let Some((_, active_first, file)) = active {
            consistent &= match (reached, active_first) {
                (Some(r), Some(a)) => a == r + 1,
                _ => true,
            };
            files.push((active_path, None, file));
        }
        if consistent || attempt == 50 {
            return Ok(files);
        }
    }
}

/// The seq of the first record in `file` (read at offset 0 without moving its cursor), if its
/// first 64 KiB hold one.
fn first_record_seq(file: &File) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let mut head = vec![0u8; 64 * 1024];
    let n = file.read_at(&mut head, 0).ok()?;
    parse_lines(&head[..n]).entries.into_iter().find_map(|e| match e.kind {
        Kind::Rec(r) => Some(r.seq),
        _ => None,
    })
}

/// A file read and parsed ahead of its turn.
struct Loaded {
    path: PathBuf,
    range: Option<(u64, u64)>,
    bytes: Result<Vec<u8>, String>,
    parsed: Option<Parsed>,
}

impl Loaded {
    fn read(path: PathBuf, range: Option<(u64, u64)>, file: Result<File, String>) -> Self {
        let bytes = file.and_then(|mut f| {
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).map(|_| bytes).map_err(|e| e.to_string())
        });
        let parsed = bytes.as_ref().ok().map(|b| parse_lines(b));
        Loaded { path, range, bytes, parsed }
    }

    fn seqs(&self) -> HashSet<u64> {
        self.parsed
            .iter()
            .flat_map(|p| p.entries.iter())
            .filter_map(|e| match &e.kind {
                Kind::Rec(r) => Some(r.seq),
                _ => None,
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
struct Loc {
    file: PathBuf,
    line: u64,
}

struct Walker {
    report: VerifyReport,
    /// The chain point reached: (seq, hash).
    state: Option<(u64, String)>,
    /// The hash before `state` when `state` was set by a record.
    pp: Option<String>,
    last_rec: Option<(u64, Loc)>,
    last_loc: Option<Loc>,
    /// (n, seq, hash) of the last valid checkpoint.
    last_cp: Option<(u64, u64, String)>,
    max_cp_n: Option<u64>,
    max_pruned: u64,
    first_anchor: Option<(u64, Loc)>,
    /// After a problem: follow the chain silently until a record links correctly again.
    resync: bool,
    head_seq: Option<u64>,
    head_found: Option<(String, Loc)>,
    first_after_head: Option<(u64, Loc)>,
    index: Option<Connection>,
    /// Records since the last checkpoint in the current file: (seq, line, text).
    since_cp: Vec<(u64, u64, String)>,
}

impl Walker {
    fn new() -> Self {
        Walker {
            report: VerifyReport::default(),
            state: None,
            pp: None,
            last_rec: None,
            last_loc: None,
            last_cp: None,
            max_cp_n: None,
            max_pruned: 0,
            first_anchor: None,
            resync: false,
            head_seq: None,
            head_found: None,
            first_after_head: None,
            index: None,
            since_cp: Vec::new(),
        }
    }

    fn problem(
        &mut self,
        kind: ProblemKind,
        file: &Path,
        line: Option<u64>,
        seq: Option<u64>,
        message: String,
    ) {
        if self.report.problems.len() < MAX_PROBLEMS {
            self.report.problems.push(Problem { kind, file: file.to_path_buf(), line, seq, message });
        }
    }

    fn at(&mut self, kind: ProblemKind, loc: &Loc, seq: Option<u64>, message: String) {
        self.problem(kind, &loc.file.clone(), Some(loc.line), seq, message);
    }

    fn finish_report(mut self) -> VerifyReport {
        self.report.ok = self.report.problems.is_empty();
        self.report
    }

    fn advance(&mut self, seq: u64, hash: String, loc: &Loc) {
        self.pp = self.state.as_ref().map(|(_, h)| h.clone());
        self.state = Some((seq, hash));
        self.last_rec = Some((seq, loc.clone()));
    }

    fn file(&mut self, verifier: &Verifier, loaded: Loaded, here: &HashSet<u64>) {
        let Loaded { path, range, bytes, parsed } = loaded;
        let path = path.as_path();
        self.report.files.push(path.to_path_buf());
        let (bytes, parsed) = match (bytes, parsed) {
            (Ok(b), Some(p)) => (b, p),
            (Err(e), _) => {
                self.problem(ProblemKind::Missing, path, None, None, format!("cannot read: {e}"));
                return;
            }
            (Ok(_), None) => unreachable!("parsed whenever read"),
        };
        let mut seen = HashSet::new();
        let (mut first_rec, mut last_rec) = (None, None);
        self.since_cp.clear();
        for (i, e) in parsed.entries.iter().enumerate() {
            let loc = Loc { file: path.to_path_buf(), line: e.line };
            if i == 0 && !matches!(e.kind, Kind::Cp(_)) {
                self.at(
                    ProblemKind::Deleted,
                    &loc,
                    None,
                    "the file does not begin with its signed opening checkpoint".into(),
                );
                self.resync = true;
            }
            match &e.kind {
                Kind::Bad { reason, seq_guess } => {
                    self.report.records += 1;
                    self.at(
                        ProblemKind::Modified,
                        &loc,
                        *seq_guess,
                        format!("the line is not a valid record or checkpoint ({reason}): it was changed"),
                    );
                    self.resync = true;
                }
                Kind::Cp(c) => self.checkpoint(verifier, c, &loc, i == 0),
                Kind::Rec(r) => {
                    first_rec.get_or_insert(r.seq);
                    last_rec = Some(r.seq);
                    self.since_cp.push((
                        r.seq,
                        e.line,
                        String::from_utf8_lossy(&bytes[e.start..e.end]).into_owned(),
                    ));
                    self.record(r, &loc, &parsed.entries, i, here, &mut seen);
                }
            }
            self.last_loc = Some(loc);
        }
        if let Some((start, _)) = parsed.torn {
            let loc = Loc { file: path.to_path_buf(), line: parsed.entries.len() as u64 + 1 };
            let guess = match crate::files::parse_line(&bytes[start..]) {
                Kind::Bad { seq_guess, .. } => seq_guess,
                _ => None,
            };
            // In the active file after the signed head, an incomplete last line is a write in
            // progress or a write torn by a crash (never acknowledged; the next open cuts it).
            let after_head = range.is_none()
                && self.head_seq.is_some_and(|h| self.state.as_ref().is_some_and(|(s, _)| *s >= h));
            if after_head {
                self.report.notes.push(format!(
                    "{}:{}: an incomplete last line after the signed head (a write in progress, or torn by a crash)",
                    loc.file.display(),
                    loc.line
                ));
            } else {
                self.at(
                    ProblemKind::Truncated,
                    &loc,
                    guess,
                    "the file ends in the middle of a line (cut, or a write torn by a crash)".into(),
                );
            }
        }
        if let Some((first, last)) = range {
            let closed = matches!(
                (parsed.entries.last().map(|e| &e.kind), &self.state),
                (Some(Kind::Cp(c)), Some((s, h))) if c.seq == *s && c.hash == *h
            );
            if !closed && parsed.torn.is_none() {
                let loc = self.last_loc.clone().unwrap_or(Loc { file: path.to_path_buf(), line: 0 });
                self.at(
                    ProblemKind::Truncated,
                    &loc,
                    last_rec,
                    "the rotated file does not end with its closing checkpoint: its tail was cut".into(),
                );
            }
            if first_rec != Some(first) || last_rec != Some(last) {
                let kind = if last_rec.is_none_or(|l| l < last) {
                    ProblemKind::Truncated
                } else {
                    ProblemKind::Modified
                };
                self.problem(
                    kind,
                    path,
                    None,
                    last_rec,
                    format!(
                        "the file was rotated holding seqs {first}..={last} but now holds {}",
                        match (first_rec, last_rec) {
                            (Some(a), Some(b)) => format!("{a}..={b}"),
                            _ => "no records".into(),
                        }
                    ),
                );
            }
        }
    }

    fn record(
        &mut self,
        r: &Rec,
        loc: &Loc,
        entries: &[Entry],
        i: usize,
        here: &HashSet<u64>,
        seen: &mut HashSet<u64>,
    ) {
        use ProblemKind::*;
        self.report.records += 1;
        self.report.first_seq = Some(self.report.first_seq.map_or(r.seq, |f| f.min(r.seq)));
        self.report.last_seq = Some(self.report.last_seq.map_or(r.seq, |l| l.max(r.seq)));
        let seen_before = !seen.insert(r.seq);
        if Some(r.seq) == self.head_seq {
            self.head_found = Some((r.hash.clone(), loc.clone()));
        }
        if self.head_seq.is_some_and(|h| r.seq > h) && self.first_after_head.is_none() {
            self.first_after_head = Some((r.seq, loc.clone()));
        }
        let next = entries.get(i + 1).map(|e| &e.kind);
        let links_to = |h: &str| match next {
            Some(Kind::Rec(n)) => n.prev == h,
            Some(Kind::Cp(c)) => c.hash == h,
            _ => false,
        };
        if !r.hash_ok() {
            self.at(
                Modified,
                loc,
                Some(r.seq),
                "the record does not match its hash: its content was changed".into(),
            );
            let h = if links_to(&r.computed) { r.computed.clone() } else { r.hash.clone() };
            self.advance(r.seq, h, loc);
            self.resync = true;
            return;
        }
        let Some((s, sh)) = self.state.clone() else {
            self.advance(r.seq, r.hash.clone(), loc);
            return;
        };
        let exp = s + 1;
        if r.seq == exp && r.prev == sh {
            self.advance(r.seq, r.hash.clone(), loc);
            self.resync = false;
            return;
        }
        if self.resync {
            self.advance(r.seq, r.hash.clone(), loc);
            return;
        }
        if r.seq == s && self.pp.as_deref() == Some(r.prev.as_str()) {
            // Two records claim the same place in the chain; the one the chain continues
            // from is genuine, the other was inserted.
            if links_to(&r.hash) {
                let prev = self.last_rec.clone().map(|(_, l)| l).unwrap_or_else(|| loc.clone());
                self.at(
                    Inserted,
                    &prev,
                    Some(s),
                    format!(
                        "this record was inserted: seq {s} at line {} is the one the chain continues from",
                        loc.line
                    ),
                );
                let pp = self.pp.clone();
                self.advance(r.seq, r.hash.clone(), loc);
                self.pp = pp;
            } else {
                self.at(
                    Inserted,
                    loc,
                    Some(r.seq),
                    format!(
                        "this record was inserted: it repeats seq {s} and the chain continues without it"
                    ),
                );
            }
            return;
        }
        if r.seq == exp {
            if matches!(next, Some(Kind::Rec(n)) if n.prev == sh && n.seq == exp) {
                self.at(
                    Inserted,
                    loc,
                    Some(r.seq),
                    format!(
                        "this record was inserted: it does not link to seq {s}, and the record after it does"
                    ),
                );
                return;
            }
            match self.last_rec.clone() {
                Some((prev_seq, prev_loc)) if prev_seq == s => self.at(
                    Modified,
                    &prev_loc,
                    Some(s),
                    format!(
                        "record seq {s} was replaced: the next record (seq {exp}, line {}) links to a different hash",
                        loc.line
                    ),
                ),
                _ => self.at(
                    Modified,
                    loc,
                    Some(r.seq),
                    format!("the record does not link to the chain before it (seq {s})"),
                ),
            }
            self.advance(r.seq, r.hash.clone(), loc);
            self.resync = true;
            return;
        }
        if r.seq > exp {
            if here.contains(&exp) && !seen.contains(&exp) {
                self.at(
                    Reordered,
                    loc,
                    Some(r.seq),
                    format!("record seq {} appears before seq {exp}", r.seq),
                );
            } else if r.seq == exp + 1 {
                self.at(Deleted, loc, Some(r.seq), format!("record seq {exp} is missing before this record"));
            } else {
                self.at(
                    Deleted,
                    loc,
                    Some(r.seq),
                    format!("records {exp}..={} are missing before this record", r.seq - 1),
                );
            }
            self.advance(r.seq, r.hash.clone(), loc);
            self.resync = true;
            return;
        }
        if seen_before {
            self.at(
                Inserted,
                loc,
                Some(r.seq),
                format!("a second record with seq {} (duplicate or forged)", r.seq),
            );
            return;
        }
        self.at(Reordered, loc, Some(r.seq), format!("record seq {} appears after seq {s}", r.seq));
        self.advance(r.seq, r.hash.clone(), loc);
        self.resync = true;
    }

    fn checkpoint(&mut self, verifier: &Verifier, c: &Signed, loc: &Loc, file_start: bool) {
        use ProblemKind::*;
        self.report.checkpoints += 1;
        if let Err(e) = verifier.verify(&c.key_id, &c.body, &c.signature) {
            self.at(BadSignature, loc, Some(c.seq), format!("checkpoint {}: {e}", c.n));
            self.resync = true;
            return;
        }
        for (field, what) in [
            ("recovery", "the writer recovered from a damaged log"),
            ("adopted", "records written but not acknowledged before a crash were adopted"),
            ("discardedBytes", "a torn tail was cut after a crash"),
            ("previousKeyId", "the signing key changed"),
        ] {
            if let Some(v) = c.value.get(field) {
                self.report.notes.push(format!(
                    "{}:{}: checkpoint {}: {what}: {v}",
                    loc.file.display(),
                    loc.line,
                    c.n
                ));
            }
        }
        self.max_cp_n = Some(self.max_cp_n.map_or(c.n, |m| m.max(c.n)));
        self.max_pruned = self.max_pruned.max(c.pruned_through);
        if let Some((n, seq, hash)) = self.last_cp.clone() {
            let repeat = c.n == n && c.seq == seq && c.hash == hash;
            if c.n != n + 1 && !(file_start && repeat) {
                if c.n > n + 1 {
                    self.at(
                        Deleted,
                        loc,
                        Some(c.seq),
                        format!("checkpoints {}..={} are missing", n + 1, c.n - 1),
                    );
                } else if repeat {
                    self.at(Inserted, loc, Some(c.seq), format!("checkpoint {} appears twice", c.n));
                } else {
                    self.at(
                        Reordered,
                        loc,
                        Some(c.seq),
                        format!("checkpoint {} appears after checkpoint {n}", c.n),
                    );
                }
            }
        }
        self.last_cp = Some((c.n, c.seq, c.hash.clone()));
        let prev_cp_records = std::mem::take(&mut self.since_cp);
        match self.state.clone() {
            None => {
                self.state = Some((c.seq, c.hash.clone()));
                self.pp = None;
                self.first_anchor = Some((c.seq, loc.clone()));
                if c.seq > 0 {
                    self.report.notes.push(format!(
                        "the log starts after seq {} (older records were pruned or are in files not given)",
                        c.seq
                    ));
                }
            }
            Some((s, h)) if s == c.seq && h == c.hash => {}
            Some((s, h)) => {
                if file_start {
                    if c.seq > s {
                        self.at(
                            Deleted,
                            loc,
                            Some(c.seq),
                            format!(
                                "records {}..={} are missing between the previous file and this one",
                                s + 1,
                                c.seq
                            ),
                        );
                    } else if c.seq < s {
                        self.at(
                            Inserted,
                            loc,
                            Some(c.seq),
                            format!(
                                "this file starts after seq {} but the previous file reached seq {s}",
                                c.seq
                            ),
                        );
                    } else {
                        self.at(
                            Modified,
                            loc,
                            Some(c.seq),
                            format!("the previous file ends with a different record seq {s} than this file's checkpoint attests"),
                        );
                    }
                } else if self.resync {
                    // A problem since the previous checkpoint was already reported.
                    self.at(
                        CheckpointMismatch,
                        loc,
                        Some(c.seq),
                        format!(
                            "checkpoint {} attests seq {}; the chain before it is at seq {s}",
                            c.n, c.seq
                        ),
                    );
                } else {
                    // The chain is consistent but not the one that was signed: records were
                    // altered and re-hashed. Name the first one that differs from its copy in
                    // the index, if there is an index.
                    let (kind, what) = match c.seq.cmp(&s) {
                        std::cmp::Ordering::Less => (Inserted, "inserted"),
                        std::cmp::Ordering::Greater => (Deleted, "deleted"),
                        std::cmp::Ordering::Equal => (CheckpointMismatch, "modified"),
                    };
                    let summary = format!(
                        "checkpoint {} attests seq {} hash {}…, but the chain before it reaches seq {s} hash {}…: \
                         records since the previous checkpoint were {what} and re-hashed",
                        c.n,
                        c.seq,
                        &c.hash[..c.hash.len().min(12)],
                        &h[..h.len().min(12)]
                    );
                    match self.locate(&prev_cp_records) {
                        Some((seq, line)) => self.at(
                            kind,
                            &Loc { file: loc.file.clone(), line },
                            Some(seq),
                            format!("record seq {seq} differs from its copy in the index; {summary}"),
                        ),
                        None => self.at(kind, loc, Some(c.seq), summary),
                    }
                }
                self.state = Some((c.seq, c.hash.clone()));
                self.pp = None;
                self.resync = true;
            }
        }
        if self.head_seq == Some(c.seq) && self.head_found.is_none() {
            self.head_found = Some((c.hash.clone(), loc.clone()));
        }
    }

    /// With the index (a second copy of every record's hash), names the first record since the
    /// previous checkpoint whose hash differs from its copy.
    fn locate(&self, records: &[(u64, u64, String)]) -> Option<(u64, u64)> {
        let conn = self.index.as_ref()?;
        for (seq, line, text) in records {
            let copy = crate::index::hash_of(conn, *seq);
            let stored = unseal(text.as_bytes(), "hash", is_lower_hex).and_then(|(_, h)| hex::decode(h).ok());
            if copy.is_none() || copy != stored {
                return Some((*seq, *line));
            }
        }
        None
    }

    fn check_head(&mut self, verifier: &Verifier, head: &Signed, index_path: &Path, dir_mode: bool) {
        use ProblemKind::*;
        if let Err(e) = verifier.verify(&head.key_id, &head.body, &head.signature) {
            self.problem(BadSignature, index_path, None, Some(head.seq), format!("the signed head: {e}"));
            return;
        }
        self.report.head_seq = Some(head.seq);
        let end = self.state.clone();
        let end_seq = end.as_ref().map_or(0, |(s, _)| *s);
        let last = self.last_loc.clone().unwrap_or(Loc { file: index_path.to_path_buf(), line: 0 });
        match self.head_found.clone() {
            Some((hash, loc)) if hash != head.hash => self.at(
                CheckpointMismatch,
                &loc,
                Some(head.seq),
                format!("the signed head attests a different hash for seq {}: records up to it were altered", head.seq),
            ),
            Some(_) => {}
            None if end_seq < head.seq => self.at(
                Truncated,
                &last,
                Some(end_seq),
                format!(
                    "the log ends at seq {end_seq} but the signed head attests seq {}: records {}..={} were cut off the tail",
                    head.seq,
                    end_seq + 1,
                    head.seq
                ),
            ),
            None => self.problem(
                Missing,
                index_path,
                None,
                Some(head.seq),
                format!("the record the signed head attests (seq {}) is not in the files", head.seq),
            ),
        }
        if let Some((seq, loc)) = self.first_after_head.clone() {
            // A live writer commits the head right after the file: give it a moment (at most
            // a second) to attest what was read.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            let covered = loop {
                let newer = index_path
                    .parent()
                    .and_then(|dir| read_head(dir, self.index.as_ref()))
                    .and_then(|l| parse_signed_bytes(&l, "head").ok())
                    .filter(|h| verifier.verify(&h.key_id, &h.body, &h.signature).is_ok());
                // A newer signed head at or beyond everything read: the writer moved on (a
                // record forged into the file would break the chain of the writer's next ones).
                let covered = matches!(
                    (&newer, &end),
                    (Some(h), Some((s, hash))) if (h.seq == *s && h.hash == *hash) || h.seq > *s
                );
                if covered || std::time::Instant::now() >= deadline {
                    break covered;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            };
            if !covered {
                self.at(
                    Unattested,
                    &loc,
                    Some(seq),
                    format!(
                        "records {seq}..={end_seq} come after the signed head (seq {}): no signature covers them \
                         (appended or forged; a crash leaves at most one batch here, which the next open adopts)",
                        head.seq
                    ),
                );
            }
        }
        if let Some(max) = self.max_cp_n {
            if head.n > max {
                self.at(Deleted, &last, None, format!("checkpoints {}..={} are missing", max + 1, head.n));
            }
        }
        if dir_mode {
            let pruned = head.pruned_through.max(self.max_pruned);
            if let Some((start, loc)) = self.first_anchor.clone() {
                if start > pruned {
                    self.at(
                        Deleted,
                        &loc,
                        Some(start),
                        format!(
                            "records {}..={start} are missing: files were deleted beyond the signed retention point \
                             (prunedThrough {pruned})",
                            pruned + 1
                        ),
                    );
                } else if start > 0 {
                    self.report.notes.push(format!("records through seq {pruned} were pruned by retention"));
                }
            }
        }
    }
}
