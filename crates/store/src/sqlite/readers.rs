//! The reader connections, which keep their read transaction open from one read to the next
//! for as long as nothing has been committed since it began.
//!
//! Why: in WAL mode each read transaction takes and releases a lock in the shared-memory WAL
//! index (an `fcntl` system call each way unless another connection holds the same lock) and
//! re-checks the WAL header. On a secret GET that was ≈ 8 % of the server's CPU, more than the
//! B-tree search itself. Every write goes through this process's writer thread, so the process
//! knows exactly when a snapshot goes stale: the writer bumps [`Readers::generation`] after each
//! commit, before it answers any caller, and a reader whose transaction began under an older
//! generation starts a new one. A read therefore sees every write acknowledged before it began,
//! as it would with a transaction of its own.
//!
//! An open read transaction pins its snapshot: the checkpointer cannot copy later WAL frames
//! into the database file past it, and the WAL cannot restart while it is held. So the
//! checkpointer calls [`Readers::release`] on every tick: it bumps the generation (busy readers
//! start a new transaction on their next read) and ends the transactions of idle readers. No
//! snapshot outlives a checkpoint interval.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use rusqlite::Connection;

use super::{backend, configure};
use crate::Result;

struct Reader {
    conn: Connection,
    /// The generation under which the open read transaction began, if one is open.
    snapshot: Option<u64>,
}

impl Reader {
    /// Ends the open read transaction, if any.
    fn end(&mut self) {
        if self.snapshot.take().is_some() && !self.conn.is_autocommit() {
            // A read-only transaction has nothing to commit; COMMIT just releases its locks.
            if self.conn.execute_batch("COMMIT").is_err() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
        }
    }

    fn run<R>(&mut self, generation: u64, f: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
        if self.snapshot != Some(generation) || self.conn.is_autocommit() {
            self.end();
            // Deferred: the snapshot is taken by the first statement, after this generation.
            self.conn.prepare_cached("BEGIN")?.execute([])?;
            self.snapshot = Some(generation);
        }
        let out = f(&self.conn);
        if out.is_err() {
            // Whatever failed, the next read starts afresh.
            self.end();
        }
        out
    }
}

pub(super) struct Readers {
    conns: Vec<Mutex<Reader>>,
    next: AtomicUsize,
    generation: AtomicU64,
    /// Commits that changed rows so far (the version cache's tag; see `versions`). Bumped after
    /// `generation`: whoever sees a commit counted here also sees its generation, so their read
    /// takes a snapshot that holds the commit.
    writes: AtomicU64,
}

impl Readers {
    pub(super) fn open(path: &Path, count: usize) -> Result<Self> {
        let conns = (0..count)
            .map(|_| {
                let conn = Connection::open(path)?;
                configure(&conn)?;
                Ok(Mutex::new(Reader { conn, snapshot: None }))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conns,
            next: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        })
    }

    /// Runs a read on a free reader connection, inline on the calling task: reads are short
    /// (indexed lookups served from the page cache), and a hop to the blocking pool would cost
    /// more than the query on the hot path.
    pub(super) fn read<R>(&self, f: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
        // Read before picking a connection: a write acknowledged before this read began has
        // bumped it already.
        let generation = self.generation.load(Ordering::Acquire);
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..self.conns.len() {
            if let Ok(mut reader) = self.conns[(start + i) % self.conns.len()].try_lock() {
                return reader.run(generation, f);
            }
        }
        let mut reader = self.conns[start % self.conns.len()].lock().map_err(backend)?;
        reader.run(generation, f)
    }

    /// Called by the writer after every commit (and failed commit), before it answers: from the
    /// next read on, readers take a new snapshot, and if it `changed` any row, cached versions
    /// are stale.
    pub(super) fn committed(&self, changed: bool) {
        self.generation.fetch_add(1, Ordering::Release);
        if changed {
            self.writes.fetch_add(1, Ordering::Release);
        }
    }

    /// The number of commits that changed rows so far. Read it *before* a read whose result is
    /// cached under it.
    pub(super) fn writes(&self) -> u64 {
        self.writes.load(Ordering::Acquire)
    }

    /// Unpins every snapshot (see the module documentation).
    pub(super) fn release(&self) {
        self.generation.fetch_add(1, Ordering::Release);
        for conn in &self.conns {
            if let Ok(mut reader) = conn.try_lock() {
                reader.end();
            }
        }
    }

    #[cfg(test)]
    pub(super) fn open_transactions(&self) -> usize {
        self.conns.iter().filter(|c| c.lock().is_ok_and(|r| !r.conn.is_autocommit())).count()
    }
}
