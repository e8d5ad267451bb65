//! The SQLite index: blocks of consecutive records (per record: time, where its line is in the
//! files, its hash) and postings (for each filterable term, the blocks and records that have it),
//! written by the index thread (`indexer`) in one transaction per commit. Queries find records
//! here and read their lines from the files. The index holds nothing the files do not: it can
//! be deleted and is rebuilt on open. (Before schema 3 it also held the signed head in `meta`,
//! which open moves to the `head` file.)

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::canon::unix_us;
use crate::event::{cols, Cols};
use crate::files::{list_rotated, ACTIVE};
use crate::{AuditError, AuditPage, AuditQuery};
use serde_json::Value;

const SCHEMA: &str = r#"
-- A block: records first_seq..=last_seq (consecutive seqs), committed together, with the range of
-- their times so time filters skip whole blocks.
CREATE TABLE IF NOT EXISTS blocks (
    first_seq INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    min_time_us INTEGER NOT NULL,
    max_time_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS blocks_max_time ON blocks (max_time_us);
-- Per block, per record in seq order (little-endian arrays): its time (i64), where its line is
-- (u64 offset, u32 length: bytes of the file holding its seq, a rotated file whose name covers
-- it, else audit.jsonl; rotation renames without rewriting, so offsets stay valid), and its
-- SHA-256, a second copy so `verify` can name the first record of a re-hashed (forged) stretch.
-- `terms` lists the block's posting terms (i64 ids), so retention can delete them.
CREATE TABLE IF NOT EXISTS block_records (
    first_seq INTEGER PRIMARY KEY,
    times BLOB NOT NULL,
    lines BLOB NOT NULL,
    hashes BLOB NOT NULL,
    terms BLOB NOT NULL
);
-- For each term, the blocks holding it and which of their records (u16 indexes into the block;
-- empty: every record of the block). A term is the first 8 bytes of the SHA-256 of a kind prefix
-- and the lowercased text (`p:` principal id or display name, `v:` vault, `s:` secret,
-- `o:` operation, `r:` result): no table of names to look up or grow. Queries check each record
-- they read against the filters, so a (vanishingly rare) collision costs a read, not a wrong
-- answer. `part` is the block's first seq >> PART_SHIFT, first in the key: new postings land in
-- the small, cached subtree of the current part, however many distinct terms (secrets) there
-- are; a query seeks its term once per part.
CREATE TABLE IF NOT EXISTS postings (
    part INTEGER NOT NULL,
    term INTEGER NOT NULL,
    block INTEGER NOT NULL,
    members BLOB NOT NULL,
    PRIMARY KEY (part, term, block)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"#;

/// Postings are grouped by parts of 2^PART_SHIFT seqs (see the schema). Why: keyed by term
/// alone, every record of a store of a million secrets inserted its posting at a random place
/// in a tree far larger than the page cache, so each index commit re-read and re-wrote
/// thousands of pages. A part's subtree stays a few MiB; a query pays one seek per part (one per
/// 65,536 records). Tests use small parts so that blocks straddle them.
const PART_SHIFT: u32 = if cfg!(test) { 11 } else { 16 };

fn part_of(block: i64) -> i64 {
    block >> PART_SHIFT
}

/// Schema 4 keyed postings by (term, block): they move to their parts, sorted so the new tree
/// is written in order, in one transaction.
fn migrate_4_to_5() -> String {
    format!(
        "BEGIN; \
         CREATE TABLE postings_5 (part INTEGER NOT NULL, term INTEGER NOT NULL, block INTEGER NOT NULL, \
             members BLOB NOT NULL, PRIMARY KEY (part, term, block)) WITHOUT ROWID; \
         INSERT INTO postings_5 (part, term, block, members) \
             SELECT block >> {PART_SHIFT}, term, block, members FROM postings ORDER BY 1, 2, 3; \
         DROP TABLE postings; \
         ALTER TABLE postings_5 RENAME TO postings; \
         PRAGMA user_version = {SCHEMA_VERSION}; \
         COMMIT;"
    )
}

/// Versions 1 to 3 have one row per record (with up to seven secondary indexes) and interned
/// names: they are dropped, and rebuilt from the files by open, while the signed head in `meta`
/// is kept.
const DROP_OLD_ROWS: &str = "DROP TABLE IF EXISTS records; DROP TABLE IF EXISTS names;";

/// The schema this code writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 5;

/// Drops everything the files can give back (the open then re-adds every record).
const DROP_FOR_REBUILD: &str = "DROP TABLE IF EXISTS postings; DROP TABLE IF EXISTS block_records; \
     DROP TABLE IF EXISTS blocks; DROP TABLE IF EXISTS meta; PRAGMA user_version = 0;";

/// Records per block at most (their indexes in a posting are u16).
pub(crate) const BLOCK_MAX: usize = 4096;

/// Terms kept in memory per kind.
const TERM_CACHE_MAX: usize = 100_000;

pub(crate) const MAX_LIMIT: usize = 1000;

const LINE_BYTES: usize = 12;
const HASH_BYTES: usize = 32;

fn db(e: rusqlite::Error) -> AuditError {
    AuditError::Unavailable(format!("audit index: {e}"))
}

pub(crate) struct IndexRow {
    pub seq: u64,
    pub cols: Cols,
    /// Where the line is in its file (without the newline).
    pub offset: u64,
    pub len: u32,
    pub hash: [u8; 32],
}

/// The kinds of term, with the prefix hashed before their text.
#[derive(Clone, Copy)]
enum Kind {
    Principal,
    Vault,
    Secret,
    Operation,
    Result,
}

impl Kind {
    const ALL: usize = 5;

    fn prefix(self) -> &'static str {
        match self {
            Kind::Principal => "p:",
            Kind::Vault => "v:",
            Kind::Secret => "s:",
            Kind::Operation => "o:",
            Kind::Result => "r:",
        }
    }

    /// The term of `text` (already lowercased).
    fn term(self, text: &str) -> i64 {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(self.prefix().as_bytes());
        ctx.update(text.as_bytes());
        let digest = ctx.finish();
        i64::from_le_bytes(digest.as_ref()[..8].try_into().expect("SHA-256 is 32 bytes"))
    }
}

/// The terms a record is found by.
fn terms_of(c: &Cols) -> impl Iterator<Item = (Kind, &str)> {
    let principal_name = c.principal_name.as_deref().filter(|n| Some(*n) != c.principal_id.as_deref());
    [
        (Kind::Principal, c.principal_id.as_deref()),
        (Kind::Principal, principal_name),
        (Kind::Vault, c.vault.as_deref()),
        (Kind::Secret, c.secret.as_deref()),
        (Kind::Operation, Some(c.operation.as_str())),
        (Kind::Result, Some(c.result.as_str())),
    ]
    .into_iter()
    .filter_map(|(kind, text)| Some((kind, text?)))
}

pub(crate) struct Index {
    conn: Connection,
    /// Per kind: text → term.
    terms: Vec<HashMap<String, i64>>,
    /// The last indexed seq.
    max_seq: u64,
}

/// The term of `kind:text`, through a cache of the usual ones.
fn term_of(cache: &mut [HashMap<String, i64>], kind: Kind, text: &str) -> i64 {
    let cache = &mut cache[kind as usize];
    if let Some(term) = cache.get(text) {
        return *term;
    }
    let term = kind.term(text);
    // Past the cap (a store of many secrets), further texts are hashed each time instead.
    if cache.len() < TERM_CACHE_MAX {
        cache.insert(text.to_string(), term);
    }
    term
}

impl Index {
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let conn =
            // One thread at a time uses this connection (the writer while opening, then the index
            // thread): SQLite's per-call mutex is not needed.
            Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| AuditError::Io(format!("open {}: {e}", path.display())))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        conn.busy_timeout(Duration::from_secs(5)).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db)?;
        // The JSON-lines file is the durable record (fdatasync'd before any acknowledgement);
        // the index is rebuilt from it on open. NORMAL keeps the index safe across process
        // crashes and saves an fsync per commit.
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(db)?;
        // Postings of many distinct secrets land on pages all over their tree: a larger page
        // cache than SQLite's 2 MiB default saves re-reading them on every commit.
        conn.pragma_update(None, "cache_size", -8192).map_err(db)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(db)?;
        if (1..=3).contains(&version) {
            conn.execute_batch(DROP_OLD_ROWS).map_err(db)?;
        }
        if version > SCHEMA_VERSION {
            // Written by a newer Coffer (a downgrade): its layout is unknown here, and the index
            // holds nothing the files do not, so it is rebuilt from them.
            tracing::warn!(
                "audit: the index has schema {version}, newer than {SCHEMA_VERSION}: rebuilding it"
            );
            conn.execute_batch(DROP_FOR_REBUILD).map_err(db)?;
        }
        if version == 4 {
            tracing::info!("audit: moving the index's postings into parts (schema 4 to 5), once");
            let started = std::time::Instant::now();
            conn.execute_batch(&migrate_4_to_5()).map_err(db)?;
            tracing::info!("audit: index postings moved in {:.1} s", started.elapsed().as_secs_f64());
        }
        conn.execute_batch(SCHEMA).map_err(db)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(db)?;
        let max: Option<i64> =
            conn.query_row("SELECT MAX(last_seq) FROM blocks", [], |r| r.get(0)).map_err(db)?;
        Ok(Self { conn, terms: vec![HashMap::new(); Kind::ALL], max_seq: max.unwrap_or(0) as u64 })
    }

    /// The signed head an index of an older version holds (see [`Index::forget_legacy_head`]).
    pub fn legacy_head(&self) -> Result<Option<String>, AuditError> {
        let head: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'head'", [], |r| r.get(0))
            .optional()
            .map_err(db)?;
        Ok(head)
    }

    /// Once the head is in the head file it must not be found here again: a deleted head file
    /// must not fall back to an old head.
    pub fn forget_legacy_head(&mut self) -> Result<(), AuditError> {
        self.conn.execute("DELETE FROM meta WHERE key = 'head'", []).map(|_| ()).map_err(db)
    }

    pub fn max_seq(&self) -> Result<Option<u64>, AuditError> {
        Ok(Some(self.max_seq).filter(|m| *m > 0))
    }

    /// Adds rows (ignoring seqs already indexed) as blocks, and forgets records `<= delete_through`
    /// (their files are about to be deleted), in one transaction.
    pub fn commit(&mut self, rows: &[IndexRow], delete_through: Option<u64>) -> Result<(), AuditError> {
        let tx = self.conn.transaction().map_err(db)?;
        let fresh = rows.iter().position(|r| r.seq > self.max_seq).map_or(&rows[..0], |i| &rows[i..]);
        let mut written = Ok(self.max_seq);
        let mut block_start = 0;
        for i in 1..=fresh.len() {
            let ends =
                i == fresh.len() || fresh[i].seq != fresh[i - 1].seq + 1 || i - block_start == BLOCK_MAX;
            if ends {
                written = Self::insert_block(&tx, &mut self.terms, &fresh[block_start..i])
                    .map(|()| fresh[i - 1].seq);
                if written.is_err() {
                    break;
                }
                block_start = i;
            }
        }
        let deleted = match (&written, delete_through) {
            (Ok(_), Some(through)) => Self::forget_through(&tx, through),
            _ => Ok(()),
        };
        let committed = written.and_then(|max| deleted.and_then(|()| tx.commit()).map(|()| max));
        self.max_seq = committed.map_err(db)?;
        Ok(())
    }

    /// One block of consecutive records: its row, its records' arrays and one posting per term.
    fn insert_block(
        tx: &Connection,
        terms: &mut [HashMap<String, i64>],
        rows: &[IndexRow],
    ) -> rusqlite::Result<()> {
        let first = rows[0].seq as i64;
        let mut times = Vec::with_capacity(rows.len() * 8);
        let mut lines = Vec::with_capacity(rows.len() * LINE_BYTES);
        let mut hashes = Vec::with_capacity(rows.len() * HASH_BYTES);
        let mut postings: HashMap<i64, Vec<u8>> = HashMap::new();
        let (mut min_time, mut max_time) = (i64::MAX, i64::MIN);
        for (i, row) in rows.iter().enumerate() {
            let c = &row.cols;
            (min_time, max_time) = (min_time.min(c.time_us), max_time.max(c.time_us));
            times.extend_from_slice(&c.time_us.to_le_bytes());
            lines.extend_from_slice(&row.offset.to_le_bytes());
            lines.extend_from_slice(&row.len.to_le_bytes());
            hashes.extend_from_slice(&row.hash);
            for (kind, text) in terms_of(c) {
                let members = postings.entry(term_of(terms, kind, text)).or_default();
                let member = (i as u16).to_le_bytes();
                // The same term twice in one record (an id equal to another record's name) is one member.
                if members.len() < 2 || members[members.len() - 2..] != member {
                    members.extend_from_slice(&member);
                }
            }
        }
        let mut block_terms = Vec::with_capacity(postings.len() * 8);
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO postings (part, term, block, members) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (term, members) in &postings {
                block_terms.extend_from_slice(&term.to_le_bytes());
                // A term of every record (the usual principal, vault, operation, result) stores nothing.
                let members: &[u8] = if members.len() == 2 * rows.len() { &[] } else { members };
                insert.execute(params![part_of(first), term, first, members])?;
            }
        }
        tx.prepare_cached(
            "INSERT INTO blocks (first_seq, last_seq, min_time_us, max_time_us) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![first, rows[rows.len() - 1].seq as i64, min_time, max_time])?;
        tx.prepare_cached(
            "INSERT INTO block_records (first_seq, times, lines, hashes, terms) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![first, times, lines, hashes, block_terms])?;
        Ok(())
    }

    /// Deletes the blocks whose records are all `<= through`, and records the watermark so
    /// queries skip the older records of a block that straddles it.
    fn forget_through(tx: &Connection, through: u64) -> rusqlite::Result<()> {
        let through = through.min(i64::MAX as u64) as i64;
        let doomed: Vec<(i64, Vec<u8>)> = {
            let mut stmt = tx.prepare(
                "SELECT b.first_seq, r.terms FROM blocks b JOIN block_records r ON r.first_seq = b.first_seq \
                 WHERE b.last_seq <= ?1",
            )?;
            let rows = stmt.query_map([through], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut delete_posting =
            tx.prepare_cached("DELETE FROM postings WHERE part = ?1 AND term = ?2 AND block = ?3")?;
        for (block, terms) in &doomed {
            for term in terms.chunks_exact(8) {
                let term = i64::from_le_bytes(term.try_into().expect("8 bytes"));
                delete_posting.execute([part_of(*block), term, *block])?;
            }
        }
        tx.execute("DELETE FROM block_records WHERE first_seq IN (SELECT first_seq FROM blocks WHERE last_seq <= ?1)", [through])?;
        tx.execute("DELETE FROM blocks WHERE last_seq <= ?1", [through])?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('pruned_through', ?1) \
             ON CONFLICT (key) DO UPDATE SET value = MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
            [through.to_string()],
        )?;
        Ok(())
    }
}

fn le_i64(bytes: &[u8], i: usize) -> i64 {
    i64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

fn line_at(lines: &[u8], i: usize) -> (u64, u32) {
    let at = &lines[i * LINE_BYTES..(i + 1) * LINE_BYTES];
    (
        u64::from_le_bytes(at[..8].try_into().expect("8 bytes")),
        u32::from_le_bytes(at[8..].try_into().expect("4 bytes")),
    )
}

/// The block holding `seq`: (first seq, the requested per-record array).
fn block_array(conn: &Connection, seq: u64, column: &str) -> rusqlite::Result<Option<(u64, Vec<u8>)>> {
    let seq = seq.min(i64::MAX as u64) as i64;
    let sql = format!(
        "SELECT b.first_seq, r.{column} FROM blocks b JOIN block_records r ON r.first_seq = b.first_seq \
         WHERE b.first_seq = (SELECT MAX(first_seq) FROM blocks WHERE first_seq <= ?1) AND b.last_seq >= ?1"
    );
    conn.prepare_cached(&sql)?.query_row([seq], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))).optional()
}

/// The time of record `seq` (for retention), if indexed.
pub(crate) fn time_of(conn: &Connection, seq: u64) -> Result<Option<i64>, AuditError> {
    let found = block_array(conn, seq, "times").map_err(db)?;
    Ok(found.map(|(first, times)| le_i64(&times, (seq - first) as usize)))
}

/// The indexed copy of the hash of record `seq`, if indexed.
pub(crate) fn hash_of(conn: &Connection, seq: u64) -> Option<Vec<u8>> {
    let (first, hashes) = block_array(conn, seq, "hashes").ok()??;
    let i = (seq - first) as usize * HASH_BYTES;
    hashes.get(i..i + HASH_BYTES).map(<[u8]>::to_vec)
}

pub(crate) fn open_reader(path: &Path) -> Result<Connection, AuditError> {
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|e| AuditError::Query(format!("open {}: {e}", path.display())))?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(|e| AuditError::Query(e.to_string()))?;
    Ok(conn)
}

/// The statements a query runs, each a primary-key lookup or range (tests check their plans).
const SQL_PRUNED: &str = "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'pruned_through'";
const SQL_BLOCK_OF: &str = "SELECT COALESCE(MAX(first_seq), 0) FROM blocks WHERE first_seq <= ?1";
const SQL_SINCE: &str = "SELECT MIN(first_seq) FROM blocks WHERE max_time_us >= ?1";
const SQL_BLOCKS_FROM: &str =
    "SELECT first_seq, last_seq, min_time_us, max_time_us FROM blocks WHERE first_seq >= ?1 ORDER BY first_seq";
const SQL_LAST_BLOCK: &str = "SELECT COALESCE(MAX(first_seq), 0) FROM blocks";
const SQL_POSTINGS_FROM: &str =
    "SELECT block, members FROM postings WHERE part = ?1 AND term = ?2 AND block >= ?3 ORDER BY block";
const SQL_POSTING: &str = "SELECT members FROM postings WHERE part = ?1 AND term = ?2 AND block = ?3";
const SQL_BLOCK: &str = "SELECT last_seq, min_time_us, max_time_us FROM blocks WHERE first_seq = ?1";
const SQL_RECORDS: &str = "SELECT times, lines FROM block_records WHERE first_seq = ?1";

/// A matching record: its seq and where its line is.
type Found = (u64, u64, u32);

/// Finds the records matching `q` in log (seq) order: at most one page, plus whether there
/// are more.
///
/// The filters' terms are looked up once; the most selective kind present (secret, principal,
/// vault, operation, result) drives: its postings, part by part, name the blocks to visit, in
/// order, and the other terms' postings for each of those blocks (primary-key lookups) narrow it
/// down. Time filters skip blocks by their time range, then check each record's time.
pub(crate) fn find(conn: &Connection, q: &AuditQuery) -> rusqlite::Result<(Vec<Found>, bool)> {
    let limit = match q.limit {
        0 => 100,
        n => n.min(MAX_LIMIT),
    };
    let filters = [
        (Kind::Secret, q.secret.as_deref()),
        (Kind::Principal, q.principal.as_deref()),
        (Kind::Vault, q.vault.as_deref()),
        (Kind::Operation, q.operation.as_deref()),
        (Kind::Result, q.result.map(|r| r.result_type())),
    ];
    let terms: Vec<i64> =
        filters.into_iter().filter_map(|(kind, text)| Some(kind.term(&text?.to_lowercase()))).collect();
    let pruned: u64 =
        conn.prepare_cached(SQL_PRUNED)?.query_row([], |r| r.get::<_, i64>(0)).optional()?.unwrap_or(0)
            as u64;
    let floor = q.after.unwrap_or(0).max(pruned);
    let since = q.since.map(unix_us).unwrap_or(i64::MIN);
    let until = q.until.map(unix_us).unwrap_or(i64::MAX);
    let mut start_block: i64 = conn
        .prepare_cached(SQL_BLOCK_OF)?
        .query_row([floor.saturating_add(1).min(i64::MAX as u64) as i64], |r| r.get(0))?;
    if q.since.is_some() {
        // No block before the first one with a record at or after `since` can match.
        let first: Option<i64> = conn.prepare_cached(SQL_SINCE)?.query_row([since], |r| r.get(0))?;
        start_block = start_block.max(first.unwrap_or(i64::MAX));
    }

    let mut found = Vec::new();
    // Visits one block: `members` are record indexes (None: every record).
    let mut visit =
        |first: i64, last: i64, times: (i64, i64), members: Option<Vec<u16>>| -> rusqlite::Result<bool> {
            if times.1 < since || times.0 >= until || (last as u64) <= floor {
                return Ok(false);
            }
            let (time_blob, lines): (Vec<u8>, Vec<u8>) =
                conn.prepare_cached(SQL_RECORDS)?.query_row([first], |r| Ok((r.get(0)?, r.get(1)?)))?;
            let count = (last - first + 1) as usize;
            let members: Box<dyn Iterator<Item = usize>> = match members {
                Some(m) => Box::new(m.into_iter().map(usize::from)),
                None => Box::new(0..count),
            };
            for i in members {
                let seq = first as u64 + i as u64;
                if seq <= floor || i >= count {
                    continue;
                }
                let t = le_i64(&time_blob, i);
                if t < since || t >= until {
                    continue;
                }
                let (offset, len) = line_at(&lines, i);
                found.push((seq, offset, len));
                if found.len() > limit {
                    return Ok(true);
                }
            }
            Ok(false)
        };

    let Some((&driver, others)) = terms.split_first() else {
        let mut stmt = conn.prepare_cached(SQL_BLOCKS_FROM)?;
        let mut rows = stmt.query([start_block])?;
        while let Some(r) = rows.next()? {
            if visit(r.get(0)?, r.get(1)?, (r.get(2)?, r.get(3)?), None)? {
                break;
            }
        }
        drop(rows);
        let more = found.len() > limit;
        found.truncate(limit);
        return Ok((found, more));
    };
    let last_block: i64 = conn.prepare_cached(SQL_LAST_BLOCK)?.query_row([], |r| r.get(0))?;
    let mut stmt = conn.prepare_cached(SQL_POSTINGS_FROM)?;
    'parts: for part in part_of(start_block)..=part_of(last_block) {
        let mut postings = stmt.query(params![part, driver, start_block])?;
        'blocks: while let Some(r) = postings.next()? {
            let block: i64 = r.get(0)?;
            let mut members = decode_members(r.get_ref(1)?.as_blob()?);
            for &term in others {
                let other: Option<Vec<u8>> = conn
                    .prepare_cached(SQL_POSTING)?
                    .query_row(params![part, term, block], |r| r.get(0))
                    .optional()?;
                match other {
                    None => continue 'blocks,
                    Some(other) => members = intersect(members, decode_members(&other)),
                }
                if members.as_ref().is_some_and(Vec::is_empty) {
                    continue 'blocks;
                }
            }
            let (last, min_time, max_time): (i64, i64, i64) = conn
                .prepare_cached(SQL_BLOCK)?
                .query_row([block], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            if visit(block, last, (min_time, max_time), members)? {
                break 'parts;
            }
        }
    }
    drop(stmt);
    let more = found.len() > limit;
    found.truncate(limit);
    Ok((found, more))
}

/// A posting's members (None: every record of the block).
fn decode_members(blob: &[u8]) -> Option<Vec<u16>> {
    (!blob.is_empty()).then(|| blob.chunks_exact(2).map(|m| u16::from_le_bytes([m[0], m[1]])).collect())
}

/// Both sorted member lists' common members (None: every record).
fn intersect(a: Option<Vec<u16>>, b: Option<Vec<u16>>) -> Option<Vec<u16>> {
    match (a, b) {
        (None, other) | (other, None) => other,
        (Some(a), Some(b)) => {
            let (mut i, mut j, mut out) = (0, 0, Vec::new());
            while i < a.len() && j < b.len() {
                match a[i].cmp(&b[j]) {
                    std::cmp::Ordering::Less => i += 1,
                    std::cmp::Ordering::Greater => j += 1,
                    std::cmp::Ordering::Equal => {
                        out.push(a[i]);
                        i += 1;
                        j += 1;
                    }
                }
            }
            Some(out)
        }
    }
}

/// Whether a record's columns pass the filters of `q` (not its cursor).
pub(crate) fn filters_match(c: &Cols, q: &AuditQuery) -> bool {
    let is = |have: Option<&str>, want: &Option<String>| {
        want.as_ref().is_none_or(|w| have.is_some_and(|h| h == w.to_lowercase()))
    };
    let principal = q.principal.as_ref().is_none_or(|p| {
        let p = p.to_lowercase();
        c.principal_id.as_deref() == Some(p.as_str()) || c.principal_name.as_deref() == Some(p.as_str())
    });
    principal
        && is(c.vault.as_deref(), &q.vault)
        && is(c.secret.as_deref(), &q.secret)
        && is(Some(&c.operation), &q.operation)
        && q.result.is_none_or(|r| c.result == r.result_type().to_lowercase())
        && q.since.is_none_or(|t| c.time_us >= unix_us(t))
        && q.until.is_none_or(|t| c.time_us < unix_us(t))
}

/// Runs `q` on the index and reads the matching lines from the files in `dir`. Each record
/// read is checked against the filters (a term is a hash: see the schema).
pub(crate) fn query(conn: &Connection, dir: &Path, q: &AuditQuery) -> Result<AuditPage, AuditError> {
    let (found, more) = find(conn, q).map_err(|e| AuditError::Query(e.to_string()))?;
    let next = if more { found.last().map(|(seq, _, _)| *seq) } else { None };
    let mut lines = LineReader::new(dir);
    let mut records = Vec::with_capacity(found.len());
    for (seq, offset, len) in found {
        let record = lines.read(seq, offset, len)?;
        if cols(&record).is_some_and(|c| filters_match(&c, q)) {
            records.push(record);
        }
    }
    Ok(AuditPage { records, next })
}

/// Reads records' lines from the files, by (seq, offset, length) from the index.
struct LineReader<'a> {
    dir: &'a Path,
    /// Rotated files (first seq, last seq, path), listed on first need.
    rotated: Option<Vec<(u64, u64, PathBuf)>>,
    open: HashMap<PathBuf, File>,
}

impl<'a> LineReader<'a> {
    fn new(dir: &'a Path) -> Self {
        Self { dir, rotated: None, open: HashMap::new() }
    }

    fn path_of(&mut self, seq: u64) -> Result<PathBuf, AuditError> {
        if self.rotated.is_none() {
            let listed = list_rotated(self.dir)
                .map_err(|e| AuditError::Query(format!("list {}: {e}", self.dir.display())))?;
            self.rotated = Some(listed);
        }
        let rotated = self.rotated.as_deref().unwrap_or_default();
        Ok(match rotated.iter().find(|(first, last, _)| (*first..=*last).contains(&seq)) {
            Some((_, _, path)) => path.clone(),
            None => self.dir.join(ACTIVE),
        })
    }

    fn try_read(&mut self, seq: u64, offset: u64, len: u32) -> Result<Option<Value>, AuditError> {
        let path = self.path_of(seq)?;
        if !self.open.contains_key(&path) {
            match File::open(&path) {
                Ok(f) => self.open.insert(path.clone(), f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(AuditError::Query(format!("open {}: {e}", path.display()))),
            };
        }
        let mut buf = vec![0; len as usize];
        let read = self.open[&path].read_exact_at(&mut buf, offset);
        if read.is_err() {
            return Ok(None);
        }
        let value: Option<Value> = serde_json::from_slice(&buf).ok();
        Ok(value.filter(|v| v.get("seq").and_then(Value::as_u64) == Some(seq)))
    }

    /// The record `seq`. A rotation between listing and reading moves the active file under a
    /// rotated name, so a miss lists the directory again before giving up.
    fn read(&mut self, seq: u64, offset: u64, len: u32) -> Result<Value, AuditError> {
        if let Some(v) = self.try_read(seq, offset, len)? {
            return Ok(v);
        }
        self.rotated = None;
        self.open.clear();
        self.try_read(seq, offset, len)?.ok_or_else(|| {
            AuditError::Query(format!(
                "the index points at record {seq} but the files no longer hold it there; run `coffer audit \
                 verify` on {}",
                self.dir.display()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AuditResult;
    use std::time::{Duration, UNIX_EPOCH};

    /// A rotation between listing the files and reading a line (the active file renamed to its
    /// rotated name, a new active file begun) costs a second listing, not an error; a line
    /// that is really gone is an error that says what to run.
    #[test]
    fn a_line_read_across_a_rotation_is_found_in_the_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let line = |seq: u64| format!("{{\"seq\":{seq},\"pad\":\"{}\"}}", "x".repeat(10 * seq as usize));
        let text: String = (1..=3).map(|seq| line(seq) + "\n").collect();
        std::fs::write(dir.path().join(ACTIVE), &text).unwrap();
        let at = |seq: u64| (text.find(&line(seq)).unwrap() as u64, line(seq).len() as u32);
        let mut reader = LineReader::new(dir.path());
        // The reader lists the directory (no rotated file yet) …
        assert_eq!(reader.path_of(2).unwrap(), dir.path().join(ACTIVE));
        // … then the writer rotates.
        std::fs::rename(dir.path().join(ACTIVE), dir.path().join(crate::files::rotated_name(1, 3))).unwrap();
        std::fs::write(dir.path().join(ACTIVE), line(4) + "\n").unwrap();
        let (offset, len) = at(2);
        assert_eq!(reader.read(2, offset, len).unwrap()["seq"], 2);
        let (offset, len) = at(3);
        assert_eq!(reader.read(3, offset, len).unwrap()["seq"], 3);
        // Gone for good (the rotated file deleted): an error naming the record and the remedy.
        std::fs::remove_file(dir.path().join(crate::files::rotated_name(1, 3))).unwrap();
        let mut fresh = LineReader::new(dir.path());
        let err = fresh.read(3, offset, len).unwrap_err().to_string();
        assert!(err.contains("record 3") && err.contains("coffer audit verify"), "{err}");
    }

    /// Every statement a query runs is a lookup or range read of a primary key or index.
    #[test]
    fn every_query_statement_reads_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("index.sqlite")).unwrap();
        let statements = [
            SQL_PRUNED,
            SQL_BLOCK_OF,
            SQL_SINCE,
            SQL_BLOCKS_FROM,
            SQL_LAST_BLOCK,
            SQL_POSTINGS_FROM,
            SQL_POSTING,
            SQL_BLOCK,
            SQL_RECORDS,
        ];
        for sql in statements {
            let mut stmt = index.conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let params = stmt.parameter_count();
            let args: Vec<i64> = vec![1; params];
            let plan: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let text = plan.join(" | ");
            assert!(plan.iter().all(|l| l.starts_with("SEARCH")), "{sql}: {text}");
            assert!(!text.contains("TEMP B-TREE"), "{sql}: sorts: {text}");
        }
    }

    /// A small deterministic generator (the test must not depend on a seed-less RNG).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    fn row(seq: u64, rng: &mut Lcg) -> IndexRow {
        let p = rng.next(5);
        IndexRow {
            seq,
            cols: Cols {
                // Mostly increasing, with jitter: times are not in seq order.
                time_us: 1_000 * seq as i64 + rng.next(5_000) as i64,
                principal_id: (p < 4).then(|| format!("id-{p}")),
                // Principal 3's display name is principal 0's id; principal 2's name equals its id.
                principal_name: (p < 4).then(|| match p {
                    3 => "id-0".into(),
                    2 => "id-2".into(),
                    _ => format!("name-{p}"),
                }),
                vault: (rng.next(10) > 0).then(|| format!("v{}", rng.next(3))),
                secret: (rng.next(10) > 1).then(|| format!("s{}", rng.next(300))),
                operation: ["secretget", "secretset", "secretlist", "secretpurge"][rng.next(4) as usize]
                    .into(),
                result: ["success", "denied", "failed"][rng.next(3) as usize].into(),
            },
            offset: seq * 10,
            len: (seq % 100) as u32,
            hash: [(seq % 251) as u8; 32],
        }
    }

    fn matches(r: &IndexRow, q: &AuditQuery, floor: u64) -> bool {
        r.seq > floor && filters_match(&r.cols, q)
    }

    /// Pages through `q` and checks every page against a filter over all rows.
    fn check(conn: &Connection, rows: &[IndexRow], q: AuditQuery, floor: u64) {
        let floor = floor.max(q.after.unwrap_or(0));
        let want: Vec<u64> = rows.iter().filter(|r| matches(r, &q, floor)).map(|r| r.seq).collect();
        let mut got = Vec::new();
        let mut after = q.after;
        loop {
            let (page, more) = find(conn, &AuditQuery { after, ..q.clone() }).unwrap();
            for (seq, offset, len) in &page {
                assert_eq!((*offset, *len), (seq * 10, (seq % 100) as u32), "line of {seq}");
            }
            got.extend(page.iter().map(|(seq, _, _)| *seq));
            if !more {
                break;
            }
            assert_eq!(page.len(), q.limit, "a page before the last is full");
            after = page.last().map(|(seq, _, _)| *seq);
        }
        assert_eq!(got, want, "{q:?}");
    }

    /// A new index in a temporary directory holding `count` generated rows, committed `chunk`
    /// at a time.
    fn filled_index(
        seed: u64,
        count: u64,
        chunk: usize,
    ) -> (tempfile::TempDir, PathBuf, Vec<IndexRow>, Index) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        let mut rng = Lcg(seed);
        let rows: Vec<IndexRow> = (1..=count).map(|seq| row(seq, &mut rng)).collect();
        let mut index = Index::open(&path).unwrap();
        for part in rows.chunks(chunk) {
            index.commit(part, None).unwrap();
        }
        (dir, path, rows, index)
    }

    /// An index of schema 4 (postings keyed by term and block) is reorganized into parts on
    /// open, and finds the same records.
    #[test]
    fn a_schema_4_index_moves_its_postings_into_parts() {
        let (_dir, path, rows, index) = filled_index(11, 6_000, 900);
        index
            .conn
            .execute_batch(
                "CREATE TABLE postings_4 (term INTEGER NOT NULL, block INTEGER NOT NULL, members BLOB NOT NULL, \
                     PRIMARY KEY (term, block)) WITHOUT ROWID; \
                 INSERT INTO postings_4 SELECT term, block, members FROM postings; \
                 DROP TABLE postings; ALTER TABLE postings_4 RENAME TO postings; PRAGMA user_version = 4;",
            )
            .unwrap();
        drop(index);
        let index = Index::open(&path).unwrap();
        let version: i64 = index.conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let parts: i64 =
            index.conn.query_row("SELECT COUNT(DISTINCT part) FROM postings", [], |r| r.get(0)).unwrap();
        assert!(parts >= 3, "{parts} parts");
        let q = |limit| AuditQuery { limit, ..Default::default() };
        for query in [
            AuditQuery { secret: Some("s17".into()), ..q(4) },
            AuditQuery { principal: Some("id-0".into()), vault: Some("v1".into()), ..q(100) },
            AuditQuery { operation: Some("SecretPurge".into()), ..q(1000) },
        ] {
            check(&index.conn, &rows, query, 0);
        }
    }

    /// An index from a newer version (after a downgrade) is dropped, to be rebuilt from the
    /// files, instead of being written with the wrong layout.
    #[test]
    fn an_index_of_a_newer_schema_is_dropped_for_a_rebuild() {
        let (_dir, path, rows, index) = filled_index(3, 100, 100);
        index.conn.execute_batch("PRAGMA user_version = 99;").unwrap();
        drop(index);
        let mut index = Index::open(&path).unwrap();
        let version: i64 = index.conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(index.max_seq().unwrap(), None, "nothing kept from the newer index");
        index.commit(&rows, None).unwrap();
        check(
            &index.conn,
            &rows,
            AuditQuery { secret: Some("s7".into()), limit: 10, ..Default::default() },
            0,
        );
    }

    #[test]
    fn queries_find_exactly_the_matching_records_across_blocks_in_seq_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = Index::open(&dir.path().join("index.sqlite")).unwrap();
        let mut rng = Lcg(7);
        let rows: Vec<IndexRow> = (1..=12_000).map(|seq| row(seq, &mut rng)).collect();
        // Commits of uneven sizes: single records, ordinary batches, and more than a block.
        let mut at = 0;
        for size in [1, 1, 5, 700, BLOCK_MAX + 300, 2 * BLOCK_MAX + 1, 13, 4000].into_iter().cycle() {
            let end = (at + size).min(rows.len());
            index.commit(&rows[at..end], None).unwrap();
            // Re-sent rows (a reindex overlapping the index) are ignored.
            index.commit(&rows[at.saturating_sub(3)..end], None).unwrap();
            at = end;
            if at == rows.len() {
                break;
            }
        }
        let blocks: i64 = index.conn.query_row("SELECT COUNT(*) FROM blocks", [], |r| r.get(0)).unwrap();
        assert!(blocks >= 8, "{blocks} blocks: blocks split at BLOCK_MAX");
        let t = |ms: u64| UNIX_EPOCH + Duration::from_micros(ms * 1000);
        let q = |limit| AuditQuery { limit, ..Default::default() };
        let queries = |floor_cases: bool| {
            let mut v = vec![
                q(1000),
                AuditQuery { principal: Some("ID-0".into()), ..q(97) },
                AuditQuery { principal: Some("name-1".into()), ..q(50) },
                AuditQuery { principal: Some("id-2".into()), ..q(1000) },
                AuditQuery { vault: Some("v1".into()), ..q(333) },
                AuditQuery { secret: Some("S17".into()), ..q(3) },
                AuditQuery { secret: Some("s17".into()), operation: Some("SecretGet".into()), ..q(2) },
                AuditQuery { operation: Some("secretpurge".into()), ..q(500) },
                AuditQuery { result: Some(AuditResult::Denied), ..q(1000) },
                AuditQuery { result: Some(AuditResult::Allowed), vault: Some("v2".into()), ..q(1000) },
                AuditQuery { since: Some(t(5_000)), until: Some(t(5_300)), ..q(40) },
                AuditQuery { secret: Some("s5".into()), since: Some(t(2_000)), ..q(10) },
                AuditQuery { until: Some(t(100)), ..q(7) },
                AuditQuery { secret: Some("no-such-secret".into()), ..q(10) },
                AuditQuery {
                    principal: Some("id-1".into()),
                    vault: Some("v0".into()),
                    secret: Some("s9".into()),
                    result: Some(AuditResult::Allowed),
                    ..q(5)
                },
            ];
            if floor_cases {
                v.push(AuditQuery { after: Some(4_500), ..q(1000) });
                v.push(AuditQuery { after: Some(9_000), principal: Some("id-0".into()), ..q(100) });
            }
            v
        };
        for query in queries(true) {
            check(&index.conn, &rows, query, 0);
        }
        assert_eq!(time_of(&index.conn, 4_444).unwrap(), Some(rows[4_443].cols.time_us));
        assert_eq!(hash_of(&index.conn, 4_444), Some(vec![(4_444 % 251) as u8; 32]));
        assert_eq!(hash_of(&index.conn, 12_001), None);

        // Retention: records through 5,000 are forgotten, whole blocks are deleted with their
        // postings, and the block that straddles 5,000 keeps only its later records.
        index.commit(&[], Some(5_000)).unwrap();
        for query in queries(false) {
            check(&index.conn, &rows, query, 5_000);
        }
        let stale: i64 = index
            .conn
            .query_row(
                "SELECT COUNT(*) FROM postings WHERE block NOT IN (SELECT first_seq FROM blocks)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stale, 0, "postings of deleted blocks");
        assert_eq!(time_of(&index.conn, 10).unwrap(), None);
        // And the index reopens where it was.
        drop(index);
        let index = Index::open(&dir.path().join("index.sqlite")).unwrap();
        assert_eq!(index.max_seq().unwrap(), Some(12_000));
        check(&index.conn, &rows, AuditQuery { secret: Some("s1".into()), ..q(20) }, 5_000);
    }
}
