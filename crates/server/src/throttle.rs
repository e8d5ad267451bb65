//! Abuse limits: delays after repeated failed sign-ins per sign-in name ([`SignInDelays`]),
//! and an allowance of failing requests per client address ([`FailureThrottle`]).
//!
//! Sign-in delays.
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
use std::net::IpAddr;
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

/// Requests refused while a client's allowance was exhausted, recorded in the audit log as one
/// record per burst rather than one per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedBurst {
    pub count: u64,
    pub first: std::time::SystemTime,
    pub last: std::time::SystemTime,
    last_at: Instant,
    first_at: Instant,
}

struct Allowance {
    tokens: f64,
    refilled: Instant,
    refused: Option<RefusedBurst>,
}

/// A token bucket per client address for requests that fail authentication (401s, refused
/// sign-ins, unknown hosts): `rate` a second, `burst` at once. Why: each such request is
/// audited durably (≈ 1.9 KB), and 8 unauthenticated clients wrote 109 MB of audit in 8 s
/// (issue 16). Once a client's allowance is spent, its failing requests get 429 and are
/// counted into a [`RefusedBurst`] instead of a record each, and its token-service requests
/// are refused before any work (no body read, no Argon2). Requests that authenticate are never
/// charged. IPv6 clients are grouped by /64, the block one host usually holds.
pub struct FailureThrottle {
    rate: f64,
    burst: f64,
    clients: Mutex<HashMap<IpAddr, Allowance>>,
    /// Every refusal since start, for the metrics.
    refused_total: std::sync::atomic::AtomicU64,
}

/// Client addresses tracked at most; past that, clients with a full bucket and no open burst
/// are forgotten first.
const MAX_CLIENTS: usize = 65_536;

impl FailureThrottle {
    pub fn new(rate_per_sec: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate_per_sec.max(1)),
            burst: f64::from(burst.max(1)),
            clients: Mutex::default(),
            refused_total: Default::default(),
        }
    }

    /// Requests refused (429) since start.
    pub fn refused_total(&self) -> u64 {
        self.refused_total.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn counted(&self, result: Result<(), Duration>) -> Result<(), Duration> {
        if result.is_err() {
            self.refused_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        result
    }

    /// Spends one failure of `ip`'s allowance; when none is left, counts a refusal and returns
    /// how long until one is.
    pub fn charge(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        self.counted(self.with_client(ip, now, |client, rate| {
            if client.tokens >= 1.0 {
                client.tokens -= 1.0;
                Ok(())
            } else {
                Err(refuse(client, rate, now))
            }
        }))
    }

    /// Like [`FailureThrottle::charge`] without spending: for requests refused up front.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        self.counted(self.with_client(ip, now, |client, rate| {
            if client.tokens >= 1.0 {
                Ok(())
            } else {
                Err(refuse(client, rate, now))
            }
        }))
    }

    /// The bursts that are over (no refusal for `quiet`) or have lasted `max_age` (recorded in
    /// parts, so a flood that never stops still reaches the audit log).
    pub fn take_bursts(
        &self,
        now: Instant,
        quiet: Duration,
        max_age: Duration,
    ) -> Vec<(IpAddr, RefusedBurst)> {
        let Ok(mut clients) = self.clients.lock() else { return Vec::new() };
        let mut out = Vec::new();
        for (ip, client) in clients.iter_mut() {
            let due = client.refused.as_ref().is_some_and(|b| {
                now.duration_since(b.last_at) >= quiet || now.duration_since(b.first_at) >= max_age
            });
            if due {
                if let Some(burst) = client.refused.take() {
                    out.push((*ip, burst));
                }
            }
        }
        out
    }

    fn with_client<T>(&self, ip: IpAddr, now: Instant, f: impl FnOnce(&mut Allowance, f64) -> T) -> T {
        let key = client_key(ip);
        let mut clients = match self.clients.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if clients.len() >= MAX_CLIENTS && !clients.contains_key(&key) {
            let (rate, burst) = (self.rate, self.burst);
            clients.retain(|_, c| c.refused.is_some() || refill(c.tokens, c.refilled, now, rate) < burst);
        }
        let client =
            clients.entry(key).or_insert(Allowance { tokens: self.burst, refilled: now, refused: None });
        client.tokens = refill(client.tokens, client.refilled, now, self.rate).min(self.burst);
        client.refilled = now;
        f(client, self.rate)
    }
}

/// A token bucket's content at `now`: `tokens` at `since`, plus `rate` a second (uncapped; the
/// callers cap it at their burst, or compare with it to find full buckets).
fn refill(tokens: f64, since: Instant, now: Instant, rate: f64) -> f64 {
    tokens + now.duration_since(since).as_secs_f64() * rate
}

fn refuse(client: &mut Allowance, rate: f64, now: Instant) -> Duration {
    let wall = std::time::SystemTime::now();
    let burst = client.refused.get_or_insert(RefusedBurst {
        count: 0,
        first: wall,
        last: wall,
        last_at: now,
        first_at: now,
    });
    burst.count += 1;
    burst.last = wall;
    burst.last_at = now;
    Duration::from_secs_f64((1.0 - client.tokens) / rate)
}

/// IPv4 addresses as they are; IPv6 by /64 (IPv4-mapped ones as IPv4).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod failure_tests {
    use super::*;

    #[test]
    fn a_client_gets_its_burst_then_its_rate_and_refusals_are_counted() {
        let throttle = FailureThrottle::new(10, 3);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(throttle.charge(a, t0), Ok(()));
        }
        let wait = throttle.charge(a, t0).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        assert!(throttle.check(a, t0).is_err(), "refused up front too");
        assert_eq!(throttle.charge(b, t0), Ok(()), "other clients keep their own allowance");
        // A tenth of a second later one more failure is allowed.
        assert_eq!(throttle.charge(a, t0 + Duration::from_millis(100)), Ok(()));
        assert!(
            throttle.take_bursts(t0, Duration::from_secs(2), Duration::from_secs(10)).is_empty(),
            "still open"
        );
        let later = t0 + Duration::from_secs(3);
        let bursts = throttle.take_bursts(later, Duration::from_secs(2), Duration::from_secs(10));
        assert_eq!(bursts.len(), 1);
        assert_eq!((bursts[0].0, bursts[0].1.count), (a, 2));
        assert!(throttle.take_bursts(later, Duration::from_secs(2), Duration::from_secs(10)).is_empty());
        // The metrics' counter keeps every refusal, recorded or not.
        assert_eq!(throttle.refused_total(), 2);
    }

    #[test]
    fn a_burst_that_never_ends_is_recorded_in_parts() {
        let throttle = FailureThrottle::new(1, 1);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let t0 = Instant::now();
        let _ = throttle.charge(ip, t0);
        let mut recorded = 0;
        for ms in (0..12_000).step_by(100) {
            let now = t0 + Duration::from_millis(ms);
            let _ = throttle.charge(ip, now);
            recorded += throttle
                .take_bursts(now, Duration::from_secs(2), Duration::from_secs(10))
                .iter()
                .map(|(_, b)| b.count)
                .sum::<u64>();
        }
        assert!(recorded > 0, "a part was recorded while the flood went on");
    }

    #[test]
    fn ipv6_clients_are_grouped_by_slash_64() {
        let throttle = FailureThrottle::new(1, 1);
        let t0 = Instant::now();
        assert_eq!(throttle.charge("2001:db8::1".parse().unwrap(), t0), Ok(()));
        assert!(throttle.charge("2001:db8::2".parse().unwrap(), t0).is_err(), "same /64");
        assert_eq!(throttle.charge("2001:db8:0:1::1".parse().unwrap(), t0), Ok(()), "another /64");
    }
}

/// A token bucket per authenticated principal: `rate` requests a second, `burst` at once, like
/// Key Vault's per-vault service limits but per caller, so one runaway workload cannot starve
/// the others. Past it: Key Vault's 429 `Throttled` with `Retry-After` (the SDKs' retry
/// policies wait that long). A rate of 0 means no limit.
pub struct PrincipalThrottle {
    rate: f64,
    burst: f64,
    principals: Mutex<HashMap<String, (f64, Instant)>>,
}

impl PrincipalThrottle {
    pub fn new(rate_per_sec: u32, burst: u32) -> Self {
        Self { rate: f64::from(rate_per_sec), burst: f64::from(burst.max(1)), principals: Mutex::default() }
    }

    /// Spends one request of `principal`'s allowance, or says how long until one is left.
    pub fn take(&self, principal: &str, now: Instant) -> Result<(), Duration> {
        if self.rate == 0.0 {
            return Ok(());
        }
        let mut principals = match self.principals.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        let (tokens, refilled) = match principals.get_mut(principal) {
            Some(bucket) => bucket,
            None => {
                // Principals are the directory's, so the table is bounded by it; forget full
                // buckets now and then all the same.
                if principals.len() >= MAX_CLIENTS {
                    let (rate, burst) = (self.rate, self.burst);
                    principals.retain(|_, (t, at)| refill(*t, *at, now, rate) < burst);
                }
                principals.entry(principal.to_owned()).or_insert((self.burst, now))
            }
        };
        *tokens = refill(*tokens, *refilled, now, self.rate).min(self.burst);
        *refilled = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod principal_tests {
    use super::*;

    #[test]
    fn each_principal_has_its_own_allowance_and_zero_means_unlimited() {
        let throttle = PrincipalThrottle::new(100, 2);
        let t0 = Instant::now();
        assert_eq!(throttle.take("a", t0), Ok(()));
        assert_eq!(throttle.take("a", t0), Ok(()));
        let wait = throttle.take("a", t0).unwrap_err();
        assert!(wait <= Duration::from_millis(10), "{wait:?}");
        assert_eq!(throttle.take("b", t0), Ok(()), "another principal");
        assert_eq!(throttle.take("a", t0 + Duration::from_millis(10)), Ok(()), "refilled");
        let unlimited = PrincipalThrottle::new(0, 1);
        for _ in 0..1000 {
            assert_eq!(unlimited.take("a", t0), Ok(()));
        }
    }
}
