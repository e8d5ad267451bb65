//! Single use of client assertions: the `jti` of every accepted certificate assertion is
//! remembered until the assertion expires, so a captured assertion cannot be presented again.

use std::collections::HashMap;
use std::sync::Mutex;

/// At most this many assertions are remembered. Assertions live at most ~11 minutes, so this
/// allows a sustained ~100 certificate sign-ins a second; beyond it sign-ins are refused (a
/// forgotten `jti` could be replayed, a refused sign-in is retried by the client).
pub const MAX_REMEMBERED: usize = 65_536;

/// Longest `jti` kept (bounds the memory of the cache; MSAL sends a 36-character UUID).
pub const MAX_JTI_LEN: usize = 256;

#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// This client presented the same `jti` before, and it has not expired.
    Replayed,
    /// The cache is full of unexpired assertions.
    Full,
}

/// `(client id, jti)` → the assertion's `exp` (Unix seconds).
pub struct AssertionIds {
    seen: Mutex<HashMap<(String, String), u64>>,
    max: usize,
}

impl Default for AssertionIds {
    fn default() -> Self {
        Self::with_capacity(MAX_REMEMBERED)
    }
}

impl AssertionIds {
    pub fn with_capacity(max: usize) -> Self {
        Self { seen: Mutex::new(HashMap::new()), max }
    }

    /// Records the first use of `jti` by `client_id`; refuses a second use before `expires`
    /// (plus the verification leeway, passed in by the caller) has passed.
    pub fn first_use(&self, client_id: &str, jti: &str, expires: u64, now: u64) -> Result<(), Refusal> {
        // A poisoned lock only means another request panicked mid-insert; the map is still whole.
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let key = (client_id.to_owned(), jti.to_owned());
        if seen.get(&key).is_some_and(|&exp| exp >= now) {
            return Err(Refusal::Replayed);
        }
        if seen.len() >= self.max {
            seen.retain(|_, exp| *exp >= now);
            if seen.len() >= self.max {
                return Err(Refusal::Full);
            }
        }
        seen.insert(key, expires);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jti_is_accepted_once_until_it_expires() {
        let ids = AssertionIds::default();
        assert_eq!(ids.first_use("c", "j", 200, 100), Ok(()));
        assert_eq!(ids.first_use("c", "j", 200, 150), Err(Refusal::Replayed));
        assert_eq!(ids.first_use("other", "j", 200, 150), Ok(()), "ids are per client");
        assert_eq!(ids.first_use("c", "j", 400, 201), Ok(()), "an expired entry no longer blocks");
    }

    #[test]
    fn a_full_cache_refuses_rather_than_forgets() {
        let ids = AssertionIds::with_capacity(2);
        ids.first_use("c", "1", 200, 100).unwrap();
        ids.first_use("c", "2", 300, 100).unwrap();
        assert_eq!(ids.first_use("c", "3", 300, 150), Err(Refusal::Full));
        assert_eq!(ids.first_use("c", "1", 300, 150), Err(Refusal::Replayed), "nothing was forgotten");
        // Once one has expired, its place is free again.
        assert_eq!(ids.first_use("c", "3", 300, 250), Ok(()));
        assert_eq!(ids.first_use("c", "2", 300, 250), Err(Refusal::Replayed));
    }
}
