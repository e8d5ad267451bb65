//! The embedded default: SQLite in WAL mode with `synchronous=FULL`, so a write is on disk when
//! its transaction commits. One writer connection (SQLite serializes writers anyway), owned by a
//! thread that group-commits: the writes queued while it was busy share one transaction, each in
//! its own savepoint, and one fsync (see `sqlite/writer.rs`). A write returns `Ok` only once that
//! transaction has committed; a failed write is rolled back alone. Reads run inline on a small
//! pool of reader connections. WAL checkpoints run on a thread of their own
//! (`sqlite/checkpoint.rs`), not inside a commit.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use coffer_core::crypto::SealedValue;
use coffer_core::model::{
    Deletion, PropertiesPatch, RetentionPolicy, Tags, Timestamp, VersionAttributes, VersionProperties,
};
use coffer_core::names::{SecretName, VaultName};
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

mod checkpoint;
mod directory;
mod events;
mod readers;
mod versions;
mod writer;

use crate::{DeletedSecret, Result, SecretSummary, Store, StoreError, StoredVersion, VaultRecord};

const READERS: usize = 4;

const SCHEMA_V1: &str = r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE wrapped_keys (name TEXT PRIMARY KEY, blob BLOB NOT NULL);
CREATE TABLE principals (
    object_id TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    kind TEXT NOT NULL,
    enabled INTEGER NOT NULL,
    administrator INTEGER NOT NULL
);
CREATE TABLE vaults (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    retention_days INTEGER NOT NULL,
    purge_protection INTEGER NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE secrets (
    id INTEGER PRIMARY KEY,
    vault_id TEXT NOT NULL REFERENCES vaults(id),
    name TEXT NOT NULL,
    name_key TEXT NOT NULL,
    deleted_at INTEGER,
    scheduled_purge INTEGER,
    UNIQUE (vault_id, name_key)
);
CREATE INDEX secrets_purge ON secrets (scheduled_purge) WHERE deleted_at IS NOT NULL;
CREATE TABLE versions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    secret_id INTEGER NOT NULL REFERENCES secrets(id),
    version TEXT NOT NULL,
    enabled INTEGER NOT NULL,
    nbf INTEGER,
    exp INTEGER,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    content_type TEXT,
    tags TEXT NOT NULL,
    wrapped_dek BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    UNIQUE (secret_id, version)
);
CREATE INDEX versions_by_secret ON versions (secret_id, seq);
"#;

pub struct SqliteStore {
    writer: writer::Writer,
    _checkpointer: checkpoint::Checkpointer,
    readers: Arc<readers::Readers>,
    versions: versions::VersionCache,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        backend(e)
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self> {
        let writer = Connection::open(path)?;
        configure(&writer)?;
        migrate(&writer)?;
        writer.pragma_update(None, "wal_autocheckpoint", checkpoint::BACKSTOP_PAGES)?;
        // Every kind of write shares this connection; keep all their statements prepared.
        writer.set_prepared_statement_cache_capacity(64);
        let readers = Arc::new(readers::Readers::open(path, READERS)?);
        Ok(Self {
            writer: writer::Writer::start(writer, readers.clone())?,
            _checkpointer: checkpoint::Checkpointer::start(path, readers.clone())?,
            readers,
            versions: versions::VersionCache::default(),
        })
    }

    /// Runs a read on a reader connection (see `readers`).
    async fn read<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&Connection) -> Result<R>,
    {
        self.readers.read(f)
    }

    /// Deletes the row of `table` whose `id` is `id`; true if it existed.
    pub(crate) async fn delete_by_id(&self, table: &'static str, id: &str) -> Result<bool> {
        let (sql, id) = (format!("DELETE FROM {table} WHERE id = ?1"), id.to_owned());
        self.write(move |tx| Ok(tx.execute(&sql, params![id])? > 0)).await
    }

    /// Runs `f` on the writer, atomically: its changes are committed (possibly in one
    /// transaction with other writes) if it returns `Ok`, rolled back if it fails or panics, and
    /// this returns only after the commit. `f` must not end the transaction itself (no `COMMIT`,
    /// `ROLLBACK` or `RELEASE` in its SQL) nor defer a constraint to the COMMIT: either would
    /// fail the other writes of its batch.
    async fn write<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<R> + Send + 'static,
    {
        self.writer.write(f).await
    }
}

fn configure(conn: &Connection) -> Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

fn migrate(conn: &Connection) -> Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version < 1 {
        conn.execute_batch(&format!("BEGIN IMMEDIATE; {SCHEMA_V1} PRAGMA user_version = 1; COMMIT;"))?;
    }
    if version < 2 {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {} PRAGMA user_version = 2; COMMIT;",
            directory::SCHEMA_V2
        ))?;
    }
    if version < 3 {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {} PRAGMA user_version = 3; COMMIT;",
            events::SCHEMA_V3
        ))?;
    }
    if version < 4 {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {} PRAGMA user_version = 4; COMMIT;",
            directory::SCHEMA_V4
        ))?;
    }
    Ok(())
}

/// The columns [`stored_from_row`] and [`props_from_row`] read, as a macro so that hot-path
/// statements can be built with `concat!` at compile time.
macro_rules! version_columns {
    () => {
        "s.name, v.version, v.enabled, v.nbf, v.exp, v.created, v.updated, v.content_type, v.tags, v.seq"
    };
}
const VERSION_COLUMNS: &str = version_columns!();

fn props_from_row(row: &Row<'_>) -> rusqlite::Result<VersionProperties> {
    let tags_json: String = row.get(8)?;
    let tags: Tags = serde_json::from_str(&tags_json).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(8, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(VersionProperties {
        version: row.get(1)?,
        attributes: VersionAttributes {
            enabled: row.get(2)?,
            not_before: row.get(3)?,
            expires: row.get(4)?,
            created: row.get(5)?,
            updated: row.get(6)?,
        },
        content_type: row.get(7)?,
        tags,
    })
}

fn stored_from_row(row: &Row<'_>) -> rusqlite::Result<StoredVersion> {
    Ok(StoredVersion {
        name: row.get(0)?,
        props: props_from_row(row)?,
        sealed: SealedValue { wrapped_dek: row.get(10)?, ciphertext: row.get(11)? },
    })
}

fn tags_json(tags: &Tags) -> String {
    // Invariant: a map of strings always serializes.
    serde_json::to_string(tags).expect("string map serializes")
}

/// (secret id, deleted?) for a name, in any state.
fn find_secret(conn: &Connection, vault_id: &str, name_key: &str) -> Result<Option<(i64, bool)>> {
    Ok(conn
        .prepare_cached(
            "SELECT id, deleted_at IS NOT NULL FROM secrets WHERE vault_id = ?1 AND name_key = ?2",
        )?
        .query_row(params![vault_id, name_key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

fn active_secret_id(conn: &Connection, vault_id: &str, name_key: &str) -> Result<i64> {
    match find_secret(conn, vault_id, name_key)? {
        Some((id, false)) => Ok(id),
        _ => Err(StoreError::NotFound),
    }
}

fn insert_version(
    tx: &Connection,
    secret_id: i64,
    props: &VersionProperties,
    sealed: &SealedValue,
) -> Result<()> {
    let a = &props.attributes;
    // Cached: preparing this statement also compiles the outbox trigger (a three-way join), which
    // was most of the writer thread's time under a stream of SETs.
    tx.prepare_cached(
        "INSERT INTO versions (secret_id, version, enabled, nbf, exp, created, updated, content_type, tags, wrapped_dek, ciphertext)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
            secret_id,
            props.version,
            a.enabled,
            a.not_before,
            a.expires,
            a.created,
            a.updated,
            props.content_type,
            tags_json(&props.tags),
            sealed.wrapped_dek,
            sealed.ciphertext
        ])?;
    Ok(())
}

fn load_version(conn: &Connection, secret_id: i64, version: Option<&str>) -> Result<Option<StoredVersion>> {
    let sql_latest = format!(
        "SELECT {VERSION_COLUMNS}, v.wrapped_dek, v.ciphertext FROM versions v JOIN secrets s ON s.id = v.secret_id
         WHERE v.secret_id = ?1 ORDER BY v.seq DESC LIMIT 1"
    );
    let sql_one = format!(
        "SELECT {VERSION_COLUMNS}, v.wrapped_dek, v.ciphertext FROM versions v JOIN secrets s ON s.id = v.secret_id
         WHERE v.secret_id = ?1 AND v.version = ?2"
    );
    Ok(match version {
        None => {
            conn.prepare_cached(&sql_latest)?.query_row(params![secret_id], stored_from_row).optional()?
        }
        Some(v) => {
            conn.prepare_cached(&sql_one)?.query_row(params![secret_id, v], stored_from_row).optional()?
        }
    })
}

fn load_deleted(
    conn: &Connection,
    vault_id: &str,
    after: Option<&str>,
    exact: Option<&str>,
    limit: usize,
) -> Result<Vec<DeletedSecret>> {
    let sql = format!(
        "SELECT {VERSION_COLUMNS}, s.deleted_at, s.scheduled_purge FROM secrets s
         JOIN versions v ON v.seq = (SELECT MAX(seq) FROM versions WHERE secret_id = s.id)
         WHERE s.vault_id = ?1 AND s.deleted_at IS NOT NULL
           AND (?2 IS NULL OR s.name_key > ?2) AND (?3 IS NULL OR s.name_key = ?3)
         ORDER BY s.name_key LIMIT ?4"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![vault_id, after, exact, limit as i64], |row| {
        Ok(DeletedSecret {
            name: row.get(0)?,
            latest: props_from_row(row)?,
            deletion: Deletion { deleted_at: row.get(10)?, scheduled_purge: row.get(11)? },
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

fn remove_secret(tx: &Connection, secret_id: i64) -> Result<()> {
    tx.execute("DELETE FROM versions WHERE secret_id = ?1", params![secret_id])?;
    tx.execute("DELETE FROM secrets WHERE id = ?1", params![secret_id])?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = key.to_owned();
        self.read(move |c| {
            Ok(c.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| r.get(0)).optional()?)
        })
        .await
    }

    async fn init_meta(&self, key: &str, value: Vec<u8>) -> Result<Vec<u8>> {
        let key = key.to_owned();
        self.write(move |tx| {
            tx.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)", params![key, value])?;
            Ok(tx.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| r.get(0))?)
        })
        .await
    }

    async fn put_meta(&self, key: &str, value: Vec<u8>) -> Result<()> {
        let key = key.to_owned();
        self.write(move |tx| {
            tx.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)", params![key, value])?;
            Ok(())
        })
        .await
    }

    async fn delete_wrapped_key(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        self.write(move |tx| {
            tx.execute("DELETE FROM wrapped_keys WHERE name = ?1", params![name])?;
            Ok(())
        })
        .await
    }

    async fn wrapped_key(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let name = name.to_owned();
        self.read(move |c| {
            Ok(c.query_row("SELECT blob FROM wrapped_keys WHERE name = ?1", params![name], |r| r.get(0))
                .optional()?)
        })
        .await
    }

    async fn wrapped_keys(&self) -> Result<Vec<(String, Vec<u8>)>> {
        self.read(|c| {
            let mut stmt = c.prepare("SELECT name, blob FROM wrapped_keys ORDER BY name")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn put_wrapped_key(&self, name: &str, blob: Vec<u8>) -> Result<()> {
        let name = name.to_owned();
        self.write(move |tx| {
            tx.execute(
                "INSERT OR REPLACE INTO wrapped_keys (name, blob) VALUES (?1, ?2)",
                params![name, blob],
            )?;
            Ok(())
        })
        .await
    }

    async fn replace_wrapped_keys(&self, keys: Vec<(String, Vec<u8>)>) -> Result<()> {
        self.write(move |tx| {
            let existing: i64 = tx.query_row("SELECT COUNT(*) FROM wrapped_keys", [], |r| r.get(0))?;
            if existing as usize != keys.len() {
                return Err(StoreError::Backend(format!(
                    "refusing to replace {existing} wrapped keys with {} (the set changed)",
                    keys.len()
                )));
            }
            for (name, blob) in &keys {
                let n =
                    tx.execute("UPDATE wrapped_keys SET blob = ?2 WHERE name = ?1", params![name, blob])?;
                if n != 1 {
                    return Err(StoreError::Backend(format!("wrapped key '{name}' disappeared")));
                }
            }
            Ok(())
        })
        .await
    }

    async fn create_vault(&self, vault: &VaultRecord, wrapped_kek: (String, Vec<u8>)) -> Result<()> {
        let v = vault.clone();
        self.write(move |tx| {
            let taken: bool = tx.query_row("SELECT EXISTS(SELECT 1 FROM vaults WHERE name = ?1)", params![v.name.as_str()], |r| r.get(0))?;
            if taken {
                return Err(StoreError::NameExists);
            }
            tx.execute(
                "INSERT INTO vaults (id, name, retention_days, purge_protection, created) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![v.id, v.name.as_str(), v.policy.retention_days, v.policy.purge_protection, v.created],
            )?;
            tx.execute("INSERT INTO wrapped_keys (name, blob) VALUES (?1, ?2)", params![wrapped_kek.0, wrapped_kek.1])?;
            Ok(())
        })
        .await
    }

    async fn vaults(&self) -> Result<Vec<VaultRecord>> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT id, name, retention_days, purge_protection, created FROM vaults ORDER BY name",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?;
            rows.map(|row| {
                let (id, name, days, protection, created) = row?;
                Ok(VaultRecord {
                    id,
                    name: VaultName::parse(&name).map_err(backend)?,
                    policy: RetentionPolicy::new(days, protection).map_err(backend)?,
                    created,
                })
            })
            .collect()
        })
        .await
    }

    async fn vault_secret_counts(&self, vault_id: &str) -> Result<(u64, u64)> {
        let vault_id = vault_id.to_owned();
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT COUNT(*) FILTER (WHERE deleted_at IS NULL), COUNT(*) FILTER (WHERE deleted_at IS NOT NULL)
                 FROM secrets WHERE vault_id = ?1",
                params![vault_id],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )?)
        })
        .await
    }

    async fn delete_vault(&self, vault_id: &str, kek_name: &str) -> Result<()> {
        let (vault_id, kek_name) = (vault_id.to_owned(), kek_name.to_owned());
        self.write(move |tx| {
            tx.execute(
                "DELETE FROM versions WHERE secret_id IN (SELECT id FROM secrets WHERE vault_id = ?1)",
                params![vault_id],
            )?;
            tx.execute("DELETE FROM secrets WHERE vault_id = ?1", params![vault_id])?;
            let n = tx.execute("DELETE FROM vaults WHERE id = ?1", params![vault_id])?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            tx.execute("DELETE FROM wrapped_keys WHERE name = ?1", params![kek_name])?;
            Ok(())
        })
        .await
    }

    async fn add_version(
        &self,
        vault_id: &str,
        name: &SecretName,
        props: &VersionProperties,
        sealed: &SealedValue,
    ) -> Result<()> {
        let (vault_id, name, props, sealed) =
            (vault_id.to_owned(), name.clone(), props.clone(), sealed.clone());
        self.write(move |tx| {
            let secret_id = match find_secret(tx, &vault_id, &name.key())? {
                Some((_, true)) => return Err(StoreError::NameDeleted),
                Some((id, false)) => id,
                None => {
                    tx.prepare_cached("INSERT INTO secrets (vault_id, name, name_key) VALUES (?1, ?2, ?3)")?
                        .execute(params![vault_id, name.as_str(), name.key()])?;
                    tx.last_insert_rowid()
                }
            };
            insert_version(tx, secret_id, &props, &sealed)
        })
        .await
    }

    async fn version(
        &self,
        vault_id: &str,
        name_key: &str,
        version: Option<&str>,
    ) -> Result<Option<StoredVersion>> {
        // One statement on the hot path: the secret's unique index, then its versions' index.
        macro_rules! select_version {
            ($tail:literal) => {
                concat!(
                    "SELECT ",
                    version_columns!(),
                    ", v.wrapped_dek, v.ciphertext FROM secrets s JOIN versions v ON v.secret_id = s.id \
                     WHERE s.vault_id = ?1 AND s.name_key = ?2 AND s.deleted_at IS NULL ",
                    $tail
                )
            };
        }
        // The commit count before the read (see `versions`).
        let writes = self.readers.writes();
        let key = versions::key(vault_id, name_key, version);
        if let Some(cached) = self.versions.get(&key, writes) {
            return Ok(Some(cached));
        }
        let found = self
            .read(|c| {
                Ok(match version {
                    None => c
                        .prepare_cached(select_version!("ORDER BY v.seq DESC LIMIT 1"))?
                        .query_row(params![vault_id, name_key], stored_from_row)
                        .optional()?,
                    Some(v) => c
                        .prepare_cached(select_version!("AND v.version = ?3"))?
                        .query_row(params![vault_id, name_key, v], stored_from_row)
                        .optional()?,
                })
            })
            .await?;
        if let Some(found) = &found {
            self.versions.put(key, writes, found);
        }
        Ok(found)
    }

    async fn list_secrets(
        &self,
        vault_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SecretSummary>> {
        let (vault_id, after) = (vault_id.to_owned(), after.map(str::to_owned));
        self.read(move |c| {
            let sql = format!(
                "SELECT {VERSION_COLUMNS} FROM secrets s
                 JOIN versions v ON v.seq = (SELECT MAX(seq) FROM versions WHERE secret_id = s.id)
                 WHERE s.vault_id = ?1 AND s.deleted_at IS NULL AND (?2 IS NULL OR s.name_key > ?2)
                 ORDER BY s.name_key LIMIT ?3"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![vault_id, after, limit as i64], |row| {
                Ok(SecretSummary { name: row.get(0)?, latest: props_from_row(row)? })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn list_versions(
        &self,
        vault_id: &str,
        name_key: &str,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, String, VersionProperties)>> {
        let (vault_id, name_key) = (vault_id.to_owned(), name_key.to_owned());
        self.read(move |c| {
            let secret_id = active_secret_id(c, &vault_id, &name_key)?;
            let sql = format!(
                "SELECT {VERSION_COLUMNS} FROM versions v JOIN secrets s ON s.id = v.secret_id
                 WHERE v.secret_id = ?1 AND v.seq > ?2 ORDER BY v.seq LIMIT ?3"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![secret_id, after.unwrap_or(0), limit as i64], |row| {
                Ok((row.get::<_, i64>(9)?, row.get::<_, String>(0)?, props_from_row(row)?))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn update_version(
        &self,
        vault_id: &str,
        name_key: &str,
        version: Option<&str>,
        patch: PropertiesPatch,
        now: Timestamp,
    ) -> Result<StoredVersion> {
        let (vault_id, name_key, version) =
            (vault_id.to_owned(), name_key.to_owned(), version.map(str::to_owned));
        self.write(move |tx| {
            let secret_id = active_secret_id(tx, &vault_id, &name_key)?;
            let mut current = load_version(tx, secret_id, version.as_deref())?.ok_or(StoreError::NotFound)?;
            current.props = patch.apply(current.props, now)?;
            let p = &current.props;
            tx.execute(
                "UPDATE versions SET enabled = ?3, nbf = ?4, exp = ?5, updated = ?6, content_type = ?7, tags = ?8
                 WHERE secret_id = ?1 AND version = ?2",
                params![
                    secret_id,
                    p.version,
                    p.attributes.enabled,
                    p.attributes.not_before,
                    p.attributes.expires,
                    p.attributes.updated,
                    p.content_type,
                    tags_json(&p.tags)
                ],
            )?;
            Ok(current)
        })
        .await
    }

    async fn delete_secret(
        &self,
        vault_id: &str,
        name_key: &str,
        deletion: Deletion,
    ) -> Result<DeletedSecret> {
        let (vault_id, name_key) = (vault_id.to_owned(), name_key.to_owned());
        self.write(move |tx| {
            let secret_id = active_secret_id(tx, &vault_id, &name_key)?;
            tx.execute(
                "UPDATE secrets SET deleted_at = ?2, scheduled_purge = ?3 WHERE id = ?1",
                params![secret_id, deletion.deleted_at, deletion.scheduled_purge],
            )?;
            load_deleted(tx, &vault_id, None, Some(&name_key), 1)?.pop().ok_or(StoreError::NotFound)
        })
        .await
    }

    async fn deleted_secret(&self, vault_id: &str, name_key: &str) -> Result<Option<DeletedSecret>> {
        let (vault_id, name_key) = (vault_id.to_owned(), name_key.to_owned());
        self.read(move |c| Ok(load_deleted(c, &vault_id, None, Some(&name_key), 1)?.pop())).await
    }

    async fn list_deleted(
        &self,
        vault_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeletedSecret>> {
        let (vault_id, after) = (vault_id.to_owned(), after.map(str::to_owned));
        self.read(move |c| load_deleted(c, &vault_id, after.as_deref(), None, limit)).await
    }

    async fn recover(&self, vault_id: &str, name_key: &str) -> Result<StoredVersion> {
        let (vault_id, name_key) = (vault_id.to_owned(), name_key.to_owned());
        self.write(move |tx| {
            let Some((secret_id, true)) = find_secret(tx, &vault_id, &name_key)? else {
                return Err(StoreError::NotFound);
            };
            tx.execute(
                "UPDATE secrets SET deleted_at = NULL, scheduled_purge = NULL WHERE id = ?1",
                params![secret_id],
            )?;
            load_version(tx, secret_id, None)?.ok_or(StoreError::NotFound)
        })
        .await
    }

    async fn purge(&self, vault_id: &str, name_key: &str) -> Result<()> {
        let (vault_id, name_key) = (vault_id.to_owned(), name_key.to_owned());
        self.write(move |tx| {
            let Some((secret_id, true)) = find_secret(tx, &vault_id, &name_key)? else {
                return Err(StoreError::NotFound);
            };
            remove_secret(tx, secret_id)
        })
        .await
    }

    async fn all_versions(&self, vault_id: &str, name_key: &str) -> Result<Vec<StoredVersion>> {
        let (vault_id, name_key) = (vault_id.to_owned(), name_key.to_owned());
        self.read(move |c| {
            let secret_id = active_secret_id(c, &vault_id, &name_key)?;
            let sql = format!(
                "SELECT {VERSION_COLUMNS}, v.wrapped_dek, v.ciphertext FROM versions v JOIN secrets s ON s.id = v.secret_id
                 WHERE v.secret_id = ?1 ORDER BY v.seq"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![secret_id], stored_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn restore(
        &self,
        vault_id: &str,
        name: &SecretName,
        versions: Vec<(VersionProperties, SealedValue)>,
    ) -> Result<()> {
        let (vault_id, name) = (vault_id.to_owned(), name.clone());
        self.write(move |tx| {
            match find_secret(tx, &vault_id, &name.key())? {
                Some((_, true)) => return Err(StoreError::NameDeleted),
                Some((_, false)) => return Err(StoreError::NameExists),
                None => {}
            }
            tx.execute(
                "INSERT INTO secrets (vault_id, name, name_key) VALUES (?1, ?2, ?3)",
                params![vault_id, name.as_str(), name.key()],
            )?;
            let secret_id = tx.last_insert_rowid();
            for (props, sealed) in &versions {
                insert_version(tx, secret_id, props, sealed)?;
            }
            Ok(())
        })
        .await
    }

    async fn purge_due(&self, now: Timestamp) -> Result<u64> {
        self.write(move |tx| {
            let ids: Vec<i64> = {
                let mut stmt = tx.prepare(
                    "SELECT id FROM secrets WHERE deleted_at IS NOT NULL AND scheduled_purge <= ?1",
                )?;
                let rows = stmt.query_map(params![now], |r| r.get(0))?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            for id in &ids {
                remove_secret(tx, *id)?;
            }
            Ok(ids.len() as u64)
        })
        .await
    }
}

#[cfg(test)]
mod tests;
