use super::*;
use coffer_core::model::Tags;

fn props(version: &str, created: i64) -> VersionProperties {
    VersionProperties {
        version: version.into(),
        attributes: VersionAttributes {
            enabled: true,
            not_before: None,
            expires: None,
            created,
            updated: created,
        },
        content_type: None,
        tags: Tags::new(),
    }
}

pub(super) fn sealed(marker: u8) -> SealedValue {
    SealedValue { wrapped_dek: vec![marker; 8], ciphertext: vec![marker; 16] }
}

pub(super) async fn store_with_vault() -> (tempfile::TempDir, SqliteStore, String) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("coffer.db")).unwrap();
    let vault = VaultRecord {
        id: "vault-1".into(),
        name: VaultName::parse("dev").unwrap(),
        policy: RetentionPolicy::new(7, false).unwrap(),
        created: 1,
    };
    store.create_vault(&vault, ("vault-kek:vault-1".into(), vec![1, 2, 3])).await.unwrap();
    (dir, store, vault.id)
}

/// Committed pages reach the database file without a commit doing it: the checkpoint thread
/// copies them while the writer's automatic checkpoint is only a distant backstop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_thread_moves_committed_pages_into_the_database_file() {
    let (dir, store, vault) = store_with_vault().await;
    let db = dir.path().join("coffer.db");
    let before = std::fs::metadata(&db).unwrap().len();
    let name = SecretName::parse("big").unwrap();
    // ~2 MiB of new pages: far below the 20,000-page backstop, far above one page.
    for i in 0..256 {
        let value = SealedValue { wrapped_dek: vec![1; 8], ciphertext: vec![(i % 251) as u8; 8192] };
        store.add_version(&vault, &name, &props(&format!("v{i}"), i), &value).await.unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let after = std::fs::metadata(&db).unwrap().len();
        if after >= before + 2 * 1024 * 1024 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not checkpointed: {before} -> {after} bytes");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn versions_latest_and_listing() {
    let (_d, store, vault) = store_with_vault().await;
    let name = SecretName::parse("Db-Password").unwrap();
    store.add_version(&vault, &name, &props("a", 1), &sealed(1)).await.unwrap();
    store.add_version(&vault, &name, &props("b", 2), &sealed(2)).await.unwrap();
    let latest = store.version(&vault, "db-password", None).await.unwrap().unwrap();
    assert_eq!(latest.props.version, "b");
    assert_eq!(latest.name, "Db-Password");
    assert_eq!(latest.sealed, sealed(2));
    let first = store.version(&vault, "db-password", Some("a")).await.unwrap().unwrap();
    assert_eq!(first.sealed, sealed(1));
    assert!(store.version(&vault, "db-password", Some("zz")).await.unwrap().is_none());
    let page = store.list_versions(&vault, "db-password", None, 1).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].2.version, "a");
    assert_eq!(page[0].1, "Db-Password");
    let rest = store.list_versions(&vault, "db-password", Some(page[0].0), 10).await.unwrap();
    assert_eq!(rest.iter().map(|(_, _, p)| p.version.as_str()).collect::<Vec<_>>(), ["b"]);
    assert!(matches!(store.list_versions(&vault, "nope", None, 10).await, Err(StoreError::NotFound)));
}

#[tokio::test]
async fn listing_pages_by_name() {
    let (_d, store, vault) = store_with_vault().await;
    for i in 0..5 {
        let name = SecretName::parse(&format!("s{i}")).unwrap();
        store.add_version(&vault, &name, &props(&format!("v{i}"), i), &sealed(i as u8)).await.unwrap();
    }
    let first = store.list_secrets(&vault, None, 2).await.unwrap();
    assert_eq!(first.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["s0", "s1"]);
    let next = store.list_secrets(&vault, Some("s1"), 10).await.unwrap();
    assert_eq!(next.len(), 3);
}

#[tokio::test]
async fn soft_delete_lifecycle() {
    let (_d, store, vault) = store_with_vault().await;
    let name = SecretName::parse("api").unwrap();
    store.add_version(&vault, &name, &props("a", 1), &sealed(1)).await.unwrap();
    let deletion = Deletion { deleted_at: 10, scheduled_purge: 20 };
    let deleted = store.delete_secret(&vault, "api", deletion).await.unwrap();
    assert_eq!(deleted.deletion, deletion);
    assert!(store.version(&vault, "api", None).await.unwrap().is_none());
    assert!(matches!(
        store.add_version(&vault, &name, &props("b", 2), &sealed(2)).await,
        Err(StoreError::NameDeleted)
    ));
    assert!(matches!(
        store.restore(&vault, &name, vec![(props("c", 3), sealed(3))]).await,
        Err(StoreError::NameDeleted)
    ));
    assert_eq!(store.list_deleted(&vault, None, 10).await.unwrap().len(), 1);
    let back = store.recover(&vault, "api").await.unwrap();
    assert_eq!(back.props.version, "a");
    assert!(matches!(store.recover(&vault, "api").await, Err(StoreError::NotFound)));
    assert!(
        matches!(store.purge(&vault, "api").await, Err(StoreError::NotFound)),
        "purge needs a deleted secret"
    );
    store.delete_secret(&vault, "api", deletion).await.unwrap();
    assert_eq!(store.purge_due(19).await.unwrap(), 0);
    assert_eq!(store.purge_due(20).await.unwrap(), 1);
    assert!(store.deleted_secret(&vault, "api").await.unwrap().is_none());
    store.add_version(&vault, &name, &props("d", 4), &sealed(4)).await.unwrap();
}

#[tokio::test]
async fn restore_never_overwrites() {
    let (_d, store, vault) = store_with_vault().await;
    let name = SecretName::parse("api").unwrap();
    store.add_version(&vault, &name, &props("a", 1), &sealed(1)).await.unwrap();
    assert!(matches!(
        store.restore(&vault, &name, vec![(props("c", 3), sealed(3))]).await,
        Err(StoreError::NameExists)
    ));
    let versions = store.all_versions(&vault, "api").await.unwrap();
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].sealed, sealed(1));
}

#[tokio::test]
async fn update_is_validated_and_atomic() {
    let (_d, store, vault) = store_with_vault().await;
    let name = SecretName::parse("api").unwrap();
    store.add_version(&vault, &name, &props("a", 1), &sealed(1)).await.unwrap();
    let patch = PropertiesPatch { enabled: Some(false), expires: Some(100), ..Default::default() };
    let out = store.update_version(&vault, "api", None, patch, 50).await.unwrap();
    assert!(!out.props.attributes.enabled);
    assert_eq!(out.props.attributes.updated, 50);
    let bad = PropertiesPatch { not_before: Some(200), enabled: Some(true), ..Default::default() };
    assert!(matches!(store.update_version(&vault, "api", None, bad, 60).await, Err(StoreError::Invalid(_))));
    let now = store.version(&vault, "api", None).await.unwrap().unwrap();
    assert!(!now.props.attributes.enabled, "a rejected patch changes nothing");
}

#[tokio::test]
async fn reopening_keeps_data_and_vault_names_are_unique() {
    let (dir, store, vault) = store_with_vault().await;
    let name = SecretName::parse("api").unwrap();
    store.add_version(&vault, &name, &props("a", 1), &sealed(9)).await.unwrap();
    let dup = VaultRecord {
        id: "vault-2".into(),
        name: VaultName::parse("dev").unwrap(),
        policy: RetentionPolicy::new(90, true).unwrap(),
        created: 2,
    };
    assert!(matches!(
        store.create_vault(&dup, ("vault-kek:vault-2".into(), vec![])).await,
        Err(StoreError::NameExists)
    ));
    drop(store);
    let store = SqliteStore::open(&dir.path().join("coffer.db")).unwrap();
    assert_eq!(store.vaults().await.unwrap().len(), 1);
    assert_eq!(store.version(&vault, "api", None).await.unwrap().unwrap().sealed, sealed(9));
    assert_eq!(store.wrapped_keys().await.unwrap().len(), 1);
}

mod group_commit {
    use std::future::Future;
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::task::JoinHandle;

    use super::*;

    fn batches(store: &SqliteStore) -> usize {
        store.writer.stats.batches.load(SeqCst)
    }

    fn queued(store: &SqliteStore) -> usize {
        store.writer.stats.queued.load(SeqCst)
    }

    async fn wait_queued(store: &SqliteStore, n: usize) {
        while queued(store) < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Occupies the writer thread inside a batch until the returned sender is used or dropped,
    /// so that the writes issued meanwhile queue up and are then committed as one batch.
    async fn hold_writer(store: &Arc<SqliteStore>) -> (std::sync::mpsc::Sender<()>, JoinHandle<Result<()>>) {
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let (entered, inside) = tokio::sync::oneshot::channel();
        let (s, before) = (store.clone(), queued(store));
        let held = tokio::spawn(async move {
            s.write(move |_| {
                let _ = entered.send(());
                let _ = gate.recv();
                Ok(())
            })
            .await
        });
        inside.await.unwrap();
        // The count is bumped after the hand-over, possibly after the writer took the job.
        wait_queued(store, before + 1).await;
        (release, held)
    }

    /// Spawns a write and waits until it is in the writer's queue, so queue order is call order.
    async fn queue<T, Fut>(
        store: &Arc<SqliteStore>,
        write: impl FnOnce(Arc<SqliteStore>) -> Fut,
    ) -> JoinHandle<T>
    where
        T: Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        let before = queued(store);
        let handle = tokio::spawn(write(store.clone()));
        wait_queued(store, before + 1).await;
        handle
    }

    async fn add(
        store: &Arc<SqliteStore>,
        vault: &str,
        name: &str,
        version: &str,
        marker: u8,
    ) -> JoinHandle<Result<()>> {
        let (vault, name, version) = (vault.to_owned(), SecretName::parse(name).unwrap(), version.to_owned());
        queue(store, move |s| async move {
            s.add_version(&vault, &name, &props(&version, 1), &sealed(marker)).await
        })
        .await
    }

    fn versions_of(versions: &[StoredVersion]) -> Vec<(&str, SealedValue)> {
        versions.iter().map(|v| (v.props.version.as_str(), v.sealed.clone())).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writes_all_commit_and_are_readable() {
        let (_d, store, vault) = store_with_vault().await;
        let store = Arc::new(store);
        let before = batches(&store);
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let (store, vault) = (store.clone(), vault.clone());
                tokio::spawn(async move {
                    // Ten names, so that concurrent writes create and extend the same secrets.
                    let name = SecretName::parse(&format!("s{}", i % 10)).unwrap();
                    store.add_version(&vault, &name, &props(&format!("v{i}"), i), &sealed(i as u8)).await
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        for n in 0..10 {
            let all = store.all_versions(&vault, &format!("s{n}")).await.unwrap();
            let mut got: Vec<_> = all.iter().map(|v| (v.props.version.clone(), v.sealed.clone())).collect();
            got.sort_by(|a, b| a.0.cmp(&b.0));
            let mut want: Vec<_> =
                (0..200).filter(|i| i % 10 == n).map(|i| (format!("v{i}"), sealed(i as u8))).collect();
            want.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(got, want);
        }
        let used = batches(&store) - before;
        assert!((1..=200).contains(&used), "{used} batches");
    }

    #[tokio::test]
    async fn a_batch_is_capped_and_whatever_queued_while_the_writer_was_busy() {
        let (_d, store, vault) = store_with_vault().await;
        let store = Arc::new(store);
        let before = batches(&store);
        let (release, held) = hold_writer(&store).await;
        let base = queued(&store);
        let tasks: Vec<_> = (0..300)
            .map(|i| {
                let (store, vault) = (store.clone(), vault.clone());
                tokio::spawn(async move {
                    let name = SecretName::parse(&format!("s{i}")).unwrap();
                    store.add_version(&vault, &name, &props("v", i), &sealed(1)).await
                })
            })
            .collect();
        wait_queued(&store, base + 300).await;
        release.send(()).unwrap();
        held.await.unwrap().unwrap();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        // The held batch, then 256 + 44.
        assert_eq!(batches(&store) - before, 3);
        assert_eq!(store.list_secrets(&vault, None, 1000).await.unwrap().len(), 300);
    }

    #[tokio::test]
    async fn failed_writes_in_a_batch_leave_no_trace_and_the_others_commit() {
        let (_d, store, vault) = store_with_vault().await;
        let store = Arc::new(store);
        let gone = SecretName::parse("gone").unwrap();
        store.add_version(&vault, &gone, &props("g", 1), &sealed(7)).await.unwrap();
        store.delete_secret(&vault, "gone", Deletion { deleted_at: 5, scheduled_purge: 50 }).await.unwrap();
        let taken = SecretName::parse("taken").unwrap();
        store.add_version(&vault, &taken, &props("t", 1), &sealed(8)).await.unwrap();

        let before = batches(&store);
        let (release, held) = hold_writer(&store).await;
        let fresh_a = add(&store, &vault, "fresh-1", "a", 1).await;
        let on_deleted = add(&store, &vault, "gone", "b", 2).await;
        let fresh_2 = add(&store, &vault, "fresh-2", "a", 3).await;
        // Same version id as the first write of this batch: the insert hits UNIQUE after that
        // write created the secret, and rolling back must keep the first write intact.
        let duplicate = add(&store, &vault, "fresh-1", "a", 4).await;
        let fails_late = queue(&store, |s| async move {
            s.write(|tx| {
                tx.execute("INSERT INTO meta (key, value) VALUES ('partial', x'01')", [])?;
                Err::<(), _>(StoreError::Backend("deliberate".into()))
            })
            .await
        })
        .await;
        let panics = queue(&store, |s| async move {
            s.write(|tx| -> Result<()> {
                tx.execute("INSERT INTO meta (key, value) VALUES ('panicked', x'01')", [])?;
                panic!("deliberate panic in a store write");
            })
            .await
        })
        .await;
        let restore_taken = queue(&store, |s| {
            let (vault, taken) = (vault.clone(), taken.clone());
            async move { s.restore(&vault, &taken, vec![(props("r", 2), sealed(9))]).await }
        })
        .await;
        let fresh_b = add(&store, &vault, "fresh-1", "b", 5).await;
        let meta_after = queue(&store, |s| async move { s.put_meta("after", vec![1]).await }).await;
        release.send(()).unwrap();
        held.await.unwrap().unwrap();

        fresh_a.await.unwrap().unwrap();
        assert!(matches!(on_deleted.await.unwrap(), Err(StoreError::NameDeleted)));
        fresh_2.await.unwrap().unwrap();
        assert!(matches!(duplicate.await.unwrap(), Err(StoreError::Backend(_))));
        assert!(matches!(fails_late.await.unwrap(), Err(StoreError::Backend(e)) if e == "deliberate"));
        assert!(matches!(panics.await.unwrap(), Err(StoreError::Backend(_))));
        assert!(matches!(restore_taken.await.unwrap(), Err(StoreError::NameExists)));
        fresh_b.await.unwrap().unwrap();
        meta_after.await.unwrap().unwrap();
        assert_eq!(batches(&store) - before, 2, "the held batch, then all nine writes in one");

        assert_eq!(
            versions_of(&store.all_versions(&vault, "fresh-1").await.unwrap()),
            [("a", sealed(1)), ("b", sealed(5))]
        );
        assert_eq!(versions_of(&store.all_versions(&vault, "fresh-2").await.unwrap()), [("a", sealed(3))]);
        assert_eq!(versions_of(&store.all_versions(&vault, "taken").await.unwrap()), [("t", sealed(8))]);
        let still_gone = store.deleted_secret(&vault, "gone").await.unwrap().unwrap();
        assert_eq!(still_gone.latest.version, "g");
        assert_eq!(store.meta("partial").await.unwrap(), None);
        assert_eq!(store.meta("panicked").await.unwrap(), None);
        assert_eq!(store.meta("after").await.unwrap(), Some(vec![1]));

        // The panic did not wedge the writer.
        store.put_meta("later", vec![2]).await.unwrap();
        assert_eq!(store.meta("later").await.unwrap(), Some(vec![2]));
    }

    async fn put(store: &Arc<SqliteStore>, key: &'static str) -> JoinHandle<Result<()>> {
        queue(store, move |s| async move { s.put_meta(key, vec![1]).await }).await
    }

    #[tokio::test]
    async fn when_a_batch_cannot_commit_no_write_of_it_is_acknowledged() {
        let (_d, store, _vault) = store_with_vault().await;
        let store = Arc::new(store);

        // A deferred foreign-key violation passes every statement and fails the COMMIT.
        let (release, held) = hold_writer(&store).await;
        let first = put(&store, "first").await;
        let poison = queue(&store, |s| async move {
            s.write(|tx| {
                tx.execute_batch("PRAGMA defer_foreign_keys = ON")?;
                tx.execute(
                    "INSERT INTO versions (secret_id, version, enabled, created, updated, tags, wrapped_dek, ciphertext)
                     VALUES (424242, 'orphan', 1, 1, 1, '{}', x'00', x'00')",
                    [],
                )?;
                Ok(())
            })
            .await
        })
        .await;
        let last = put(&store, "last").await;
        release.send(()).unwrap();
        held.await.unwrap().unwrap();
        for write in [first, poison, last] {
            assert!(matches!(write.await.unwrap(), Err(StoreError::Backend(_))));
        }

        // A write that ends the transaction itself (as SQLite does on I/O errors) loses the
        // earlier writes of the batch; the later ones are not run.
        let (release, held) = hold_writer(&store).await;
        let before = put(&store, "before").await;
        let rollback =
            queue(&store, |s| async move { s.write(|tx| Ok(tx.execute_batch("ROLLBACK")?)).await }).await;
        let after = put(&store, "after").await;
        release.send(()).unwrap();
        held.await.unwrap().unwrap();
        for write in [before, rollback, after] {
            assert!(matches!(write.await.unwrap(), Err(StoreError::Backend(_))));
        }

        for key in ["first", "last", "before", "after"] {
            assert_eq!(store.meta(key).await.unwrap(), None, "{key}");
        }
        let orphans: i64 = store
            .read(|c| {
                Ok(c.query_row("SELECT COUNT(*) FROM versions WHERE version = 'orphan'", [], |r| r.get(0))?)
            })
            .await
            .unwrap();
        assert_eq!(orphans, 0);
        // The writer carries on.
        store.put_meta("later", vec![2]).await.unwrap();
        assert_eq!(store.meta("later").await.unwrap(), Some(vec![2]));
    }

    #[tokio::test]
    async fn dropping_the_store_finishes_queued_writes_and_closes_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coffer.db");
        let wal = dir.path().join("coffer.db-wal");
        for round in 0..3u8 {
            let store = SqliteStore::open(&path).unwrap();
            store.put_meta("round", vec![round]).await.unwrap();
            // A write whose caller stops waiting still runs, as it did on the blocking pool.
            let (entered, inside) = tokio::sync::oneshot::channel();
            let abandoned = store.write(move |tx| {
                let _ = entered.send(());
                std::thread::sleep(Duration::from_millis(100));
                tx.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('abandoned', ?1)",
                    [vec![round]],
                )?;
                Ok(())
            });
            tokio::select! {
                _ = abandoned => panic!("the write cannot finish before it has started"),
                _ = inside => {}
            }
            // Inside a (single-threaded) runtime: drop waits for the writer thread to finish the
            // write and close its connection; the last connection to close removes the WAL.
            drop(store);
            assert!(!wal.exists(), "round {round}: a connection is still open");
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.meta("round").await.unwrap(), Some(vec![2]));
        assert_eq!(store.meta("abandoned").await.unwrap(), Some(vec![2]));
    }
}

/// Every connection keeps its own page cache: another connection's page churn (the audit index
/// thread's commits, on another database) must not evict a store reader's pages. The bundled
/// SQLite shares one LRU across connections when built with SQLITE_ENABLE_MEMORY_MANAGEMENT;
/// `.cargo/config.toml` undefines it.
#[test]
fn a_connection_keeps_its_cached_pages_while_another_churns() {
    use rusqlite::ffi;
    let dir = tempfile::tempdir().unwrap();
    let fill = |path: &std::path::Path, rows: u32| {
        let c = Connection::open(path).unwrap();
        c.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
             INSERT INTO t SELECT i, zeroblob(3000) FROM n;"
        ))
        .unwrap();
        c
    };
    let read_all = |c: &Connection| {
        c.query_row("SELECT sum(length(v)) FROM t", [], |r| r.get::<_, i64>(0)).unwrap();
    };
    // Cache misses since the last call (and resets the counter).
    let misses = |c: &Connection| {
        let (mut current, mut high) = (0, 0);
        // SAFETY: a valid open handle, and out-pointers to live locals.
        let rc = unsafe {
            ffi::sqlite3_db_status(c.handle(), ffi::SQLITE_DBSTATUS_CACHE_MISS, &mut current, &mut high, 1)
        };
        assert_eq!(rc, ffi::SQLITE_OK);
        current
    };
    // 200 pages: well within one connection's default cache (2 MiB).
    let reader = Connection::open(dir.path().join("a.db")).unwrap();
    drop(fill(&dir.path().join("a.db"), 200));
    read_all(&reader);
    misses(&reader);
    read_all(&reader);
    assert_eq!(misses(&reader), 0, "a warm read misses nothing");
    // Another connection reads 5,000 pages of another database.
    let other = fill(&dir.path().join("b.db"), 5000);
    read_all(&other);
    read_all(&reader);
    assert_eq!(misses(&reader), 0, "another connection's reads evicted this one's pages");
}

/// Readers keep their read transaction between reads, yet every read sees every write
/// acknowledged before it: each commit makes them take a new snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_reuse_their_snapshot_and_still_see_every_acknowledged_write() {
    let (_dir, store, vault) = store_with_vault().await;
    store.put_meta("counter", b"0".to_vec()).await.unwrap();
    assert_eq!(store.meta("counter").await.unwrap().as_deref(), Some(&b"0"[..]));
    assert!(store.readers.open_transactions() >= 1, "a reader keeps its transaction after a read");
    for i in 1..=200u32 {
        let value = i.to_string().into_bytes();
        store.put_meta("counter", value.clone()).await.unwrap();
        // Every reader in turn (reads rotate over them), each right after the write.
        for _ in 0..READERS {
            assert_eq!(store.meta("counter").await.unwrap(), Some(value.clone()), "after write {i}");
        }
        if i % 50 == 0 {
            let name = SecretName::parse(&format!("s{i}")).unwrap();
            store.add_version(&vault, &name, &props(&format!("v{i}"), 1), &sealed(1)).await.unwrap();
            let got = store.version(&vault, &name.key(), None).await.unwrap().expect("the new secret");
            assert_eq!(got.props.version, format!("v{i}"));
        }
    }
}

/// A held snapshot would pin the WAL: the checkpointer's release ends idle readers'
/// transactions, so a checkpoint then copies every frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_readers_lets_a_checkpoint_copy_the_whole_wal() {
    let (dir, store, vault) = store_with_vault().await;
    let checkpoint = |c: &Connection| -> (i64, i64) {
        c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get(1)?, r.get(2)?))).unwrap()
    };
    let other = Connection::open(dir.path().join("coffer.db")).unwrap();
    // Every reader reads (and keeps) a snapshot, then more is written after it.
    for _ in 0..READERS {
        store.meta("x").await.unwrap();
    }
    for i in 0..50 {
        let name = SecretName::parse(&format!("after-{i}")).unwrap();
        store.add_version(&vault, &name, &props("v1", 1), &sealed(2)).await.unwrap();
    }
    let (log, copied) = checkpoint(&other);
    assert!(copied < log, "the readers' old snapshots hold the checkpoint back ({copied} of {log})");
    store.readers.release();
    assert_eq!(store.readers.open_transactions(), 0);
    let (log, copied) = checkpoint(&other);
    assert_eq!(copied, log, "after release every frame is copied");
}

/// The version cache never answers with less than what was acknowledged before the read: a
/// version read (and cached), then each kind of change, then the same read sees the change.
#[tokio::test]
async fn a_cached_version_never_outlives_a_change() {
    let (_d, store, vault) = store_with_vault().await;
    let name = SecretName::parse("api").unwrap();
    let latest = || async { store.version(&vault, "api", None).await.unwrap() };
    let hits = || store.versions.hits.load(std::sync::atomic::Ordering::Relaxed);

    store.add_version(&vault, &name, &props("a", 1), &sealed(1)).await.unwrap();
    assert_eq!(latest().await.unwrap().props.version, "a");
    assert_eq!(latest().await.unwrap().props.version, "a");
    assert_eq!(hits(), 1, "the second read is served from the cache");
    // A write that changes no row (nothing is due) keeps the cache.
    assert_eq!(store.purge_due(0).await.unwrap(), 0);
    assert_eq!(latest().await.unwrap().props.version, "a");
    assert_eq!(hits(), 2);

    // A new version.
    store.add_version(&vault, &name, &props("b", 2), &sealed(2)).await.unwrap();
    let now = latest().await.unwrap();
    assert_eq!((now.props.version.as_str(), &now.sealed), ("b", &sealed(2)));
    // Read by version too (another cache key), then disabled.
    assert!(store.version(&vault, "api", Some("b")).await.unwrap().unwrap().props.attributes.enabled);
    let patch = PropertiesPatch { enabled: Some(false), ..Default::default() };
    store.update_version(&vault, "api", Some("b"), patch, 3).await.unwrap();
    assert!(!latest().await.unwrap().props.attributes.enabled);
    assert!(!store.version(&vault, "api", Some("b")).await.unwrap().unwrap().props.attributes.enabled);
    // Deleted, recovered, deleted and purged.
    let deletion = Deletion { deleted_at: 10, scheduled_purge: 20 };
    store.delete_secret(&vault, "api", deletion).await.unwrap();
    assert!(latest().await.is_none());
    assert!(store.version(&vault, "api", Some("b")).await.unwrap().is_none());
    store.recover(&vault, "api").await.unwrap();
    assert_eq!(latest().await.unwrap().props.version, "b");
    store.delete_secret(&vault, "api", deletion).await.unwrap();
    store.purge(&vault, "api").await.unwrap();
    assert!(latest().await.is_none());
    // Restored from a backup: the backup's versions.
    store.restore(&vault, &name, vec![(props("r", 30), sealed(30))]).await.unwrap();
    assert_eq!(latest().await.unwrap().sealed, sealed(30));
    // The vault deleted with its secrets.
    store.delete_vault(&vault, "vault-kek:vault-1").await.unwrap();
    assert!(latest().await.is_none());
}

/// Concurrent writers and readers: every read of the latest version that begins after a write
/// was acknowledged returns that write or a later one, never an older cached one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_versions_follow_concurrent_writes() {
    let (_dir, store, vault) = store_with_vault().await;
    let store = std::sync::Arc::new(store);
    let name = SecretName::parse("hot").unwrap();
    store.add_version(&vault, &name, &props("v0000", 0), &sealed(0)).await.unwrap();
    // Background readers keep the cache filled with whatever is current.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (store, vault, stop) = (store.clone(), vault.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    store.version(&vault, "hot", None).await.unwrap();
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    for i in 1..=300u32 {
        let version = format!("v{i:04}");
        store.add_version(&vault, &name, &props(&version, i64::from(i)), &sealed(1)).await.unwrap();
        for _ in 0..3 {
            let got = store.version(&vault, "hot", None).await.unwrap().unwrap().props.version;
            assert!(got >= version, "after write {version} a read returned {got}");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    assert!(store.versions.hits.load(std::sync::atomic::Ordering::Relaxed) > 0, "the cache was used");
}

#[test]
fn the_version_cache_is_bounded() {
    let cache = versions::VersionCache::default();
    let v = StoredVersion { name: "n".into(), props: props("v", 1), sealed: sealed(1) };
    let key = |i: usize| versions::key("vault", &format!("n{i}"), None);
    for i in 0..versions::MAX_ENTRIES + 10 {
        cache.put(key(i), 7, &v);
    }
    // Full: the first ones stay, the later ones were not taken.
    assert_eq!(cache.len(), versions::MAX_ENTRIES);
    assert!(cache.get(&key(0), 7).is_some());
    assert!(cache.get(&key(versions::MAX_ENTRIES), 7).is_none());
    // A read that began before a change the cache has seen is not taken.
    cache.put(key(1), 6, &v);
    assert!(cache.get(&key(0), 8).is_none(), "an entry from before a change is never used");
    // The first read after a change empties it.
    cache.put(key(99_999), 8, &v);
    assert_eq!(cache.len(), 1);
    assert!(cache.get(&key(99_999), 8).is_some());
    // Large values: bounded by bytes long before the entry count.
    let big = StoredVersion {
        sealed: SealedValue { wrapped_dek: vec![1; 60], ciphertext: vec![2; 25 * 1024] },
        ..v.clone()
    };
    for i in 0..versions::MAX_ENTRIES {
        cache.put(key(i), 9, &big);
    }
    let kept = cache.len();
    assert!(kept * 25 * 1024 <= versions::MAX_BYTES, "{kept} values of 25 KiB");
    assert!(kept >= versions::MAX_BYTES / (26 * 1024), "{kept}");
}
