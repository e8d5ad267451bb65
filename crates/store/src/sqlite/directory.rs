//! The identity directory in SQLite.

use async_trait::async_trait;
use coffer_core::authz::{Principal, PrincipalKind, RoleAssignment, RoleDefinition, Scope};
use coffer_core::identity::{Binding, CredentialKind, CredentialRecord, FederatedCredential};
use rusqlite::{params, OptionalExtension};

use super::{backend, SqliteStore};
use crate::{DirectoryStore, Result, StoreError};

/// v2: the identity directory. Administrators of v1 become `Coffer Administrator` at `/`.
pub(super) const SCHEMA_V2: &str = concat!(
    r#"
ALTER TABLE principals ADD COLUMN client_id TEXT;
ALTER TABLE principals ADD COLUMN created INTEGER NOT NULL DEFAULT 0;
UPDATE principals SET client_id = object_id WHERE client_id IS NULL;
CREATE UNIQUE INDEX principals_client_id ON principals (client_id);
CREATE UNIQUE INDEX principals_name ON principals (display_name);
CREATE TABLE group_members (
    group_id TEXT NOT NULL REFERENCES principals(object_id),
    member_id TEXT NOT NULL REFERENCES principals(object_id),
    PRIMARY KEY (group_id, member_id)
);
CREATE TABLE credentials (
    id TEXT PRIMARY KEY,
    principal_id TEXT NOT NULL REFERENCES principals(object_id),
    kind TEXT NOT NULL,
    material TEXT NOT NULL,
    created INTEGER NOT NULL,
    expires INTEGER
);
CREATE INDEX credentials_by_principal ON credentials (principal_id, kind);
CREATE TABLE federated_credentials (
    id TEXT PRIMARY KEY,
    principal_id TEXT NOT NULL REFERENCES principals(object_id),
    issuer TEXT NOT NULL,
    subject TEXT NOT NULL,
    audience TEXT NOT NULL,
    jwks_url TEXT,
    jwks TEXT,
    UNIQUE (issuer, subject, audience)
);
CREATE TABLE role_definitions (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    actions TEXT NOT NULL,
    data_actions TEXT NOT NULL
);
CREATE TABLE role_assignments (
    id TEXT PRIMARY KEY,
    principal_id TEXT NOT NULL REFERENCES principals(object_id),
    role_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    UNIQUE (principal_id, role_id, scope)
);
CREATE TABLE bindings (
    id TEXT PRIMARY KEY,
    identity_id TEXT NOT NULL REFERENCES principals(object_id),
    agent_id TEXT NOT NULL REFERENCES principals(object_id),
    uid INTEGER,
    exe TEXT,
    unit TEXT,
    cgroup_prefix TEXT
);
INSERT INTO role_assignments (id, principal_id, role_id, scope)
    SELECT lower(hex(randomblob(16))), object_id, '"#,
    "c0ffee00-0000-4000-8000-000000000001",
    r#"', '/' FROM principals WHERE administrator = 1;
"#
);

/// v4: a binding may opt in to processes in other user or mount namespaces; existing bindings
/// do not (issue 15: a namespace chooses what its paths show).
pub(super) const SCHEMA_V4: &str =
    "ALTER TABLE bindings ADD COLUMN allow_namespaced INTEGER NOT NULL DEFAULT 0;";

fn unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

fn json_list(items: &[String]) -> String {
    serde_json::to_string(items).expect("string list serializes")
}

fn parse_list(text: &str) -> Result<Vec<String>> {
    serde_json::from_str(text).map_err(backend)
}

#[async_trait]
impl DirectoryStore for SqliteStore {
    async fn principals(&self) -> Result<Vec<Principal>> {
        self.read(|c| {
            let mut stmt =
                c.prepare("SELECT object_id, client_id, display_name, kind, enabled FROM principals")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get(4)?,
                ))
            })?;
            rows.map(|row| {
                let (object_id, client_id, display_name, kind, enabled) = row?;
                let kind = PrincipalKind::parse(&kind)
                    .ok_or_else(|| backend(format!("unknown principal kind {kind}")))?;
                Ok(Principal { object_id, client_id, display_name, kind, enabled })
            })
            .collect()
        })
        .await
    }

    async fn put_principal(&self, p: &Principal) -> Result<()> {
        let p = p.clone();
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO principals (object_id, client_id, display_name, kind, enabled, administrator, created)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, strftime('%s','now'))
                 ON CONFLICT (object_id) DO UPDATE SET client_id = ?2, display_name = ?3, kind = ?4, enabled = ?5",
                params![p.object_id, p.client_id, p.display_name, p.kind.as_str(), p.enabled],
            )
            .map_err(|e| if unique_violation(&e) { StoreError::NameExists } else { e.into() })?;
            Ok(())
        })
        .await
    }

    async fn delete_principal(&self, object_id: &str) -> Result<()> {
        let id = object_id.to_owned();
        self.write(move |tx| {
            for sql in [
                "DELETE FROM group_members WHERE group_id = ?1 OR member_id = ?1",
                "DELETE FROM credentials WHERE principal_id = ?1",
                "DELETE FROM federated_credentials WHERE principal_id = ?1",
                "DELETE FROM role_assignments WHERE principal_id = ?1",
                "DELETE FROM bindings WHERE identity_id = ?1 OR agent_id = ?1",
            ] {
                tx.execute(sql, params![id])?;
            }
            if tx.execute("DELETE FROM principals WHERE object_id = ?1", params![id])? == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await
    }

    async fn memberships(&self) -> Result<Vec<(String, String)>> {
        self.read(|c| {
            let mut stmt = c.prepare("SELECT group_id, member_id FROM group_members")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn add_member(&self, group_id: &str, member_id: &str) -> Result<()> {
        let (g, m) = (group_id.to_owned(), member_id.to_owned());
        self.write(move |tx| {
            tx.execute(
                "INSERT OR IGNORE INTO group_members (group_id, member_id) VALUES (?1, ?2)",
                params![g, m],
            )?;
            Ok(())
        })
        .await
    }

    async fn remove_member(&self, group_id: &str, member_id: &str) -> Result<bool> {
        let (g, m) = (group_id.to_owned(), member_id.to_owned());
        self.write(move |tx| {
            Ok(tx
                .execute("DELETE FROM group_members WHERE group_id = ?1 AND member_id = ?2", params![g, m])?
                > 0)
        })
        .await
    }

    async fn credentials(&self, principal_id: &str, kind: CredentialKind) -> Result<Vec<CredentialRecord>> {
        let id = principal_id.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, principal_id, material, created, expires FROM credentials WHERE principal_id = ?1 AND kind = ?2",
            )?;
            let rows = stmt.query_map(params![id, kind.as_str()], |r| {
                Ok(CredentialRecord {
                    id: r.get(0)?,
                    principal_id: r.get(1)?,
                    kind,
                    material: r.get(2)?,
                    created: r.get(3)?,
                    expires: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn credential(&self, id: &str) -> Result<Option<CredentialRecord>> {
        let id = id.to_owned();
        self.read(move |c| {
            let row = c
                .query_row(
                    "SELECT id, principal_id, kind, material, created, expires FROM credentials WHERE id = ?1",
                    params![id],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, i64>(4)?,
                            r.get::<_, Option<i64>>(5)?,
                        ))
                    },
                )
                .optional()?;
            row.map(|(id, principal_id, kind, material, created, expires)| {
                let kind = CredentialKind::parse(&kind).ok_or_else(|| backend(format!("unknown credential kind {kind}")))?;
                Ok(CredentialRecord { id, principal_id, kind, material, created, expires })
            })
            .transpose()
        })
        .await
    }

    async fn add_credential(&self, c: &CredentialRecord) -> Result<()> {
        let c = c.clone();
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO credentials (id, principal_id, kind, material, created, expires) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![c.id, c.principal_id, c.kind.as_str(), c.material, c.created, c.expires],
            )?;
            Ok(())
        })
        .await
    }

    async fn delete_credentials(
        &self,
        principal_id: &str,
        kind: CredentialKind,
        keep: Option<&str>,
    ) -> Result<u64> {
        let (id, keep) = (principal_id.to_owned(), keep.map(str::to_owned));
        self.write(move |tx| {
            Ok(tx.execute(
                "DELETE FROM credentials WHERE principal_id = ?1 AND kind = ?2 AND (?3 IS NULL OR id <> ?3)",
                params![id, kind.as_str(), keep],
            )? as u64)
        })
        .await
    }

    async fn take_credential(&self, id: &str) -> Result<bool> {
        self.delete_by_id("credentials", id).await
    }

    async fn custom_roles(&self) -> Result<Vec<RoleDefinition>> {
        self.read(|c| {
            let mut stmt =
                c.prepare("SELECT id, name, description, actions, data_actions FROM role_definitions")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })?;
            rows.map(|row| {
                let (id, name, description, actions, data_actions) = row?;
                Ok(RoleDefinition {
                    id,
                    name,
                    description,
                    actions: parse_list(&actions)?,
                    data_actions: parse_list(&data_actions)?,
                    assignable_roles: None,
                    builtin: false,
                })
            })
            .collect()
        })
        .await
    }

    async fn put_custom_role(&self, role: &RoleDefinition) -> Result<()> {
        let r = role.clone();
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO role_definitions (id, name, description, actions, data_actions) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET name = ?2, description = ?3, actions = ?4, data_actions = ?5",
                params![r.id, r.name, r.description, json_list(&r.actions), json_list(&r.data_actions)],
            )
            .map_err(|e| if unique_violation(&e) { StoreError::NameExists } else { e.into() })?;
            Ok(())
        })
        .await
    }

    async fn delete_custom_role(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.write(move |tx| {
            let used: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM role_assignments WHERE role_id = ?1)",
                params![id],
                |r| r.get(0),
            )?;
            if used {
                return Err(StoreError::NameExists);
            }
            Ok(tx.execute("DELETE FROM role_definitions WHERE id = ?1", params![id])? > 0)
        })
        .await
    }

    async fn role_assignments(&self) -> Result<Vec<RoleAssignment>> {
        self.read(|c| {
            let mut stmt = c.prepare("SELECT id, principal_id, role_id, scope FROM role_assignments")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })?;
            let mut assignments = Vec::new();
            for row in rows {
                let (id, principal_id, role_id, scope) = row?;
                match Scope::parse(&scope) {
                    Ok(scope) => assignments.push(RoleAssignment { id, principal_id, role_id, scope }),
                    // Scopes were once parsed loosely: one naming a vault or secret that cannot
                    // exist (`/vaults/*`) never covered anything, so leaving it out grants and
                    // removes nothing (deny by default), and start-up does not fail on it.
                    Err(e) => tracing::warn!(assignment = %id, "role assignment ignored: {e}"),
                }
            }
            Ok(assignments)
        })
        .await
    }

    async fn add_role_assignment(&self, a: &RoleAssignment) -> Result<()> {
        let a = a.clone();
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO role_assignments (id, principal_id, role_id, scope) VALUES (?1, ?2, ?3, ?4)",
                params![a.id, a.principal_id, a.role_id, a.scope.to_string()],
            )
            .map_err(|e| if unique_violation(&e) { StoreError::NameExists } else { e.into() })?;
            Ok(())
        })
        .await
    }

    async fn delete_role_assignment(&self, id: &str) -> Result<bool> {
        self.delete_by_id("role_assignments", id).await
    }

    async fn bindings(&self) -> Result<Vec<Binding>> {
        self.read(|c| {
            let mut stmt =
                c.prepare("SELECT id, identity_id, agent_id, uid, exe, unit, cgroup_prefix, allow_namespaced FROM bindings",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(Binding {
                    id: r.get(0)?,
                    identity_id: r.get(1)?,
                    agent_id: r.get(2)?,
                    uid: r.get(3)?,
                    exe: r.get(4)?,
                    unit: r.get(5)?,
                    cgroup_prefix: r.get(6)?,
                    allow_namespaced: r.get(7)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn add_binding(&self, b: &Binding) -> Result<()> {
        let b = b.clone();
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO bindings (id, identity_id, agent_id, uid, exe, unit, cgroup_prefix, allow_namespaced) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![b.id, b.identity_id, b.agent_id, b.uid, b.exe, b.unit, b.cgroup_prefix, b.allow_namespaced],
            )?;
            Ok(())
        })
        .await
    }

    async fn delete_binding(&self, id: &str) -> Result<bool> {
        self.delete_by_id("bindings", id).await
    }

    async fn federated_credentials(&self) -> Result<Vec<FederatedCredential>> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT id, principal_id, issuer, subject, audience, jwks_url, jwks FROM federated_credentials",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(FederatedCredential {
                    id: r.get(0)?,
                    principal_id: r.get(1)?,
                    issuer: r.get(2)?,
                    subject: r.get(3)?,
                    audience: r.get(4)?,
                    jwks_url: r.get(5)?,
                    jwks: r.get(6)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn add_federated_credential(&self, f: &FederatedCredential) -> Result<()> {
        let f = f.clone();
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO federated_credentials (id, principal_id, issuer, subject, audience, jwks_url, jwks)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![f.id, f.principal_id, f.issuer, f.subject, f.audience, f.jwks_url, f.jwks],
            )
            .map_err(|e| if unique_violation(&e) { StoreError::NameExists } else { e.into() })?;
            Ok(())
        })
        .await
    }

    async fn delete_federated_credential(&self, id: &str) -> Result<bool> {
        self.delete_by_id("federated_credentials", id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coffer_core::authz::KEY_VAULT_SECRETS_USER;

    fn principal(id: &str, name: &str, kind: PrincipalKind) -> Principal {
        Principal {
            object_id: id.into(),
            client_id: format!("c-{id}"),
            display_name: name.into(),
            kind,
            enabled: true,
        }
    }

    /// Scopes stored before they were parsed strictly, naming no vault or secret that can exist,
    /// are left out (they never covered anything) instead of failing the whole load.
    #[tokio::test]
    async fn loosely_parsed_stored_scopes_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = SqliteStore::open(&path).unwrap();
        store.put_principal(&principal("p1", "app", PrincipalKind::ManagedIdentity)).await.unwrap();
        let valid = RoleAssignment {
            id: "ra1".into(),
            principal_id: "p1".into(),
            role_id: KEY_VAULT_SECRETS_USER.into(),
            scope: Scope::parse("/vaults/dev/secrets/db").unwrap(),
        };
        store.add_role_assignment(&valid).await.unwrap();
        drop(store);
        let old = rusqlite::Connection::open(&path).unwrap();
        for (id, scope) in [("ra2", "/vaults/*"), ("ra3", "/vaults/dev%2f..%2fprod")] {
            old.execute(
                "INSERT INTO role_assignments (id, principal_id, role_id, scope) VALUES (?1, 'p1', ?2, ?3)",
                params![id, KEY_VAULT_SECRETS_USER, scope],
            )
            .unwrap();
        }
        drop(old);
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.role_assignments().await.unwrap(), vec![valid]);
    }

    #[tokio::test]
    async fn directory_round_trip_and_cascading_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        store.put_principal(&principal("p1", "app", PrincipalKind::ManagedIdentity)).await.unwrap();
        store.put_principal(&principal("g1", "ops", PrincipalKind::Group)).await.unwrap();
        store.put_principal(&principal("a1", "host", PrincipalKind::Agent)).await.unwrap();
        assert!(matches!(
            store.put_principal(&principal("p2", "app", PrincipalKind::User)).await,
            Err(StoreError::NameExists)
        ));
        store.add_member("g1", "p1").await.unwrap();
        let assignment = RoleAssignment {
            id: "ra1".into(),
            principal_id: "p1".into(),
            role_id: KEY_VAULT_SECRETS_USER.into(),
            scope: Scope::parse("/vaults/dev").unwrap(),
        };
        store.add_role_assignment(&assignment).await.unwrap();
        assert!(matches!(
            store.add_role_assignment(&RoleAssignment { id: "ra2".into(), ..assignment.clone() }).await,
            Err(StoreError::NameExists)
        ));
        store
            .add_binding(&Binding {
                id: "b1".into(),
                identity_id: "p1".into(),
                agent_id: "a1".into(),
                uid: Some(1000),
                exe: None,
                unit: None,
                cgroup_prefix: None,
                allow_namespaced: true,
            })
            .await
            .unwrap();
        assert!(store.bindings().await.unwrap()[0].allow_namespaced, "the flag is stored");
        let cred = CredentialRecord {
            id: "c1".into(),
            principal_id: "p1".into(),
            kind: CredentialKind::JoinToken,
            material: "$argon2id$...".into(),
            created: 1,
            expires: Some(2),
        };
        store.add_credential(&cred).await.unwrap();
        assert_eq!(store.credentials("p1", CredentialKind::JoinToken).await.unwrap(), vec![cred]);
        assert!(store.take_credential("c1").await.unwrap());
        assert!(!store.take_credential("c1").await.unwrap(), "a one-time credential is taken once");
        assert_eq!(store.role_assignments().await.unwrap(), vec![assignment]);
        store.delete_principal("p1").await.unwrap();
        assert!(store.role_assignments().await.unwrap().is_empty());
        assert!(store.bindings().await.unwrap().is_empty());
        assert!(store.memberships().await.unwrap().is_empty());
        assert_eq!(store.principals().await.unwrap().len(), 2);
    }

    /// A binding stored before v4 does not admit namespaced processes.
    #[tokio::test]
    async fn bindings_from_before_v4_do_not_allow_namespaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch(&format!(
                "{} {SCHEMA_V2} {} PRAGMA user_version = 3;",
                super::super::SCHEMA_V1,
                super::super::events::SCHEMA_V3
            ))
            .unwrap();
            conn.execute_batch(
                "INSERT INTO principals (object_id, display_name, kind, enabled, administrator, client_id) \
                 VALUES ('p1', 'app', 'managed-identity', 1, 0, 'c1'), ('a1', 'host', 'agent', 1, 0, 'c2');
                 INSERT INTO bindings (id, identity_id, agent_id, uid) VALUES ('b1', 'p1', 'a1', 1000);",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let bindings = store.bindings().await.unwrap();
        assert_eq!(bindings.len(), 1);
        assert!(!bindings[0].allow_namespaced);
    }
}
