//! A small cache of secret versions as last read (value still sealed), in front of the reader
//! connections, for the hot path: the same few secrets fetched again and again.
//!
//! Why: a secret GET's one SQL statement (two B-tree searches, the row's columns) was ≈ 20 % of
//! the request path's instructions. Vault keeps a read cache in front of its storage for the same
//! reason.
//!
//! How it stays correct: every write of this process goes through the writer thread, which
//! counts the commits that change a row (`Readers::writes`) before answering anyone. The cache
//! holds only versions returned by reads that began under the current count (read *before* the
//! read): any change at all (a new version, an update, a delete, a purge, a restore) makes every
//! entry stale, so a read never returns less than what was acknowledged before it began. Entries
//! hold what the database holds (the DEK wrapped, the value encrypted), nothing more.
//!
//! Bounded: at most [`MAX_ENTRIES`] and [`MAX_BYTES`]; when full it takes nothing more until the
//! next change empties it. A hot set fits; a store read uniformly across millions of names costs
//! one lookup per read and no churn.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::StoredVersion;

/// Versions kept at most …
pub(super) const MAX_ENTRIES: usize = 4096;
/// … and bytes (values can reach 25 KB: 4,096 of those would be 100 MB).
pub(super) const MAX_BYTES: usize = 8 << 20;

#[derive(Default)]
pub(super) struct VersionCache {
    inner: Mutex<Entries>,
    #[cfg(test)]
    pub(super) hits: std::sync::atomic::AtomicU64,
}

/// Versions read under the commit count `writes`.
#[derive(Default)]
struct Entries {
    writes: u64,
    map: HashMap<String, StoredVersion>,
    /// What the entries hold, roughly (see [`footprint`]).
    bytes: usize,
}

/// Heap bytes an entry holds, roughly: its strings and blobs plus a fixed overhead.
fn footprint(key: &str, v: &StoredVersion) -> usize {
    let p = &v.props;
    let tags: usize = p.tags.iter().map(|(k, v)| k.len() + v.len() + 48).sum();
    256 + key.len()
        + v.name.len()
        + p.version.len()
        + p.content_type.as_ref().map_or(0, String::len)
        + tags
        + v.sealed.wrapped_dek.len()
        + v.sealed.ciphertext.len()
}

/// The key of a version: vault, name key, and the version (empty: the latest).
pub(super) fn key(vault_id: &str, name_key: &str, version: Option<&str>) -> String {
    // Vault ids, name keys and versions never contain a NUL: the key is unambiguous.
    [vault_id, name_key, version.unwrap_or_default()].join("\0")
}

impl VersionCache {
    /// The version cached under `key`, if the commit count is still `writes`.
    pub(super) fn get(&self, key: &str, writes: u64) -> Option<StoredVersion> {
        let inner = self.inner.lock().ok()?;
        let hit = (inner.writes == writes).then(|| inner.map.get(key).cloned()).flatten();
        #[cfg(test)]
        if hit.is_some() {
            self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        hit
    }

    /// Remembers `version`, read by a read that began when the commit count was `writes`.
    pub(super) fn put(&self, key: String, writes: u64, version: &StoredVersion) {
        let Ok(mut inner) = self.inner.lock() else { return };
        if writes > inner.writes {
            // The first read since a change: everything cached before it is stale.
            inner.map.clear();
            inner.bytes = 0;
            inner.writes = writes;
        } else if writes < inner.writes {
            // A change landed during this read: its result may already be stale.
            return;
        }
        let size = footprint(&key, version);
        let full = inner.map.len() >= MAX_ENTRIES || inner.bytes + size > MAX_BYTES;
        if full || inner.map.contains_key(&key) {
            // Full, or cached already by another read under the same count (either is current).
            return;
        }
        inner.bytes += size;
        inner.map.insert(key, version.clone());
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.inner.lock().map(|e| e.map.len()).unwrap_or(0)
    }
}
