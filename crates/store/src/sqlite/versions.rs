//! A small cache of secret versions as last read (value still sealed), in front of the reader
//! connections, for the hot path: the same few secrets fetched again and again.
//!
//! Why: a secret GET's one SQL statement (two B-tree searches, the row's columns) was ≈ 15 % of
//! the request's CPU. Vault keeps a read cache in front of its storage for the same reason.
//!
//! How it stays correct: every write of this process goes through the writer thread, which
//! counts its commits ([`Readers::writes`]) before answering anyone. An entry is tagged with the
//! count read *before* the read that filled it, and used only while the count is unchanged: any
//! commit at all (a new version, an update, a delete, a purge, a restore, a key rotation) makes
//! every entry stale, so a read never returns less than what was acknowledged before it began.
//! Entries hold what the database holds (the DEK wrapped, the value encrypted), nothing more.
//!
//! Bounded: at most [`MAX_ENTRIES`]; when full, an insert evicts an arbitrary entry rather than
//! tracking the least recently used, so a store far larger than the hot set costs one insert and
//! one removal per read, no more.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::StoredVersion;

/// About 1-2 MiB when full (a version is a few hundred bytes).
pub(super) const MAX_ENTRIES: usize = 4096;

#[derive(Default)]
pub(super) struct VersionCache {
    entries: Mutex<HashMap<String, (u64, StoredVersion)>>,
    #[cfg(test)]
    pub(super) hits: std::sync::atomic::AtomicU64,
}

/// The key of a version: vault, name key, and the version (empty: the latest).
pub(super) fn key(vault_id: &str, name_key: &str, version: Option<&str>) -> String {
    let version = version.unwrap_or_default();
    let mut key = String::with_capacity(vault_id.len() + name_key.len() + version.len() + 2);
    // Vault ids, name keys and versions never contain a NUL: the key is unambiguous.
    for (i, part) in [vault_id, name_key, version].into_iter().enumerate() {
        if i > 0 {
            key.push('\0');
        }
        key.push_str(part);
    }
    key
}

impl VersionCache {
    /// The version cached under `key`, if it was read while the commit count was `writes`.
    pub(super) fn get(&self, key: &str, writes: u64) -> Option<StoredVersion> {
        let entries = self.entries.lock().ok()?;
        let hit = entries.get(key).filter(|(tag, _)| *tag == writes).map(|(_, v)| v.clone());
        #[cfg(test)]
        if hit.is_some() {
            self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        hit
    }

    /// Remembers `version`, read by a read that began when the commit count was `writes`.
    pub(super) fn put(&self, key: String, writes: u64, version: &StoredVersion) {
        let Ok(mut entries) = self.entries.lock() else { return };
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(&key) {
            // Evict an arbitrary entry (the first in the map's order: where a random hash put
            // it): one removal per insert, never a pause to empty thousands.
            if let Some(victim) = entries.keys().next().cloned() {
                entries.remove(&victim);
            }
        }
        entries.insert(key, (writes, version.clone()));
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }
}
