//! The SQLite index: one row per record (indexed columns and where its line is in the files),
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

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::canon::unix_us;
use crate::event::Cols;
use crate::files::{list_rotated, ACTIVE};
use crate::{AuditError, AuditPage, AuditQuery};
use serde_json::Value;

const SCHEMA: &str = r#"
-- Every text column of `records` holds the id of its (lowercased) text here: index entries are
-- a few bytes of integers, cheap to insert and compare, and each distinct name is stored once.
CREATE TABLE IF NOT EXISTS names (id INTEGER PRIMARY KEY, text TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    time_us INTEGER NOT NULL,
    principal_id INTEGER,
    principal_name INTEGER,
    vault INTEGER,
    secret INTEGER,
    operation INTEGER NOT NULL,
    result INTEGER NOT NULL,
    -- The record's line: bytes [file_offset, file_offset + line_len) of the file holding its
    -- seq (a rotated file whose name covers it, else audit.jsonl). Rotation renames files
    -- without rewriting them, so offsets stay valid.
    file_offset INTEGER NOT NULL,
    line_len INTEGER NOT NULL,
    -- The record's SHA-256 (its `hash` field): a second copy, so `verify` can name the first
    -- record of a re-hashed (forged) stretch of the chain.
    hash BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_time ON records (time_us, seq);
CREATE INDEX IF NOT EXISTS records_principal_id ON records (principal_id, time_us, seq);
CREATE INDEX IF NOT EXISTS records_principal_name ON records (principal_name, time_us, seq);
CREATE INDEX IF NOT EXISTS records_vault ON records (vault, time_us, seq);
CREATE INDEX IF NOT EXISTS records_secret ON records (secret, time_us, seq);
CREATE INDEX IF NOT EXISTS records_operation ON records (operation, time_us, seq);
CREATE INDEX IF NOT EXISTS records_result ON records (result, time_us, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
PRAGMA user_version = 3;
"#;

/// Versions 1 (a copy of each line per row) and 2 (text columns) have other rows: they are
/// dropped, and rebuilt from the files by open, while the signed head in `meta` is kept.
const DROP_OLD_ROWS: &str = "DROP TABLE IF EXISTS records;";

/// Interned names kept in memory (beyond this the cache starts again from empty).
const NAME_CACHE_MAX: usize = 100_000;

pub(crate) const MAX_LIMIT: usize = 1000;

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

pub(crate) struct Index {
    conn: Connection,
    /// Text → `names.id`, for texts known to be committed.
    names: HashMap<String, i64>,
}

/// The id of `text` in `names`, inserting it if new.
fn intern(tx: &Connection, cache: &mut HashMap<String, i64>, text: &str) -> rusqlite::Result<i64> {
    if let Some(id) = cache.get(text) {
        return Ok(*id);
    }
    let found: Option<i64> = tx
        .prepare_cached("SELECT id FROM names WHERE text = ?1")?
        .query_row([text], |r| r.get(0))
        .optional()?;
    let id = match found {
        Some(id) => id,
        None => {
            tx.prepare_cached("INSERT INTO names (text) VALUES (?1)")?.execute([text])?;
            tx.last_insert_rowid()
        }
    };
    if cache.len() >= NAME_CACHE_MAX {
        cache.clear();
    }
    cache.insert(text.to_string(), id);
    Ok(id)
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
        // crashes and saves the second fsync per group commit. After an OS crash the signed
        // head may lag the file; open() then adopts the records after it with a noted
        // checkpoint (see README: tail-truncation evidence is as strong as the last durable head).
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(db)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(db)?;
        if version == 1 || version == 2 {
            conn.execute_batch(DROP_OLD_ROWS).map_err(db)?;
        }
        conn.execute_batch(SCHEMA).map_err(db)?;
        Ok(Self { conn, names: HashMap::new() })
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
        let max: Option<i64> =
            self.conn.query_row("SELECT MAX(seq) FROM records", [], |r| r.get(0)).map_err(db)?;
        Ok(max.map(|m| m as u64))
    }

    /// Inserts rows (ignoring seqs already present) and deletes rows `<= delete_through`, in one
    /// transaction.
    pub fn commit(&mut self, rows: &[IndexRow], delete_through: Option<u64>) -> Result<(), AuditError> {
        let tx = self.conn.transaction().map_err(db)?;
        // Ids interned in this transaction are cached only once it commits.
        let mut names = std::mem::take(&mut self.names);
        let inserted = Self::insert_rows(&tx, &mut names, rows);
        if inserted.is_ok() {
            self.names = names;
        }
        inserted.map_err(db)?;
        if let Some(through) = delete_through {
            tx.execute("DELETE FROM records WHERE seq <= ?1", [through as i64]).map_err(db)?;
        }
        let committed = tx.commit().map_err(db);
        if committed.is_err() {
            self.names.clear();
        }
        committed
    }

    fn insert_rows(
        tx: &Connection,
        names: &mut HashMap<String, i64>,
        rows: &[IndexRow],
    ) -> rusqlite::Result<()> {
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO records (seq, time_us, principal_id, principal_name, vault, secret, \
                     operation, result, file_offset, line_len, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )?;
            let mut id = |text: Option<&str>| -> rusqlite::Result<Option<i64>> {
                text.map(|t| intern(tx, names, t)).transpose()
            };
            for row in rows {
                let c = &row.cols;
                let principal_id = id(c.principal_id.as_deref())?;
                let principal_name = id(c.principal_name.as_deref())?;
                let (vault, secret) = (id(c.vault.as_deref())?, id(c.secret.as_deref())?);
                let (operation, result) = (id(Some(&c.operation))?, id(Some(&c.result))?);
                insert.execute(params![
                    row.seq as i64,
                    c.time_us,
                    principal_id,
                    principal_name,
                    vault,
                    secret,
                    operation,
                    result,
                    row.offset as i64,
                    row.len,
                    &row.hash[..]
                ])?;
            }
        }
        Ok(())
    }
}

/// The time of record `seq` (for retention), if indexed.
pub(crate) fn time_of(conn: &Connection, seq: u64) -> Result<Option<i64>, AuditError> {
    conn.query_row("SELECT time_us FROM records WHERE seq = ?1", [seq as i64], |r| r.get(0))
        .optional()
        .map_err(db)
}

pub(crate) fn open_reader(path: &Path) -> Result<Connection, AuditError> {
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|e| AuditError::Query(format!("open {}: {e}", path.display())))?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(|e| AuditError::Query(e.to_string()))?;
    Ok(conn)
}

/// The SQL and parameters of a query (also used to check its plan in tests). Results are in
/// (time, seq) order; every index ends in `(time_us, seq)`, so a filter plus a time range plus
/// the cursor is one index range read in order, without sorting. `cursor_time` is the time of
/// the record named by `q.after` (looked up first). Returns `limit + 1` rows so the caller
/// knows whether there is a next page.
///
/// A principal filter matches the id or the display name: `principal_column` says which one
/// this statement reads (the caller runs both and merges them, so neither needs a sort).
pub(crate) fn query_sql(
    q: &AuditQuery,
    cursor_time: Option<i64>,
    principal_column: &str,
) -> (String, Vec<SqlValue>, usize) {
    let limit = match q.limit {
        0 => 100,
        n => n.min(MAX_LIMIT),
    };
    let mut conds: Vec<String> = Vec::new();
    let mut args: Vec<SqlValue> = Vec::new();
    let push = |cond: &str, value: SqlValue, conds: &mut Vec<String>, args: &mut Vec<SqlValue>| {
        args.push(value);
        conds.push(cond.replace('?', &format!("?{}", args.len())));
    };
    let text = |s: &str| SqlValue::Text(s.to_lowercase());
    // A text filter compares ids: the id of the text is looked up once (a constant subquery).
    let name = |column: &str| format!("{column} = (SELECT id FROM names WHERE text = ?)");
    if let Some(p) = &q.principal {
        push(&name(principal_column), text(p), &mut conds, &mut args);
    }
    if let Some(s) = &q.secret {
        push(&name("secret"), text(s), &mut conds, &mut args);
    }
    if let Some(v) = &q.vault {
        push(&name("vault"), text(v), &mut conds, &mut args);
    }
    if let Some(o) = &q.operation {
        push(&name("operation"), text(o), &mut conds, &mut args);
    }
    if let Some(r) = q.result {
        push(&name("result"), text(r.result_type()), &mut conds, &mut args);
    }
    if let Some(t) = q.since {
        push("time_us >= ?", SqlValue::Integer(unix_us(t)), &mut conds, &mut args);
    }
    if let Some(t) = q.until {
        push("time_us < ?", SqlValue::Integer(unix_us(t)), &mut conds, &mut args);
    }
    if let Some(after) = q.after {
        let after = SqlValue::Integer(after.min(i64::MAX as u64) as i64);
        match cursor_time {
            Some(t) => {
                args.push(SqlValue::Integer(t));
                args.push(after);
                conds.push(format!("(time_us, seq) > (?{}, ?{})", args.len() - 1, args.len()));
            }
            // The cursor's record is gone (pruned): continue after its seq.
            None => push("seq > ?", after, &mut conds, &mut args),
        }
    }
    let filter = if conds.is_empty() { String::new() } else { format!(" WHERE {}", conds.join(" AND ")) };
    args.push(SqlValue::Integer(limit as i64 + 1));
    let sql = format!(
        "SELECT time_us, seq, file_offset, line_len FROM records{filter} ORDER BY time_us, seq LIMIT ?{}",
        args.len()
    );
    (sql, args, limit)
}

/// Runs `q` on the index and reads the matching lines from the files in `dir`.
pub(crate) fn query(conn: &Connection, dir: &Path, q: &AuditQuery) -> Result<AuditPage, AuditError> {
    let err = |e: rusqlite::Error| AuditError::Query(e.to_string());
    let cursor_time = match q.after {
        Some(after) => conn
            .query_row(
                "SELECT time_us FROM records WHERE seq = ?1",
                [after.min(i64::MAX as u64) as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?,
        None => None,
    };
    let columns: &[&str] = if q.principal.is_some() { &["principal_id", "principal_name"] } else { &["-"] };
    let mut rows: Vec<(i64, i64, i64, u32)> = Vec::new();
    let mut limit = 0;
    for column in columns {
        let (sql, args, l) = query_sql(q, cursor_time, column);
        limit = l;
        let mut stmt = conn.prepare_cached(&sql).map_err(err)?;
        let found = stmt
            .query_map(rusqlite::params_from_iter(args), |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map_err(err)?;
        for row in found {
            rows.push(row.map_err(err)?);
        }
    }
    if columns.len() > 1 {
        rows.sort_by_key(|(t, seq, _, _)| (*t, *seq));
        rows.dedup_by_key(|(_, seq, _, _)| *seq);
    }
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = if more { rows.last().map(|(_, seq, _, _)| *seq as u64) } else { None };
    let mut lines = LineReader::new(dir);
    let mut records = Vec::with_capacity(rows.len());
    for (_, seq, offset, len) in rows {
        records.push(lines.read(seq as u64, offset as u64, len)?);
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

    fn plan(conn: &Connection, q: &AuditQuery) -> Vec<String> {
        plan_for(conn, q, "principal_id")
    }

    fn plan_for(conn: &Connection, q: &AuditQuery, principal_column: &str) -> Vec<String> {
        let cursor_time = q.after.map(|a| 1_000_000 * a as i64);
        let (sql, args, _) = query_sql(q, cursor_time, principal_column);
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt.query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3)).unwrap();
        rows.map(Result::unwrap).collect()
    }

    /// Every filter is answered through an index (or the primary key): no line of the plan
    /// scans the table.
    #[test]
    fn every_filter_uses_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = Index::open(&dir.path().join("index.sqlite")).unwrap();
        let rows: Vec<IndexRow> = (1..=500u64)
            .map(|seq| IndexRow {
                seq,
                cols: Cols {
                    time_us: 1_000_000 * seq as i64,
                    principal_id: Some(format!("p{}", seq % 7)),
                    principal_name: Some(format!("name{}", seq % 7)),
                    vault: Some(format!("v{}", seq % 3)),
                    secret: Some(format!("s{}", seq % 50)),
                    operation: ["secretget", "secretset", "secretlist"][seq as usize % 3].into(),
                    result: ["success", "denied", "failed"][seq as usize % 3].into(),
                },
                offset: 0,
                len: 0,
                hash: [0; 32],
            })
            .collect();
        index.commit(&rows, None).unwrap();
        let conn = &index.conn;
        let t = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let base = AuditQuery::default();
        let cases: Vec<(&str, AuditQuery, &str)> = vec![
            ("none", base.clone(), "records_time"),
            ("after", AuditQuery { after: Some(10), ..base.clone() }, "records_time"),
            ("since", AuditQuery { since: Some(t(100)), ..base.clone() }, "records_time"),
            ("until", AuditQuery { until: Some(t(100)), ..base.clone() }, "records_time"),
            (
                "range",
                AuditQuery { since: Some(t(10)), until: Some(t(100)), after: Some(20), ..base.clone() },
                "records_time",
            ),
            (
                "principal",
                AuditQuery { principal: Some("P1".into()), ..base.clone() },
                "records_principal_id",
            ),
            (
                "secret",
                AuditQuery { secret: Some("S1".into()), after: Some(3), ..base.clone() },
                "records_secret",
            ),
            ("vault", AuditQuery { vault: Some("v1".into()), ..base.clone() }, "records_vault"),
            (
                "operation",
                AuditQuery { operation: Some("SecretGet".into()), ..base.clone() },
                "records_operation",
            ),
            ("result", AuditQuery { result: Some(AuditResult::Denied), ..base.clone() }, "records_result"),
            (
                "secret+time",
                AuditQuery {
                    secret: Some("s1".into()),
                    since: Some(t(1)),
                    until: Some(t(400)),
                    ..base.clone()
                },
                "records_secret (secret=? AND time_us>? AND time_us<?)",
            ),
        ];
        for (name, q, expect) in cases {
            let plan = plan(conn, &q);
            let text = plan.join(" | ");
            eprintln!("{name:12} {text}");
            assert!(text.contains(expect), "{name}: expected {expect} in plan: {text}");
            assert!(
                plan.iter()
                    .all(|l| !l.starts_with("SCAN records") || l.contains("USING") && l.contains("INDEX")),
                "{name}: table scan in plan: {text}"
            );
            assert!(plan.iter().any(|l| l.contains("USING INDEX")), "{name}: no index in plan: {text}");
            assert!(!text.contains("TEMP B-TREE"), "{name}: sorts in plan: {text}");
            // And the statement itself runs (the lines are not in files here).
            let (sql, args, _) = query_sql(&q, q.after.map(|a| 1_000_000 * a as i64), "principal_id");
            conn.prepare(&sql).unwrap().query(rusqlite::params_from_iter(args)).unwrap().next().unwrap();
        }
        let principal_plan =
            plan_for(conn, &AuditQuery { principal: Some("x".into()), ..base }, "principal_name").join(" | ");
        assert!(principal_plan.contains("records_principal_name"), "{principal_plan}");
    }
}
