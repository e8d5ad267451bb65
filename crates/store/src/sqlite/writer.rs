//! The writer connection, with group commit.
//!
//! With `synchronous=FULL` every commit costs an fsync, and SQLite runs one writer at a time, so a
//! transaction per write caps throughput at the disk's fsync rate. Instead a dedicated thread owns
//! the writer connection and takes every write queued while it was busy (up to [`MAX_BATCH`]) into
//! one `BEGIN IMMEDIATE` transaction, each write inside its own savepoint, and commits once. For
//! each caller this is indistinguishable from a transaction of its own:
//!
//! * writes run one after another in arrival order, each seeing the ones before it, as if serial;
//! * a write that fails or panics is rolled back to its savepoint and gets its own error; the rest
//!   of the batch is unaffected;
//! * a write gets `Ok` only after the COMMIT succeeded; if the batch cannot commit, every write in
//!   it gets an error, so nothing is acknowledged that is not durable.
//!
//! There is no gather window: a batch is whatever queued during the previous commit, so a lone
//! write waits for nothing, and batches grow exactly when fsyncs are the bottleneck.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread::JoinHandle;

use rusqlite::{Connection, Transaction, TransactionBehavior};
use tokio::sync::oneshot;

use super::backend;
use super::readers::Readers;
use crate::{Result, StoreError};

/// Bounds one transaction's size, and so the latency of the first write in it.
const MAX_BATCH: usize = 256;

/// A queued write, type-erased so that writes with different results share one queue.
trait Job: Send {
    /// Runs the write inside the batch's transaction; true if it succeeded.
    fn run(&mut self, tx: &Transaction<'_>) -> bool;
    /// Answers the caller, given how the batch ended.
    fn finish(self: Box<Self>, batch: &Result<(), String>);
}

struct WriteJob<R, F> {
    work: Option<F>,
    out: Option<Result<R>>,
    reply: oneshot::Sender<Result<R>>,
}

impl<R, F> Job for WriteJob<R, F>
where
    R: Send + 'static,
    F: FnOnce(&Transaction<'_>) -> Result<R> + Send + 'static,
{
    fn run(&mut self, tx: &Transaction<'_>) -> bool {
        let Some(work) = self.work.take() else { return false };
        // A panic must cost only this write: the writer thread serves every other caller.
        let out = catch_unwind(AssertUnwindSafe(|| work(tx)))
            .unwrap_or_else(|_| Err(StoreError::Backend("the write panicked".into())));
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn finish(self: Box<Self>, batch: &Result<(), String>) {
        let out = match (self.out, batch) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (_, Err(e)) => Err(StoreError::Backend(e.clone())),
            (None, Ok(())) => Err(backend("the write was not run")),
        };
        // The caller may have stopped waiting; its write stands either way, as it would have
        // with a transaction of its own.
        let _ = self.reply.send(out);
    }
}

/// Test-only counters, to check that writes really share batches.
#[cfg(test)]
#[derive(Default)]
pub(super) struct Stats {
    /// Writes handed to the writer thread.
    pub(super) queued: std::sync::atomic::AtomicUsize,
    /// Batches the writer thread has finished (committed or not).
    pub(super) batches: std::sync::atomic::AtomicUsize,
}

/// The handle to the writer thread. Dropping it closes the queue, waits for the thread to finish
/// what was queued, and so closes the connection.
pub(super) struct Writer {
    jobs: Option<mpsc::Sender<Box<dyn Job>>>,
    thread: Option<JoinHandle<()>>,
    #[cfg(test)]
    pub(super) stats: std::sync::Arc<Stats>,
}

impl Writer {
    /// Moves `conn` (configured and migrated) to a new writer thread.
    pub(super) fn start(conn: Connection, readers: std::sync::Arc<Readers>) -> Result<Self> {
        let (jobs, queue) = mpsc::channel();
        #[cfg(test)]
        let stats = std::sync::Arc::<Stats>::default();
        let writer = WriterThread {
            conn,
            queue,
            readers,
            #[cfg(test)]
            stats: stats.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("coffer-store-writer".into())
            .spawn(move || writer.serve())
            .map_err(backend)?;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
            #[cfg(test)]
            stats,
        })
    }

    /// Runs `f` in the writer's transaction, inside a savepoint of its own; returns once the
    /// transaction has committed (or `f`'s error, with its changes rolled back).
    pub(super) async fn write<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<R> + Send + 'static,
    {
        let stopped = || backend("the store's writer has stopped");
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(WriteJob { work: Some(f), out: None, reply });
        self.jobs.as_ref().ok_or_else(stopped)?.send(job).map_err(|_| stopped())?;
        #[cfg(test)]
        self.stats.queued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        answer.await.map_err(|_| stopped())?
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has run what is already queued (writes of
        // callers that stopped waiting); jobs never wait on the async runtime, so joining from
        // inside it cannot deadlock. Joining means the connection is closed when the store is
        // gone, so the same file can be reopened at once.
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            // (A job owning the last handle to the store would drop it on the thread itself.)
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

struct WriterThread {
    conn: Connection,
    queue: mpsc::Receiver<Box<dyn Job>>,
    /// Told after each commit, before any caller is answered (read-your-writes).
    readers: std::sync::Arc<Readers>,
    #[cfg(test)]
    stats: std::sync::Arc<Stats>,
}

impl WriterThread {
    /// Blocks for a first job, takes whatever else is queued, commits them together.
    fn serve(mut self) {
        let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_BATCH);
        // `recv` fails only once the queue is closed and empty: the store has been dropped.
        while let Ok(first) = self.queue.recv() {
            batch.push(first);
            batch.extend(self.queue.try_iter().take(MAX_BATCH - 1));
            let changes_before = self.conn.total_changes();
            let outcome = run_batch(&mut self.conn, &mut batch);
            // A batch that changed no row (a periodic scan that found nothing) leaves cached
            // versions valid; a failed one may have changed anything.
            self.readers.committed(outcome.is_err() || self.conn.total_changes() != changes_before);
            if let Err(e) = &outcome {
                tracing::warn!(writes = batch.len(), error = %e, "store: a group commit failed");
            }
            #[cfg(test)]
            self.stats.batches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            for job in batch.drain(..) {
                job.finish(&outcome);
            }
        }
    }
}

/// Runs the jobs in one transaction, each in a savepoint, and commits. An error here means the
/// transaction did not commit; the jobs not run yet are then not run at all.
fn run_batch(conn: &mut Connection, batch: &mut [Box<dyn Job>]) -> Result<(), String> {
    let failed = |e: rusqlite::Error| format!("the group commit failed: {e}");
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(failed)?;
    for job in batch.iter_mut() {
        tx.prepare_cached("SAVEPOINT job").and_then(|mut s| s.execute([])).map_err(failed)?;
        let ok = job.run(&tx);
        if tx.is_autocommit() {
            // Some errors (I/O, disk full) make SQLite roll back the whole transaction, taking
            // the earlier jobs' work with it; their callers must not see `Ok`.
            return Err("the group commit was rolled back by SQLite".into());
        }
        if ok {
            tx.prepare_cached("RELEASE job").and_then(|mut s| s.execute([])).map_err(failed)?;
        } else {
            tx.execute_batch("ROLLBACK TO job; RELEASE job").map_err(failed)?;
        }
    }
    // On failure, dropping the transaction rolls it back.
    tx.commit().map_err(failed)
}
