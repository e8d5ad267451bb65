//! Delays after repeated failed sign-ins, per sign-in name.
//!
//! Why delays and not a lockout: a hard lock after N failures lets anyone who knows a user's
//! name lock that user out for good. Here the first [`FREE_FAILURES`] failures cost nothing;
//! each further one doubles a delay (from one second, at most [`MAX_DELAY`]) during which every
//! attempt for that name — the right password included — is refused with 429 and
//! `Retry-After`, without running Argon2. A success clears the name; a name left alone for
//! [`MAX_DELAY`] after its last failure starts again from zero. Guessing is slowed from ~40
//! tries a second (two cores) to a few per [`MAX_DELAY`]; the owner waits at most that long.
//!
//! Names are tracked whether or not they exist, so the answers do not tell which exist.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures allowed before the first delay (typing mistakes, a stale password in a script).
pub const FREE_FAILURES: u32 = 5;
/// The longest delay, and how long a name is remembered after its last failure.
pub const MAX_DELAY: Duration = Duration::from_secs(300);
/// Names tracked at most; past that the least-failed names are forgotten first.
const MAX_NAMES: usize = 65_536;

struct Failures {
    count: u32,
    last: Instant,
    blocked_until: Instant,
}

#[derive(Default)]
pub struct SignInDelays {
    names: Mutex<HashMap<String, Failures>>,
}

impl SignInDelays {
    /// `Err(retry_after)` while `name` is delayed.
    pub fn check(&self, name: &str, now: Instant) -> Result<(), Duration> {
        let Ok(names) = self.names.lock() else { return Ok(()) };
        match names.get(&key(name)) {
            Some(f) if f.blocked_until > now => Err(f.blocked_until - now),
            _ => Ok(()),
        }
    }

    /// Records a failure; returns the delay it starts, if any.
    pub fn failed(&self, name: &str, now: Instant) -> Option<Duration> {
        let mut names = self.names.lock().ok()?;
        if names.len() >= MAX_NAMES && !names.contains_key(&key(name)) {
            names.retain(|_, f| now.duration_since(f.last) < MAX_DELAY);
            if names.len() >= MAX_NAMES {
                let fewest = names.values().map(|f| f.count).min().unwrap_or(0);
                names.retain(|_, f| f.count > fewest);
            }
        }
        let entry = names.entry(key(name)).or_insert(Failures { count: 0, last: now, blocked_until: now });
        if now.duration_since(entry.last) >= MAX_DELAY {
            entry.count = 0;
        }
        entry.count = entry.count.saturating_add(1);
        entry.last = now;
        let over = entry.count.checked_sub(FREE_FAILURES).filter(|n| *n > 0)?;
        let delay = Duration::from_secs(1u64 << (over - 1).min(16)).min(MAX_DELAY);
        entry.blocked_until = now + delay;
        Some(delay)
    }

    /// A successful sign-in clears the name's failures.
    pub fn succeeded(&self, name: &str) {
        if let Ok(mut names) = self.names.lock() {
            names.remove(&key(name));
        }
    }
}

/// Names compare as the directory resolves them: case-insensitively.
fn key(name: &str) -> String {
    name.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_start_after_the_free_failures_and_double() {
        let delays = SignInDelays::default();
        let t0 = Instant::now();
        for _ in 0..FREE_FAILURES {
            assert_eq!(delays.failed("Alice", t0), None);
            assert_eq!(delays.check("alice", t0), Ok(()));
        }
        assert_eq!(delays.failed("alice", t0), Some(Duration::from_secs(1)));
        assert_eq!(delays.check("ALICE", t0), Err(Duration::from_secs(1)));
        assert_eq!(delays.check("bob", t0), Ok(()), "other names are not affected");
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(delays.check("alice", t1), Ok(()), "the delay passes");
        assert_eq!(delays.failed("alice", t1), Some(Duration::from_secs(2)));
        let mut t = t1;
        for _ in 0..30 {
            t += Duration::from_secs(1);
            assert!(delays.failed("alice", t).unwrap() <= MAX_DELAY, "capped");
        }
        assert_eq!(delays.check("alice", t), Err(MAX_DELAY));
        assert_eq!(delays.check("alice", t + MAX_DELAY), Ok(()), "never locked for longer");
        delays.succeeded("alice");
        assert_eq!(delays.failed("alice", t), None, "a success starts again from zero");
    }

    #[test]
    fn failures_are_forgotten_after_a_quiet_period() {
        let delays = SignInDelays::default();
        let t0 = Instant::now();
        for _ in 0..FREE_FAILURES {
            delays.failed("carol", t0);
        }
        assert_eq!(delays.failed("carol", t0 + MAX_DELAY), None, "counting restarted");
    }

    #[test]
    fn the_table_stays_bounded() {
        let delays = SignInDelays::default();
        let t0 = Instant::now();
        for i in 0..MAX_NAMES + 10 {
            delays.failed(&format!("user{i}"), t0);
        }
        assert!(delays.names.lock().unwrap().len() <= MAX_NAMES);
    }
}
