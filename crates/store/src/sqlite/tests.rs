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

fn sealed(marker: u8) -> SealedValue {
    SealedValue { wrapped_dek: vec![marker; 8], ciphertext: vec![marker; 16] }
}

async fn store_with_vault() -> (tempfile::TempDir, SqliteStore, String) {
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
