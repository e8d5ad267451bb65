//! Event subscriptions, the event outbox and rotation policies in SQLite (see
//! [`crate::events`] for the design).
//!
//! Why an outbox filled by a trigger rather than a cursor over `versions.seq`: the trigger
//! writes the `SecretNewVersionCreated` row in the transaction that inserts the version, with
//! the names it needs copied in, so the event survives the secret being purged or its vault
//! deleted before delivery, needs no hook in any write path (set, restore and rotation all
//! insert versions), and near-expiry notices can share the same queue, ordering and retry
//! state. The outbox holds only names, versions and dates, never values.

use async_trait::async_trait;
use coffer_core::crypto::SealedValue;
use coffer_core::model::{Timestamp, VersionProperties};
use coffer_core::names::SecretName;
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{active_secret_id, backend, insert_version, SqliteStore};
use crate::events::{EventStore, EventType, OutboxEvent, RotationPolicy, Subscription, SubscriptionState};
use crate::{Result, StoreError};

/// v3: events and rotation policies.
pub(super) const SCHEMA_V3: &str = r#"
CREATE TABLE event_subscriptions (
    id TEXT PRIMARY KEY,
    vault_id TEXT NOT NULL,
    url TEXT NOT NULL,
    types TEXT NOT NULL,
    secret_name TEXT,
    secret_key TEXT,
    near_expiry_secs INTEGER NOT NULL,
    created INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    delivered INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX event_subscriptions_by_vault ON event_subscriptions (vault_id);
CREATE TABLE event_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    subscription_id TEXT NOT NULL,
    type TEXT NOT NULL,
    vault_id TEXT NOT NULL,
    vault_name TEXT NOT NULL,
    secret_name TEXT NOT NULL,
    version TEXT NOT NULL,
    version_seq INTEGER NOT NULL,
    nbf INTEGER,
    exp INTEGER,
    time INTEGER NOT NULL
);
CREATE INDEX event_outbox_by_subscription ON event_outbox (subscription_id, seq);
CREATE TABLE event_notices (
    subscription_id TEXT NOT NULL,
    version_seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    exp INTEGER NOT NULL,
    PRIMARY KEY (subscription_id, version_seq, type, exp)
) WITHOUT ROWID;
CREATE INDEX event_notices_by_version ON event_notices (version_seq);
CREATE INDEX versions_by_exp ON versions (exp) WHERE exp IS NOT NULL;
CREATE TABLE rotation_policies (
    vault_id TEXT NOT NULL,
    name_key TEXT NOT NULL,
    secret_name TEXT NOT NULL,
    every_secs INTEGER,
    before_expiry_secs INTEGER,
    generator TEXT,
    expires_after_secs INTEGER,
    notify_only INTEGER NOT NULL,
    next_due INTEGER,
    last_rotated INTEGER,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    PRIMARY KEY (vault_id, name_key)
);
CREATE INDEX rotation_policies_due ON rotation_policies (next_due) WHERE next_due IS NOT NULL;

CREATE TRIGGER events_on_new_version AFTER INSERT ON versions BEGIN
    INSERT INTO event_outbox
        (subscription_id, type, vault_id, vault_name, secret_name, version, version_seq, nbf, exp, time)
    SELECT sub.id, 'SecretNewVersionCreated', s.vault_id, va.name, s.name, NEW.version, NEW.seq, NEW.nbf,
           NEW.exp, unixepoch()
    FROM secrets s
    JOIN vaults va ON va.id = s.vault_id
    JOIN event_subscriptions sub ON sub.vault_id = s.vault_id
    WHERE s.id = NEW.secret_id
      AND (sub.types = '' OR instr(sub.types, ',SecretNewVersionCreated,') > 0)
      AND (sub.secret_key IS NULL OR sub.secret_key = s.name_key);
END;
CREATE TRIGGER events_on_version_delete AFTER DELETE ON versions BEGIN
    DELETE FROM event_notices WHERE version_seq = OLD.seq;
END;
CREATE TRIGGER rotation_on_secret_delete AFTER DELETE ON secrets BEGIN
    DELETE FROM rotation_policies WHERE vault_id = OLD.vault_id AND name_key = OLD.name_key;
END;
CREATE TRIGGER events_on_vault_delete AFTER DELETE ON vaults BEGIN
    DELETE FROM event_outbox
        WHERE subscription_id IN (SELECT id FROM event_subscriptions WHERE vault_id = OLD.id);
    DELETE FROM event_notices
        WHERE subscription_id IN (SELECT id FROM event_subscriptions WHERE vault_id = OLD.id);
    DELETE FROM wrapped_keys
        WHERE name IN (SELECT 'webhook-secret:' || id FROM event_subscriptions WHERE vault_id = OLD.id);
    DELETE FROM event_subscriptions WHERE vault_id = OLD.id;
    DELETE FROM rotation_policies WHERE vault_id = OLD.id;
END;
"#;

/// How many events a notice scan queues at most (the next scan continues).
const NOTICE_BATCH: i64 = 1000;

/// `,A,B,` (empty for all types), so SQL can test membership with `instr`.
fn types_column(types: &[EventType]) -> String {
    if types.is_empty() {
        return String::new();
    }
    let names: Vec<&str> = types.iter().map(EventType::as_str).collect();
    format!(",{},", names.join(","))
}

fn parse_types(text: &str) -> Result<Vec<EventType>> {
    text.split(',')
        .filter(|t| !t.is_empty())
        .map(|t| EventType::parse(t).ok_or_else(|| backend(format!("unknown event type {t}"))))
        .collect()
}

const SUBSCRIPTION_COLUMNS: &str =
    "sub.id, sub.vault_id, va.name, sub.url, sub.types, sub.secret_name, sub.near_expiry_secs, sub.created";

fn subscription_from_row(row: &Row<'_>) -> rusqlite::Result<(Subscription, String)> {
    Ok((
        Subscription {
            id: row.get(0)?,
            vault_id: row.get(1)?,
            vault_name: row.get(2)?,
            url: row.get(3)?,
            types: Vec::new(),
            secret: row.get(5)?,
            near_expiry_secs: row.get(6)?,
            created: row.get(7)?,
        },
        row.get(4)?,
    ))
}

fn with_types((mut sub, types): (Subscription, String)) -> Result<Subscription> {
    sub.types = parse_types(&types)?;
    Ok(sub)
}

const POLICY_COLUMNS: &str = "p.vault_id, p.secret_name, p.every_secs, p.before_expiry_secs, p.generator, \
     p.expires_after_secs, p.notify_only, p.next_due, p.last_rotated, p.created, p.updated";

fn policy_from_row(row: &Row<'_>) -> rusqlite::Result<RotationPolicy> {
    Ok(RotationPolicy {
        vault_id: row.get(0)?,
        secret_name: row.get(1)?,
        every_secs: row.get(2)?,
        before_expiry_secs: row.get(3)?,
        generator: row.get(4)?,
        expires_after_secs: row.get(5)?,
        notify_only: row.get(6)?,
        next_due: row.get(7)?,
        last_rotated: row.get(8)?,
        created: row.get(9)?,
        updated: row.get(10)?,
    })
}

fn load_subscription(conn: &Connection, id: &str) -> Result<Option<Subscription>> {
    let sql = format!(
        "SELECT {SUBSCRIPTION_COLUMNS} FROM event_subscriptions sub JOIN vaults va ON va.id = sub.vault_id
         WHERE sub.id = ?1"
    );
    conn.query_row(&sql, params![id], subscription_from_row).optional()?.map(with_types).transpose()
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn create_subscription(&self, sub: &Subscription, wrapped_secret: (String, Vec<u8>)) -> Result<()> {
        let sub = sub.clone();
        self.write(move |tx| {
            let vault_exists: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM vaults WHERE id = ?1)",
                params![sub.vault_id],
                |r| r.get(0),
            )?;
            if !vault_exists {
                return Err(StoreError::NotFound);
            }
            tx.execute(
                "INSERT INTO event_subscriptions
                     (id, vault_id, url, types, secret_name, secret_key, near_expiry_secs, created)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    sub.id,
                    sub.vault_id,
                    sub.url,
                    types_column(&sub.types),
                    sub.secret,
                    sub.secret.as_deref().map(str::to_ascii_lowercase),
                    sub.near_expiry_secs,
                    sub.created
                ],
            )?;
            tx.execute(
                "INSERT INTO wrapped_keys (name, blob) VALUES (?1, ?2)",
                params![wrapped_secret.0, wrapped_secret.1],
            )?;
            Ok(())
        })
        .await
    }

    async fn subscriptions(&self, vault_id: Option<&str>) -> Result<Vec<SubscriptionState>> {
        let vault_id = vault_id.map(str::to_owned);
        self.read(move |c| {
            let sql = format!(
                "SELECT {SUBSCRIPTION_COLUMNS},
                        (SELECT COUNT(*) FROM event_outbox o WHERE o.subscription_id = sub.id),
                        sub.attempts, sub.next_attempt, sub.last_error, sub.delivered
                 FROM event_subscriptions sub JOIN vaults va ON va.id = sub.vault_id
                 WHERE ?1 IS NULL OR sub.vault_id = ?1
                 ORDER BY va.name, sub.created, sub.id"
            );
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map(params![vault_id], |r| {
                Ok((
                    subscription_from_row(r)?,
                    r.get::<_, i64>(8)?,
                    r.get::<_, i64>(9)?,
                    r.get::<_, i64>(10)?,
                    r.get::<_, Option<String>>(11)?,
                    r.get::<_, i64>(12)?,
                ))
            })?;
            rows.map(|row| {
                let (sub, pending, attempts, next_attempt, last_error, delivered) = row?;
                Ok(SubscriptionState {
                    subscription: with_types(sub)?,
                    pending: pending as u64,
                    attempts: attempts as u32,
                    next_attempt,
                    last_error,
                    delivered: delivered as u64,
                })
            })
            .collect()
        })
        .await
    }

    async fn subscription(&self, id: &str) -> Result<Option<Subscription>> {
        let id = id.to_owned();
        self.read(move |c| load_subscription(c, &id)).await
    }

    async fn delete_subscription(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.write(move |tx| {
            tx.execute("DELETE FROM event_outbox WHERE subscription_id = ?1", params![id])?;
            tx.execute("DELETE FROM event_notices WHERE subscription_id = ?1", params![id])?;
            tx.execute(
                "DELETE FROM wrapped_keys WHERE name = ?1",
                params![Subscription::secret_key_name(&id)],
            )?;
            Ok(tx.execute("DELETE FROM event_subscriptions WHERE id = ?1", params![id])? > 0)
        })
        .await
    }

    async fn enqueue_expiry_notices(&self, now: Timestamp) -> Result<u64> {
        self.write(move |tx| {
            let widest: Option<i64> =
                tx.query_row("SELECT MAX(near_expiry_secs) FROM event_subscriptions", [], |r| r.get(0))?;
            let Some(widest) = widest else { return Ok(0) };
            let mut stmt = tx.prepare_cached(
                "SELECT c.sub_id, c.type, c.vault_id, c.vault_name, c.name, c.version, c.seq, c.nbf, c.exp
                 FROM (
                     SELECT sub.id AS sub_id, sub.types AS types,
                            CASE WHEN v.exp <= ?1 THEN 'SecretExpired' ELSE 'SecretNearExpiry' END AS type,
                            s.vault_id AS vault_id, va.name AS vault_name, s.name AS name,
                            v.version AS version,
                            v.seq AS seq, v.nbf AS nbf, v.exp AS exp
                     FROM versions v
                     JOIN secrets s ON s.id = v.secret_id AND s.deleted_at IS NULL
                     JOIN vaults va ON va.id = s.vault_id
                     JOIN event_subscriptions sub ON sub.vault_id = s.vault_id
                          AND (sub.secret_key IS NULL OR sub.secret_key = s.name_key)
                     WHERE v.exp IS NOT NULL AND v.exp <= ?2 AND v.exp <= ?1 + sub.near_expiry_secs
                       AND v.seq = (SELECT MAX(seq) FROM versions WHERE secret_id = v.secret_id)
                 ) c
                 WHERE (c.types = '' OR instr(c.types, ',' || c.type || ',') > 0)
                   AND NOT EXISTS (SELECT 1 FROM event_notices n WHERE n.subscription_id = c.sub_id
                                   AND n.version_seq = c.seq AND n.type = c.type AND n.exp = c.exp)
                 ORDER BY c.exp, c.seq LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![now, now.saturating_add(widest), NOTICE_BATCH], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, Option<i64>>(7)?,
                    r.get::<_, i64>(8)?,
                ))
            })?;
            let found = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            drop(stmt);
            for (sub_id, kind, vault_id, vault_name, name, version, seq, nbf, exp) in &found {
                tx.execute(
                    "INSERT INTO event_notices (subscription_id, version_seq, type, exp)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![sub_id, seq, kind, exp],
                )?;
                tx.execute(
                    "INSERT INTO event_outbox
                        (subscription_id, type, vault_id, vault_name, secret_name, version, version_seq,
                         nbf, exp, time)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    params![sub_id, kind, vault_id, vault_name, name, version, seq, nbf, exp, now],
                )?;
            }
            Ok(found.len() as u64)
        })
        .await
    }

    async fn pending_events(&self, subscription_id: &str, limit: usize) -> Result<Vec<OutboxEvent>> {
        let id = subscription_id.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, subscription_id, type, vault_id, vault_name, secret_name, version, version_seq,
                        nbf, exp, time
                 FROM event_outbox WHERE subscription_id = ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![id, limit as i64], |r| {
                let kind: String = r.get(2)?;
                let event_type = EventType::parse(&kind).ok_or_else(|| {
                    rusqlite::Error::InvalidColumnType(
                        2,
                        format!("event type {kind}"),
                        rusqlite::types::Type::Text,
                    )
                })?;
                Ok(OutboxEvent {
                    seq: r.get(0)?,
                    subscription_id: r.get(1)?,
                    event_type,
                    vault_id: r.get(3)?,
                    vault_name: r.get(4)?,
                    secret_name: r.get(5)?,
                    version: r.get(6)?,
                    version_seq: r.get(7)?,
                    nbf: r.get(8)?,
                    exp: r.get(9)?,
                    time: r.get(10)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn subscriptions_due(&self, now: Timestamp) -> Result<Vec<(Subscription, u32)>> {
        self.read(move |c| {
            let sql = format!(
                "SELECT {SUBSCRIPTION_COLUMNS}, sub.attempts
                 FROM event_subscriptions sub JOIN vaults va ON va.id = sub.vault_id
                 WHERE sub.next_attempt <= ?1
                   AND EXISTS (SELECT 1 FROM event_outbox o WHERE o.subscription_id = sub.id)"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let rows =
                stmt.query_map(params![now], |r| Ok((subscription_from_row(r)?, r.get::<_, i64>(8)?)))?;
            rows.map(|row| {
                let (sub, attempts) = row?;
                Ok((with_types(sub)?, attempts as u32))
            })
            .collect()
        })
        .await
    }

    async fn ack_event(&self, subscription_id: &str, seq: i64) -> Result<()> {
        let id = subscription_id.to_owned();
        self.write(move |tx| {
            let removed = tx.execute(
                "DELETE FROM event_outbox WHERE subscription_id = ?1 AND seq = ?2",
                params![id, seq],
            )?;
            tx.execute(
                "UPDATE event_subscriptions SET attempts = 0, next_attempt = 0, last_error = NULL,
                     delivered = delivered + ?2 WHERE id = ?1",
                params![id, removed as i64],
            )?;
            Ok(())
        })
        .await
    }

    async fn defer_events(
        &self,
        subscription_id: &str,
        attempts: u32,
        next_attempt: Timestamp,
        error: &str,
    ) -> Result<()> {
        let (id, error) = (subscription_id.to_owned(), error.to_owned());
        self.write(move |tx| {
            tx.execute(
                "UPDATE event_subscriptions SET attempts = ?2, next_attempt = ?3, last_error = ?4
                 WHERE id = ?1",
                params![id, attempts, next_attempt, error],
            )?;
            Ok(())
        })
        .await
    }

    async fn put_rotation_policy(&self, p: &RotationPolicy) -> Result<()> {
        let p = p.clone();
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO rotation_policies (vault_id, name_key, secret_name, every_secs,
                     before_expiry_secs, generator, expires_after_secs, notify_only, next_due, last_rotated,
                     created, updated)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                 ON CONFLICT (vault_id, name_key) DO UPDATE SET secret_name = ?3, every_secs = ?4,
                     before_expiry_secs = ?5, generator = ?6, expires_after_secs = ?7, notify_only = ?8,
                     next_due = ?9, updated = ?12",
                params![
                    p.vault_id,
                    p.secret_name.to_ascii_lowercase(),
                    p.secret_name,
                    p.every_secs,
                    p.before_expiry_secs,
                    p.generator,
                    p.expires_after_secs,
                    p.notify_only,
                    p.next_due,
                    p.last_rotated,
                    p.created,
                    p.updated
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn rotation_policy(&self, vault_id: &str, name_key: &str) -> Result<Option<RotationPolicy>> {
        let (vault_id, name_key) = (vault_id.to_owned(), name_key.to_owned());
        self.read(move |c| {
            let sql = format!(
                "SELECT {POLICY_COLUMNS} FROM rotation_policies p WHERE p.vault_id = ?1 AND p.name_key = ?2"
            );
            Ok(c.query_row(&sql, params![vault_id, name_key], policy_from_row).optional()?)
        })
        .await
    }

    async fn rotation_policies(&self, vault_id: &str) -> Result<Vec<RotationPolicy>> {
        let vault_id = vault_id.to_owned();
        self.read(move |c| {
            let sql = format!(
                "SELECT {POLICY_COLUMNS} FROM rotation_policies p WHERE p.vault_id = ?1 ORDER BY p.name_key"
            );
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map(params![vault_id], policy_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn delete_rotation_policy(&self, vault_id: &str, name_key: &str) -> Result<bool> {
        let (vault_id, name_key) = (vault_id.to_owned(), name_key.to_owned());
        self.write(move |tx| {
            Ok(tx.execute(
                "DELETE FROM rotation_policies WHERE vault_id = ?1 AND name_key = ?2",
                params![vault_id, name_key],
            )? > 0)
        })
        .await
    }

    async fn due_rotation_policies(&self, now: Timestamp, limit: usize) -> Result<Vec<RotationPolicy>> {
        self.read(move |c| {
            let sql = format!(
                "SELECT {POLICY_COLUMNS} FROM rotation_policies p
                 JOIN secrets s
                   ON s.vault_id = p.vault_id AND s.name_key = p.name_key AND s.deleted_at IS NULL
                 WHERE p.next_due IS NOT NULL AND p.next_due <= ?1 AND p.notify_only = 0
                 ORDER BY p.next_due LIMIT ?2"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![now, limit as i64], policy_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn reschedule_rotation(
        &self,
        vault_id: &str,
        name_key: &str,
        expected: Option<Timestamp>,
        next: Option<Timestamp>,
    ) -> Result<bool> {
        let (vault_id, name_key) = (vault_id.to_owned(), name_key.to_owned());
        self.write(move |tx| {
            Ok(tx.execute(
                "UPDATE rotation_policies SET next_due = ?4
                 WHERE vault_id = ?1 AND name_key = ?2 AND next_due IS ?3",
                params![vault_id, name_key, expected, next],
            )? == 1)
        })
        .await
    }

    async fn rotate_version_if_due(
        &self,
        vault_id: &str,
        name: &SecretName,
        props: &VersionProperties,
        sealed: &SealedValue,
        expected_due: Timestamp,
        next_due: Option<Timestamp>,
    ) -> Result<bool> {
        let (vault_id, name, props, sealed) =
            (vault_id.to_owned(), name.clone(), props.clone(), sealed.clone());
        self.write(move |tx| {
            let claimed = tx.execute(
                "UPDATE rotation_policies SET next_due = ?4, last_rotated = ?5
                 WHERE vault_id = ?1 AND name_key = ?2 AND next_due = ?3 AND notify_only = 0",
                params![vault_id, name.key(), expected_due, next_due, props.attributes.created],
            )?;
            if claimed != 1 {
                return Ok(false);
            }
            let secret_id = active_secret_id(tx, &vault_id, &name.key())?;
            insert_version(tx, secret_id, &props, &sealed)?;
            Ok(true)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{sealed, store_with_vault};
    use super::*;
    use crate::Store;
    use coffer_core::model::{Tags, VersionAttributes};

    fn props(version: &str, created: i64, exp: Option<i64>) -> VersionProperties {
        VersionProperties {
            version: version.into(),
            attributes: VersionAttributes {
                enabled: true,
                not_before: None,
                expires: exp,
                created,
                updated: created,
            },
            content_type: None,
            tags: Tags::new(),
        }
    }

    fn subscription(id: &str, types: Vec<EventType>, secret: Option<&str>, window: i64) -> Subscription {
        Subscription {
            id: id.into(),
            vault_id: "vault-1".into(),
            vault_name: "dev".into(),
            url: "http://127.0.0.1:9/hook".into(),
            types,
            secret: secret.map(str::to_owned),
            near_expiry_secs: window,
            created: 1,
        }
    }

    async fn subscribe(store: &SqliteStore, sub: &Subscription) {
        store.create_subscription(sub, (Subscription::secret_key_name(&sub.id), vec![9])).await.unwrap();
    }

    #[tokio::test]
    async fn new_versions_fill_matching_outboxes_in_the_write_transaction() {
        let (_d, store, vault) = store_with_vault().await;
        subscribe(&store, &subscription("all", vec![], None, 30)).await;
        subscribe(
            &store,
            &subscription("db", vec![EventType::SecretNewVersionCreated], Some("DB-Password"), 30),
        )
        .await;
        subscribe(&store, &subscription("expiry", vec![EventType::SecretExpired], None, 30)).await;
        let db = SecretName::parse("db-password").unwrap();
        let other = SecretName::parse("other").unwrap();
        store.add_version(&vault, &db, &props("a", 10, None), &sealed(1)).await.unwrap();
        store.add_version(&vault, &other, &props("b", 11, None), &sealed(2)).await.unwrap();

        let all = store.pending_events("all", 10).await.unwrap();
        assert_eq!(all.iter().map(|e| e.version.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(all[0].event_type, EventType::SecretNewVersionCreated);
        assert_eq!((all[0].vault_name.as_str(), all[0].secret_name.as_str()), ("dev", "db-password"));
        let db_events = store.pending_events("db", 10).await.unwrap();
        assert_eq!(db_events.len(), 1);
        assert_eq!(db_events[0].version, "a");
        assert!(store.pending_events("expiry", 10).await.unwrap().is_empty());

        let due = store.subscriptions_due(100).await.unwrap();
        let mut ids: Vec<_> = due.iter().map(|(s, _)| s.id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["all", "db"]);
        store.defer_events("all", 1, 200, "connection refused").await.unwrap();
        assert_eq!(store.subscriptions_due(100).await.unwrap().len(), 1);
        let state = store.subscriptions(None).await.unwrap();
        let all_state = state.iter().find(|s| s.subscription.id == "all").unwrap();
        assert_eq!((all_state.pending, all_state.attempts, all_state.next_attempt), (2, 1, 200));
        assert_eq!(all_state.last_error.as_deref(), Some("connection refused"));
        assert_eq!(
            state.iter().find(|s| s.subscription.id == "db").unwrap().subscription.types,
            [EventType::SecretNewVersionCreated]
        );

        // Acknowledged events leave; the retry state resets.
        store.ack_event("all", all[0].seq).await.unwrap();
        let state = store.subscriptions(Some("vault-1")).await.unwrap();
        let all_state = state.iter().find(|s| s.subscription.id == "all").unwrap();
        assert_eq!((all_state.pending, all_state.attempts, all_state.delivered), (1, 0, 1));

        // The event outlives its secret; deleting the subscription removes its outbox and key.
        store
            .delete_secret(
                &vault,
                "other",
                coffer_core::model::Deletion { deleted_at: 20, scheduled_purge: 20 },
            )
            .await
            .unwrap();
        store.purge(&vault, "other").await.unwrap();
        assert_eq!(store.pending_events("all", 10).await.unwrap().len(), 1);
        assert!(store.delete_subscription("all").await.unwrap());
        assert!(!store.delete_subscription("all").await.unwrap());
        assert!(store.pending_events("all", 10).await.unwrap().is_empty());
        assert!(store.wrapped_key("webhook-secret:all").await.unwrap().is_none());
        assert!(store.wrapped_key("webhook-secret:db").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn expiry_notices_fire_once_per_version_and_expiry() {
        let (_d, store, vault) = store_with_vault().await;
        subscribe(
            &store,
            &subscription("s", vec![EventType::SecretNearExpiry, EventType::SecretExpired], None, 100),
        )
        .await;
        let name = SecretName::parse("api-key").unwrap();
        let far = SecretName::parse("far").unwrap();
        store.add_version(&vault, &name, &props("v1", 1, Some(1_150)), &sealed(1)).await.unwrap();
        store.add_version(&vault, &far, &props("f1", 1, Some(5_000)), &sealed(1)).await.unwrap();
        assert!(store.pending_events("s", 10).await.unwrap().is_empty(), "new-version events were filtered");

        assert_eq!(store.enqueue_expiry_notices(1_000).await.unwrap(), 0, "outside the window");
        assert_eq!(store.enqueue_expiry_notices(1_060).await.unwrap(), 1);
        assert_eq!(store.enqueue_expiry_notices(1_061).await.unwrap(), 0, "once");
        assert_eq!(store.enqueue_expiry_notices(1_200).await.unwrap(), 1);
        assert_eq!(store.enqueue_expiry_notices(1_300).await.unwrap(), 0);
        let events = store.pending_events("s", 10).await.unwrap();
        assert_eq!(
            events.iter().map(|e| (e.event_type, e.version.as_str(), e.exp, e.time)).collect::<Vec<_>>(),
            [
                (EventType::SecretNearExpiry, "v1", Some(1_150), 1_060),
                (EventType::SecretExpired, "v1", Some(1_150), 1_200)
            ]
        );

        // A new expiry on the same version re-arms; only the latest version is watched.
        store
            .update_version(
                &vault,
                "api-key",
                None,
                coffer_core::model::PropertiesPatch { expires: Some(1_350), ..Default::default() },
                1_300,
            )
            .await
            .unwrap();
        assert_eq!(store.enqueue_expiry_notices(1_300).await.unwrap(), 1);
        store.add_version(&vault, &name, &props("v2", 1_310, None), &sealed(2)).await.unwrap();
        assert_eq!(store.enqueue_expiry_notices(1_400).await.unwrap(), 0);
    }

    fn policy(next_due: Option<i64>) -> RotationPolicy {
        RotationPolicy {
            vault_id: "vault-1".into(),
            secret_name: "Api-Key".into(),
            every_secs: Some(60),
            before_expiry_secs: None,
            generator: Some("uuid".into()),
            expires_after_secs: None,
            notify_only: false,
            next_due,
            last_rotated: None,
            created: 1,
            updated: 1,
        }
    }

    #[tokio::test]
    async fn a_due_time_is_served_exactly_once() {
        let (_d, store, vault) = store_with_vault().await;
        let name = SecretName::parse("api-key").unwrap();
        store.add_version(&vault, &name, &props("v1", 1, None), &sealed(1)).await.unwrap();
        store.put_rotation_policy(&policy(Some(61))).await.unwrap();
        assert!(store.due_rotation_policies(60, 10).await.unwrap().is_empty());
        let due = store.due_rotation_policies(61, 10).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].secret_name, "Api-Key");

        assert!(store
            .rotate_version_if_due(&vault, &name, &props("v2", 62, None), &sealed(2), 61, Some(122))
            .await
            .unwrap());
        // A retry of the same due time (a second scheduler, or a replay) writes nothing.
        assert!(!store
            .rotate_version_if_due(&vault, &name, &props("v3", 63, None), &sealed(3), 61, Some(123))
            .await
            .unwrap());
        let versions = store.list_versions(&vault, "api-key", None, 10).await.unwrap();
        assert_eq!(versions.iter().map(|(_, _, p)| p.version.as_str()).collect::<Vec<_>>(), ["v1", "v2"]);
        let p = store.rotation_policy(&vault, "api-key").await.unwrap().unwrap();
        assert_eq!((p.next_due, p.last_rotated), (Some(122), Some(62)));

        // A failed insert rolls the claim back.
        let clash = store
            .rotate_version_if_due(&vault, &name, &props("v2", 123, None), &sealed(4), 122, Some(183))
            .await;
        assert!(clash.is_err(), "duplicate version id");
        assert_eq!(store.rotation_policy(&vault, "api-key").await.unwrap().unwrap().next_due, Some(122));

        assert!(!store.reschedule_rotation(&vault, "api-key", Some(1), Some(500)).await.unwrap());
        assert!(store.reschedule_rotation(&vault, "api-key", Some(122), Some(500)).await.unwrap());
        assert_eq!(store.rotation_policies(&vault).await.unwrap()[0].next_due, Some(500));

        // Soft-deleted secrets are not due; purging removes the policy.
        store
            .delete_secret(
                &vault,
                "api-key",
                coffer_core::model::Deletion { deleted_at: 600, scheduled_purge: 600 },
            )
            .await
            .unwrap();
        assert!(store.due_rotation_policies(1_000, 10).await.unwrap().is_empty());
        store.purge(&vault, "api-key").await.unwrap();
        assert!(store.rotation_policy(&vault, "api-key").await.unwrap().is_none());
        assert!(!store.delete_rotation_policy(&vault, "api-key").await.unwrap());
    }

    #[tokio::test]
    async fn deleting_a_vault_removes_its_subscriptions_and_policies() {
        let (_d, store, vault) = store_with_vault().await;
        subscribe(&store, &subscription("s", vec![], None, 30)).await;
        let name = SecretName::parse("api-key").unwrap();
        store.add_version(&vault, &name, &props("v1", 1, None), &sealed(1)).await.unwrap();
        store.put_rotation_policy(&policy(Some(61))).await.unwrap();
        store.delete_vault(&vault, "vault-kek:vault-1").await.unwrap();
        assert!(store.subscriptions(None).await.unwrap().is_empty());
        assert!(store.subscription("s").await.unwrap().is_none());
        assert!(store.pending_events("s", 10).await.unwrap().is_empty());
        assert!(store.wrapped_key("webhook-secret:s").await.unwrap().is_none());
        assert!(store.rotation_policy(&vault, "api-key").await.unwrap().is_none());
    }
}
