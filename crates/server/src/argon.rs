//! Argon2id credential hashing and checking within a fixed memory budget.
//!
//! Why: Argon2id's defaults use 19 MiB per computation. Run on the blocking pool (up to 512
//! threads) with no limit, 16 concurrent wrong passwords took the server from 26 MiB to
//! 1.4 GiB of RSS and 64 to 4.5 GiB, never given back (glibc keeps each thread's arena), and
//! that needs no credential at all (issue 16). Here every Argon2 computation holds one of
//! `concurrency` permits and runs in one of as many memory areas allocated once and reused, so
//! the memory Argon2 can ever use is `concurrency × 19 MiB` however many requests arrive.
//! A request that cannot get a permit within `wait` is refused ([`ArgonError::Busy`], a 429
//! at the edge) instead of queueing without bound.
//!
//! Unknown names cost the same work as known ones ([`Argon2Pool::verify_any`] with no
//! candidate runs a computation against a throwaway salt), so response times do not tell
//! which sign-in names exist.

use std::sync::Mutex;
use std::time::Duration;

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use rand::rngs::OsRng;
use thiserror::Error;
use zeroize::{Zeroize, Zeroizing};

#[derive(Debug, Error)]
pub enum ArgonError {
    #[error("too many credential checks are in progress; retry in a moment")]
    Busy,
    #[error("argon2: {0}")]
    Internal(String),
}

pub struct Argon2Pool {
    permits: tokio::sync::Semaphore,
    /// One area per permit, taken for a computation and put back after it (zeroized).
    areas: Mutex<Vec<Vec<Block>>>,
    wait: Duration,
}

/// A stored credential to check a presented secret against: its id and PHC string.
pub struct Candidate {
    pub id: String,
    pub phc: String,
}

impl Argon2Pool {
    /// `concurrency` computations at most (at least one), each waiting at most `wait` for its
    /// turn. Memory areas are allocated on first use.
    pub fn new(concurrency: usize, wait: Duration) -> Self {
        let concurrency = concurrency.max(1);
        Self { permits: tokio::sync::Semaphore::new(concurrency), areas: Mutex::new(Vec::new()), wait }
    }

    /// Runs `work` with a permit and a memory area, on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Vec<Block>) -> T + Send + 'static,
    ) -> Result<T, ArgonError> {
        let _permit = tokio::time::timeout(self.wait, self.permits.acquire())
            .await
            .map_err(|_| ArgonError::Busy)?
            .map_err(|_| ArgonError::Busy)?;
        let mut area = self.areas.lock().map_err(|_| ArgonError::Internal("pool lock".into()))?.pop();
        let (result, area) = tokio::task::spawn_blocking(move || {
            let mut area = area.take().unwrap_or_default();
            let result = work(&mut area);
            // What a computation leaves in memory derives from the secret.
            area.iter_mut().for_each(Zeroize::zeroize);
            (result, area)
        })
        .await
        .map_err(|e| ArgonError::Internal(e.to_string()))?;
        if let Ok(mut areas) = self.areas.lock() {
            areas.push(area);
        }
        Ok(result)
    }

    /// Argon2id (default parameters) of `secret` under a fresh salt, as a PHC string.
    pub async fn hash(&self, secret: Zeroizing<Vec<u8>>) -> Result<String, ArgonError> {
        self.run(move |area| {
            let params = Params::default();
            let salt = SaltString::generate(&mut OsRng);
            let mut salt_bytes = [0u8; 64];
            let raw_salt =
                salt.decode_b64(&mut salt_bytes).map_err(|e| ArgonError::Internal(e.to_string()))?;
            let mut out = Zeroizing::new([0u8; Params::DEFAULT_OUTPUT_LEN]);
            compute(area, &Argon2::from(params.clone()), &secret, raw_salt, out.as_mut())?;
            let hash = PasswordHash {
                algorithm: argon2::ARGON2ID_IDENT,
                version: Some(Version::V0x13.into()),
                params: ParamsString::try_from(&params).map_err(|e| ArgonError::Internal(e.to_string()))?,
                salt: Some(salt.as_salt()),
                hash: Some(Output::new(out.as_ref()).map_err(|e| ArgonError::Internal(e.to_string()))?),
            };
            Ok(hash.to_string())
        })
        .await?
    }

    /// The id of the first candidate whose hash `presented` matches. With no candidate, the
    /// same work is done against a throwaway salt (so the answer takes as long).
    pub async fn verify_any(
        &self,
        candidates: Vec<Candidate>,
        presented: Zeroizing<Vec<u8>>,
    ) -> Result<Option<String>, ArgonError> {
        self.run(move |area| {
            if candidates.is_empty() {
                let salt = [0x5a; 16];
                let mut out = Zeroizing::new([0u8; Params::DEFAULT_OUTPUT_LEN]);
                let _ = compute(area, &Argon2::default(), &presented, &salt, out.as_mut());
                return None;
            }
            candidates.into_iter().find(|c| matches(area, &c.phc, &presented)).map(|c| c.id)
        })
        .await
    }
}

fn compute(
    area: &mut Vec<Block>,
    argon: &Argon2<'_>,
    secret: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), ArgonError> {
    let blocks = argon.params().block_count();
    if area.len() < blocks {
        area.resize(blocks, Block::new());
    }
    argon
        .hash_password_into_with_memory(secret, salt, out, &mut area[..blocks])
        .map_err(|e| ArgonError::Internal(e.to_string()))
}

/// Does `presented` match the PHC string `phc`? The outputs compare in constant time
/// (`password_hash::Output`'s `PartialEq`).
fn matches(area: &mut Vec<Block>, phc: &str, presented: &[u8]) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else { return false };
    let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else { return false };
    let (Ok(algorithm), Ok(params)) = (Algorithm::try_from(hash.algorithm), Params::try_from(&hash)) else {
        return false;
    };
    let version = match hash.version.map(Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    let mut salt_bytes = [0u8; 64];
    let Ok(raw_salt) = salt.decode_b64(&mut salt_bytes) else { return false };
    let mut out = Zeroizing::new(vec![0u8; expected.len()]);
    compute(area, &Argon2::new(algorithm, version, params), presented, raw_salt, &mut out).is_ok()
        && Output::new(&out).is_ok_and(|computed| computed == expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::PasswordVerifier;

    fn secret(s: &str) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(s.as_bytes().to_vec())
    }

    #[tokio::test]
    async fn hashes_verify_with_the_argon2_crate_and_back() {
        let pool = Argon2Pool::new(2, Duration::from_secs(5));
        let phc = pool.hash(secret("correct horse")).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        // The crate's own verifier agrees, so stored hashes stay standard PHC strings.
        let parsed = PasswordHash::new(&phc).unwrap();
        assert!(Argon2::default().verify_password(b"correct horse", &parsed).is_ok());
        // And a hash the crate made verifies here.
        let theirs = {
            use argon2::password_hash::PasswordHasher;
            Argon2::default()
                .hash_password(b"battery", &SaltString::generate(&mut OsRng))
                .unwrap()
                .to_string()
        };
        let candidates = || {
            vec![
                Candidate { id: "a".into(), phc: phc.clone() },
                Candidate { id: "b".into(), phc: theirs.clone() },
            ]
        };
        assert_eq!(pool.verify_any(candidates(), secret("battery")).await.unwrap().as_deref(), Some("b"));
        assert_eq!(
            pool.verify_any(candidates(), secret("correct horse")).await.unwrap().as_deref(),
            Some("a")
        );
        assert_eq!(pool.verify_any(candidates(), secret("wrong")).await.unwrap(), None);
        assert_eq!(pool.verify_any(Vec::new(), secret("anything")).await.unwrap(), None);
        let broken = vec![Candidate { id: "x".into(), phc: "$argon2id$v=19$garbage".into() }];
        assert_eq!(pool.verify_any(broken, secret("x")).await.unwrap(), None);
    }

    /// The memory areas are bounded by the permits, whatever the number of callers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_is_bounded_by_the_permits() {
        let pool = std::sync::Arc::new(Argon2Pool::new(2, Duration::from_secs(30)));
        let phc = pool.hash(secret("pw")).await.unwrap();
        let tasks: Vec<_> = (0..12)
            .map(|_| {
                let (pool, phc) = (pool.clone(), phc.clone());
                tokio::spawn(async move {
                    pool.verify_any(vec![Candidate { id: "a".into(), phc }], secret("nope")).await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), None);
        }
        let areas = pool.areas.lock().unwrap();
        assert!(areas.len() <= 2, "{} areas for 2 permits", areas.len());
        assert!(
            areas.iter().all(|a| a.iter().all(|b| b.as_ref().iter().all(|w| *w == 0))),
            "areas are zeroized"
        );
    }

    /// With every permit held longer than `wait`, a caller is refused instead of queueing.
    #[tokio::test]
    async fn refuses_when_busy() {
        let pool = Argon2Pool::new(1, Duration::from_millis(50));
        let _held = pool.permits.acquire().await.unwrap();
        assert!(matches!(pool.verify_any(Vec::new(), secret("x")).await, Err(ArgonError::Busy)));
    }
}
