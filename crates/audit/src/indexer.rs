//! The index thread: commits the rows of records that are already durable (and attested by the
//! signed head) to SQLite, a little behind the writer.
//!
//! Why a second thread: the file write + `fdatasync` (and the head rewrite) is what makes a
//! record durable and attested, and is all a request waits for. Index inserts cost more CPU than
//! the rest of a record's path when done per group commit; done here, at most every
//! [`INDEX_LAG`], one transaction carries every row that arrived meanwhile, so each hot index
//! page is written once per commit instead of once per fsync. The index is rebuildable from the
//! files (open re-adds missing rows), so its lag costs nothing after a crash.

use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::index::{Index, IndexRow};
use crate::AuditError;

/// Longest time a durable record waits for its index row under continuous load, unless a query,
/// a checkpoint request, rotation, retention or shutdown asks for a commit sooner.
pub(crate) const INDEX_LAG: Duration = Duration::from_millis(200);
/// When no new records arrive for this long, commit now: a pause in the load brings the index up
/// to the file almost at once.
pub(crate) const INDEX_QUIET: Duration = Duration::from_millis(10);

pub(crate) type SyncAck = oneshot::Sender<Result<(), AuditError>>;

pub(crate) enum IndexMsg {
    /// Rows of records durable in the files, and rows to delete (retention), to be committed
    /// in one transaction.
    Rows { rows: Vec<IndexRow>, delete_through: Option<u64> },
    /// Commit everything received before this message, then answer.
    Sync(SyncAck),
    /// Commit everything, then end the thread.
    Stop,
}

#[derive(Default)]
struct Pending {
    rows: Vec<IndexRow>,
    delete_through: Option<u64>,
    /// When the oldest uncommitted change arrived.
    since: Option<Instant>,
}

impl Pending {
    fn add(&mut self, rows: Vec<IndexRow>, delete_through: Option<u64>) {
        if self.rows.is_empty() {
            self.rows = rows;
        } else {
            self.rows.extend(rows);
        }
        self.delete_through = self.delete_through.max(delete_through);
        self.since.get_or_insert_with(Instant::now);
    }

    fn commit(&mut self, index: &mut Index) -> Result<(), AuditError> {
        if self.since.is_none() {
            return Ok(());
        }
        index.commit(&self.rows, self.delete_through)?;
        *self = Pending::default();
        Ok(())
    }
}

pub(crate) fn run(mut index: Index, rx: Receiver<IndexMsg>) {
    let mut pending = Pending::default();
    let mut failing = false;
    loop {
        let mut waiters: Vec<SyncAck> = Vec::new();
        let mut stop = false;
        let mut arrived = false;
        let mut take = |msg: IndexMsg, pending: &mut Pending, waiters: &mut Vec<SyncAck>| match msg {
            IndexMsg::Rows { rows, delete_through } => {
                pending.add(rows, delete_through);
                arrived = true;
            }
            IndexMsg::Sync(ack) => waiters.push(ack),
            IndexMsg::Stop => stop = true,
        };
        match pending.since {
            // Idle: wait for work.
            None => match rx.recv() {
                Ok(msg) => take(msg, &mut pending, &mut waiters),
                Err(_) => return, // the writer is gone and nothing is pending
            },
            // Changes pending: sleep instead of waking for every message (one per group commit),
            // then take what came meanwhile. A query's sync waits at most INDEX_QUIET for it.
            Some(since) => {
                let lag_end = since + INDEX_LAG;
                // After a failure, the retry waits a whole lag period.
                let wake = if failing { lag_end } else { lag_end.min(Instant::now() + INDEX_QUIET) };
                std::thread::sleep(wake.saturating_duration_since(Instant::now()));
            }
        }
        loop {
            match rx.try_recv() {
                Ok(msg) => take(msg, &mut pending, &mut waiters),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    stop = true;
                    break;
                }
            }
        }
        // Commit when asked to, when the oldest change has waited INDEX_LAG, or when a sleep of
        // INDEX_QUIET brought nothing new (the load paused).
        let quiet = pending.since.is_some() && !arrived && !failing;
        let due = stop
            || !waiters.is_empty()
            || quiet
            || pending.since.is_some_and(|t| Instant::now() >= t + INDEX_LAG);
        let result = if due { pending.commit(&mut index) } else { Ok(()) };
        match &result {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("audit: the index is committing again");
            }
            Ok(()) => {}
            Err(e) => {
                if !failing {
                    tracing::error!(
                        "audit: index commit failed (records stay durable in the files; queries lag until it \
                         succeeds; retrying): {e}"
                    );
                }
                failing = true;
                // Retry after another lag period rather than spinning.
                pending.since = Some(Instant::now());
            }
        }
        for ack in waiters {
            let _ = ack.send(result.clone());
        }
        if stop {
            return;
        }
    }
}
