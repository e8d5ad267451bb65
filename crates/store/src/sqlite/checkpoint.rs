//! WAL checkpoints off the write path.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses its threshold (1,000 WAL
//! pages by default): the writer thread copies pages into the database file and fsyncs it while
//! every queued write waits. Here a thread of its own runs a `PASSIVE` checkpoint (which never
//! blocks the writer or readers) every [`INTERVAL`] on its own connection; the automatic
//! checkpoint stays as a backstop at [`BACKSTOP_PAGES`] in case this thread cannot keep up.
//! Durability is unchanged: a commit is durable once its WAL frames are fsync'd.

use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

use super::readers::Readers;
use super::{backend, configure};
use crate::Result;

const INTERVAL: Duration = Duration::from_millis(250);
/// `wal_autocheckpoint` for the writer connection (pages, 4 KiB each).
pub(super) const BACKSTOP_PAGES: i64 = 20_000;

pub(super) struct Checkpointer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    pub(super) fn start(path: &Path, readers: Arc<Readers>) -> Result<Self> {
        let conn = Connection::open(path)?;
        configure(&conn)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("coffer-store-checkpoint".into())
            .spawn(move || loop {
                match stopped.recv_timeout(INTERVAL) {
                    Err(RecvTimeoutError::Timeout) => {}
                    // Stopped, or the store is gone.
                    _ => return,
                }
                // Readers keep their snapshot between reads; none may pin the WAL for longer
                // than an interval.
                readers.release();
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "store: WAL checkpoint failed (will retry)");
                }
            })
            .map_err(backend)?;
        Ok(Self { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
