//! The accept loop: TLS handshakes run per connection (with a timeout, so a stalled client
//! cannot hold up others), then hyper serves HTTP/1.1 or HTTP/2 on the connection.
//!
//! Connection hygiene (issue 16: before it, partial headers and endless bodies stayed open
//! past 70 s, and 223 idle connections under a low descriptor limit made the server refuse
//! everyone while logging `accept failed` ~600 times in seconds):
//! * at most `max_connections` open at once and `max_per_address` from one IP address; the
//!   excess is closed at once, before its TLS handshake;
//! * HTTP/1.1 headers must arrive within `header_timeout`; a request body within
//!   `body_timeout` of its headers (the body errors, and the handler answers 408);
//! * a connection with no request in progress for `idle_timeout` is shut down (HTTP/2 gets a
//!   GOAWAY), whatever bytes it trickles;
//! * accept errors (descriptors exhausted) back off exponentially and are logged at most once
//!   every ten seconds, with a count.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::Router;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::api::PeerAddr;
use crate::config::ConnectionSettings;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection told to shut down (idle, or the server stopping) may take to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Descriptors kept for everything but client connections (database, audit files, agents).
const RESERVED_DESCRIPTORS: u64 = 128;

pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    app: Router,
    settings: ConnectionSettings,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let max_total = settings.max_connections.unwrap_or_else(default_max_connections);
    let slots = Arc::new(Slots::new(max_total, settings.max_per_address));
    tracing::info!(
        max_connections = max_total,
        per_address = settings.max_per_address,
        "accepting connections"
    );
    let settings = Arc::new(settings);
    let accept_errors = RateLimitedLog::default();
    let refusals = Arc::new(RateLimitedLog::default());
    let mut backoff = Duration::ZERO;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors and similar: back off instead of spinning, and say so
                    // without flooding the log.
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    accept_errors.warn(|suppressed| {
                        tracing::warn!(error = %e, suppressed, "accept failed; backing off")
                    });
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return Ok(()),
        };
        backoff = Duration::ZERO;
        let Some(slot) = Slots::take(&slots, peer.ip()) else {
            refusals.warn(
                |suppressed| tracing::warn!(%peer, suppressed, "connection refused: too many connections"),
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, app, settings) = (acceptor.clone(), app.clone(), settings.clone());
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let tls_stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let activity = Arc::new(Activity::new());
            let body_timeout = settings.body_timeout;
            let tracked = activity.clone();
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                let busy = tracked.begin();
                // A bodiless request (every GET) has nothing to time out: no timer for it.
                let req = req.map(|body| {
                    if body.is_end_stream() {
                        axum::body::Body::new(body)
                    } else {
                        axum::body::Body::new(DeadlineBody::new(body, body_timeout))
                    }
                });
                let response = app.clone().oneshot(req);
                async move {
                    let response = response.await;
                    drop(busy);
                    response
                }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(settings.header_timeout);
            builder.http2().timer(TokioTimer::new());
            let conn = builder.serve_connection(TokioIo::new(tls_stream), service);
            tokio::pin!(conn);
            let check = (settings.idle_timeout / 4).max(Duration::from_millis(250));
            let result = loop {
                tokio::select! {
                    result = conn.as_mut() => break Some(result),
                    _ = tokio::time::sleep(check) => {
                        if activity.idle_for() >= settings.idle_timeout {
                            tracing::debug!(%peer, "closing an idle connection");
                            break None;
                        }
                    }
                    _ = stop.changed() => break None,
                }
            };
            let result = match result {
                Some(result) => result,
                None => {
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await {
                        Ok(result) => result,
                        Err(_) => return,
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// The connection limit when none is configured: 4096, or what the descriptor limit leaves
/// after [`RESERVED_DESCRIPTORS`]. The soft limit is first raised to the hard one, as most
/// servers do (systemd's default soft limit is 1024, its hard limit far higher).
fn default_max_connections() -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 4096;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        limit.rlim_cur
    };
    let usable = if soft > 2 * RESERVED_DESCRIPTORS { soft - RESERVED_DESCRIPTORS } else { soft / 2 };
    usize::try_from(usable).unwrap_or(usize::MAX).clamp(1, 4096)
}

/// Open connections, in all and per address.
struct Slots {
    max_total: usize,
    max_per_address: usize,
    total: AtomicUsize,
    per_address: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place; given back on drop.
struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Slots {
    fn new(max_total: usize, max_per_address: usize) -> Self {
        Self { max_total, max_per_address, total: AtomicUsize::new(0), per_address: Mutex::default() }
    }

    fn take(slots: &Arc<Slots>, ip: IpAddr) -> Option<Slot> {
        let mut per_address = slots.per_address.lock().ok()?;
        let count = per_address.entry(ip).or_insert(0);
        if *count >= slots.max_per_address || slots.total.load(Ordering::Relaxed) >= slots.max_total {
            if *count == 0 {
                per_address.remove(&ip);
            }
            return None;
        }
        *count += 1;
        slots.total.fetch_add(1, Ordering::Relaxed);
        Some(Slot { slots: slots.clone(), ip })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut per_address) = self.slots.per_address.lock() {
            if let Some(count) = per_address.get_mut(&self.ip) {
                *count -= 1;
                if *count == 0 {
                    per_address.remove(&self.ip);
                }
            }
        }
        self.slots.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Requests in progress on a connection and when the last one began or ended.
struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `start`.
    last: AtomicU64,
}

/// Marks a request in progress until dropped.
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Self {
        Self { start: Instant::now(), in_flight: AtomicUsize::new(0), last: AtomicU64::new(0) }
    }

    fn touch(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Busy(self.clone())
    }

    /// How long the connection has had no request in progress (zero while one is).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        self.start.elapsed().saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The request body, failing with [`BodyTimedOut`] once `timeout` has passed since the
/// headers arrived (a client sending an endless or stalled body cannot hold a handler).
struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

/// The error a [`DeadlineBody`] ends with; `api::read_body` answers it with 408.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyTimedOut;

impl DeadlineBody {
    fn new(inner: Incoming, timeout: Duration) -> Self {
        Self { inner, deadline: Box::pin(tokio::time::sleep(timeout)) }
    }
}

impl hyper::body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match this.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A warning logged at most once every ten seconds, with how many were left out meanwhile.
#[derive(Default)]
struct RateLimitedLog {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RateLimitedLog {
    fn warn(&self, log: impl FnOnce(u64)) {
        let Ok(mut last) = self.last.lock() else { return };
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(10)) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        log(self.suppressed.swap(0, Ordering::Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_limit_in_all_and_per_address() {
        let slots = Arc::new(Slots::new(3, 2));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let a1 = Slots::take(&slots, a).unwrap();
        let _a2 = Slots::take(&slots, a).unwrap();
        assert!(Slots::take(&slots, a).is_none(), "per address");
        let _b1 = Slots::take(&slots, b).unwrap();
        assert!(Slots::take(&slots, b).is_none(), "in all");
        drop(a1);
        assert!(Slots::take(&slots, b).is_some(), "a freed slot is reusable");
        assert_eq!(slots.per_address.lock().unwrap().len(), 2);
    }

    #[test]
    fn rate_limited_log_counts_what_it_leaves_out() {
        let log = RateLimitedLog::default();
        let mut logged = Vec::new();
        for _ in 0..5 {
            log.warn(|suppressed| logged.push(suppressed));
        }
        assert_eq!(logged, vec![0]);
        assert_eq!(log.suppressed.load(Ordering::Relaxed), 4);
    }
}
