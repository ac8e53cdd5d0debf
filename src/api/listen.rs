//! The accept loop every listener shares (HTTP, gRPC, metrics; plain TCP or
//! TLS), and what it enforces on connections:
//!
//! - **a cap** per listener: a connection past it is closed as it arrives
//!   and counted (`llmops_connections_refused_total`), so a flood cannot
//!   take every file descriptor; the cap is lowered to fit the file limit,
//!   whose soft value is raised to the hard one at start;
//! - **header-read timeout**: a request's head must be complete within it of
//!   its first byte (a slowloris client sending a byte a second is closed);
//!   also the TLS handshake's limit;
//! - **idle timeout**: a connection with no request in progress (HTTP/1
//!   keep-alive, HTTP/2 without streams, or a client that connected and
//!   sent nothing) is closed after it (HTTP/2 with a GOAWAY first);
//! - **body-read timeout**: the time allowed between two parts of a request
//!   body while a handler waits for it; past it the request fails with 408
//!   and the HTTP/1 connection is closed after the answer;
//! - HTTP/2 keep-alive pings, so a peer that vanished mid-stream is noticed.
//!
//! hyper's own HTTP/1 header timer (with a tokio timer) stays on as a
//! backstop: it starts when a connection goes idle, so it is set to the
//! idle plus the header timeout. hyper has no idle or body timeout, and
//! its header timer cannot tell a keep-alive connection waiting for its
//! next request from a slow head, so a watchdog per connection does that:
//! it counts the requests in progress (a request is in progress from its
//! head until its response body is sent or dropped) and watches the bytes
//! read while none is.
//!
//! Invariant: a connection without a request in progress is closed within
//! the idle timeout, or the header timeout once a byte of a head arrived.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::body::Body;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tower::ServiceExt;

use crate::api::tls::Tls;
use crate::config::ListenerConfig;
use crate::monitor::names;

/// File descriptors kept out of the connection caps: the registry, model
/// files, capture segments, hook children, the etcd and webhook clients.
pub const RESERVED_FDS: u64 = 256;

/// No cap is lowered below this, whatever the file limit.
const MIN_CAP: usize = 16;

/// How long an HTTP/2 connection closed for idleness gets, once it has no
/// stream, after its GOAWAY.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);

/// Longest an HTTP/2 keep-alive ping may go unanswered.
const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// A listener to serve: its name (the `listener` label), its cap and TLS.
#[derive(Clone, Debug)]
pub struct Listener {
    /// `http`, `grpc` or `metrics`.
    pub name: &'static str,
    /// Connections open at once (already fitted to the file limit).
    pub max_connections: usize,
    /// Timeouts and keep-alive.
    pub config: ListenerConfig,
    /// TLS, when the listeners speak it.
    pub tls: Option<Tls>,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, logs what it became,
/// and returns it (`None` when it cannot be read).
pub fn raise_file_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes a plain struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the file descriptor limit");
        return None;
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads a plain struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        } else {
            tracing::warn!(error = %std::io::Error::last_os_error(), soft = before, hard = lim.rlim_max, "cannot raise the file descriptor limit");
        }
    }
    let now: u64 = lim.rlim_cur;
    tracing::info!(
        from = before,
        to = now,
        hard = lim.rlim_max,
        "file descriptor limit"
    );
    Some(now)
}

/// The cap of each of `listeners` listeners: `configured`, lowered (and
/// logged) so that together they leave [`RESERVED_FDS`] of `file_limit`.
pub fn fit_cap(configured: usize, file_limit: Option<u64>, listeners: usize) -> usize {
    let Some(limit) = file_limit else {
        return configured;
    };
    let budget = limit.saturating_sub(RESERVED_FDS) / listeners.max(1) as u64;
    let budget = usize::try_from(budget).unwrap_or(usize::MAX).max(MIN_CAP);
    if budget < configured {
        tracing::warn!(
            max_connections = configured,
            lowered_to = budget,
            file_limit = limit,
            listeners,
            "the file descriptor limit is too low for max_connections on every listener; lowering the cap"
        );
        budget
    } else {
        configured
    }
}

/// Serves `app` on `tcp` until `shutdown` resolves, then lets open
/// connections finish (HTTP/2 GOAWAY, HTTP/1 after the response).
pub async fn serve(
    tcp: TcpListener,
    listener: Listener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let listener = Arc::new(listener);
    let name = listener.name;
    // Exported from the start (at 0), not from the first connection.
    metrics::gauge!(names::CONNECTIONS_OPEN, "listener" => name).increment(0.0);
    metrics::counter!(names::CONNECTIONS_REFUSED, "listener" => name).increment(0);
    let slots = Arc::new(Semaphore::new(listener.max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Each connection holds a sender; all gone = all connections closed.
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut accept_errors = Sometimes::default();
    let mut refusals = Sometimes::default();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = tcp.accept() => match accepted {
                Ok(a) => a,
                // The client gave up before we took it: nothing to do.
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of descriptors and the like: back off, keep serving.
                    if let Some(more) = accept_errors.due() {
                        tracing::warn!(listener = name, error = %e, repeated = more, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!(names::CONNECTIONS_REFUSED, "listener" => name).increment(1);
            if let Some(more) = refusals.due() {
                tracing::warn!(
                    listener = name,
                    max_connections = listener.max_connections,
                    repeated = more,
                    "connection cap reached: closing new connections"
                );
            }
            drop(stream);
            continue;
        };
        crate::api::tune_socket(&stream);
        let (listener, app, stop_rx, open) = (
            listener.clone(),
            app.clone(),
            stop_rx.clone(),
            open_tx.clone(),
        );
        tokio::spawn(async move {
            let _slot = slot;
            let _open = (open, OpenGauge::new(name));
            connection(stream, peer, &listener, app, stop_rx).await;
        });
    }
    let _ = stop_tx.send(true);
    drop(open_tx);
    let _ = open_rx.recv().await;
}

/// Errors of one incoming connection, not of the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// A warning at most every 10 s, with how many were held back.
#[derive(Default)]
struct Sometimes {
    last: Option<Instant>,
    held: u64,
}

impl Sometimes {
    /// `Some(held back since the last one)` when a warning is due.
    fn due(&mut self) -> Option<u64> {
        match self.last {
            Some(t) if t.elapsed() < Duration::from_secs(10) => {
                self.held += 1;
                None
            }
            _ => {
                self.last = Some(Instant::now());
                Some(std::mem::take(&mut self.held))
            }
        }
    }
}

/// `llmops_connections_open{listener}` up while it lives.
struct OpenGauge(&'static str);

impl OpenGauge {
    fn new(listener: &'static str) -> Self {
        metrics::gauge!(names::CONNECTIONS_OPEN, "listener" => listener).increment(1.0);
        Self(listener)
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        metrics::gauge!(names::CONNECTIONS_OPEN, "listener" => self.0).decrement(1.0);
    }
}

/// One accepted connection, to its end.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    listener: &Listener,
    app: axum::Router,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let state = Arc::new(ConnState::new());
    let Some(tls) = &listener.tls else {
        return drive(
            Watched::new(tcp, state.clone()),
            state,
            listener,
            app,
            false,
            stop,
            peer,
        )
        .await;
    };
    let limit = listener.config.header_read_timeout;
    let stream = match tokio::time::timeout(limit, crate::api::tls::handshake(tcp, tls)).await {
        Ok(Ok(Some(s))) => s,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            timed_out(listener.name, Phase::Handshake, peer);
            return;
        }
    };
    let refuse_admin = tls.refuses_admin(&stream);
    drive(
        Watched::new(stream, state.clone()),
        state,
        listener,
        app,
        refuse_admin,
        stop,
        peer,
    )
    .await
}

/// Why a connection was closed by a timeout (the `phase` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The TLS handshake did not finish.
    Handshake,
    /// A request's head did not finish.
    Header,
    /// No request came.
    Idle,
    /// A request body stalled.
    Body,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Handshake => "handshake",
            Phase::Header => "header",
            Phase::Idle => "idle",
            Phase::Body => "body",
        }
    }
}

fn timed_out(listener: &'static str, phase: Phase, peer: SocketAddr) {
    metrics::counter!(names::CONNECTIONS_TIMED_OUT, "listener" => listener, "phase" => phase.label())
        .increment(1);
    tracing::debug!(listener, %peer, phase = phase.label(), "connection closed: timed out");
}

/// Serves HTTP/1 or HTTP/2 on `io` until the client leaves, a timeout
/// closes it, or the server stops.
async fn drive<I>(
    io: I,
    state: Arc<ConnState>,
    listener: &Listener,
    app: axum::Router,
    refuse_admin: bool,
    mut stop: tokio::sync::watch::Receiver<bool>,
    peer: SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cfg = &listener.config;
    let body_limit = cfg.body_read_timeout;
    let svc_state = state.clone();
    let svc = tower::service_fn(move |req: axum::http::Request<Incoming>| {
        let (app, state) = (app.clone(), svc_state.clone());
        let in_flight = InFlight::start(state.clone());
        async move {
            let resp = if refuse_admin && crate::api::tls::is_admin_path(req.uri().path()) {
                crate::api::tls::refuse_admin(req.uri().path())
            } else {
                let req = req.map(|b| Body::new(TimedBody::new(b, body_limit, state)));
                match app.oneshot(req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                }
            };
            Ok::<_, Infallible>(resp.map(|b| {
                Body::new(Tracked {
                    inner: b,
                    _in_flight: in_flight,
                })
            }))
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper's timer starts when the connection goes idle: the backstop
        // of the watchdog's idle and header timeouts together.
        .header_read_timeout(cfg.idle_timeout + cfg.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(cfg.http2_keepalive)
        .keep_alive_timeout(PING_TIMEOUT);
    let conn = builder.serve_connection_with_upgrades(
        TokioIo::new(io),
        hyper_util::service::TowerToHyperService::new(svc),
    );
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = async { stop.wait_for(|v| *v).await.map(|_| ()) } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        phase = state.watchdog(cfg) => {
            timed_out(listener.name, phase, peer);
            if state.http2.load(Ordering::Relaxed) {
                // No stream is open: GOAWAY, so the client reconnects
                // rather than fails its next call. A stream it opened
                // before it read the GOAWAY is still served; then the
                // connection gets GOAWAY_GRACE of idleness to close.
                conn.as_mut().graceful_shutdown();
                state.idle_since.store(state.now(), Ordering::Relaxed);
                let grace = ListenerConfig {
                    idle_timeout: GOAWAY_GRACE,
                    ..cfg.clone()
                };
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = state.watchdog(&grace) => {}
                }
            }
            // Dropping the connection closes the socket.
            return;
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// `u64::MAX` in [`ConnState::head_started`]: no head is arriving.
const NONE: u64 = u64::MAX;

/// What the watchdog of one connection knows. Times are milliseconds since
/// `born`.
struct ConnState {
    born: Instant,
    /// Requests from head to the end of their response body.
    in_flight: AtomicUsize,
    /// When `in_flight` last became 0 (0: the connection's start).
    idle_since: AtomicU64,
    /// When the first byte arrived while no request was in progress
    /// ([`NONE`] if none did): a head is on its way.
    head_started: AtomicU64,
    /// The client spoke the HTTP/2 preface: its reads between streams are
    /// pings and settings, not heads.
    http2: AtomicBool,
    /// An HTTP/1 request body stalled: close once its answer is sent.
    body_timed_out: AtomicBool,
    /// Wakes the watchdog to look again.
    wake: Notify,
}

impl ConnState {
    fn new() -> Self {
        Self {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(NONE),
            http2: AtomicBool::new(false),
            body_timed_out: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    /// Bytes arrived.
    fn on_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && !self.http2.load(Ordering::Relaxed)
            && self.head_started.load(Ordering::Relaxed) == NONE
        {
            self.head_started.store(self.now(), Ordering::Relaxed);
            self.wake.notify_one();
        }
    }

    /// When the connection must close if nothing changes, and why; `None`
    /// while a request is in progress.
    fn deadline(&self, cfg: &ListenerConfig) -> Option<(Instant, Phase)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        if self.body_timed_out.load(Ordering::Relaxed) {
            return Some((self.born, Phase::Body));
        }
        let at = |ms: u64| self.born + Duration::from_millis(ms);
        match self.head_started.load(Ordering::Relaxed) {
            NONE => Some((
                at(self.idle_since.load(Ordering::Relaxed)) + cfg.idle_timeout,
                Phase::Idle,
            )),
            head => Some((at(head) + cfg.header_read_timeout, Phase::Header)),
        }
    }

    /// Resolves when a timeout has passed, with its phase.
    async fn watchdog(&self, cfg: &ListenerConfig) -> Phase {
        loop {
            // While a request runs, look again after an idle timeout (it can
            // end no earlier than now, so its idle deadline is no earlier).
            let (at, phase) = match self.deadline(cfg) {
                Some(d) => (d.0, Some(d.1)),
                None => (Instant::now() + cfg.idle_timeout, None),
            };
            if let Some(phase) = phase
                && at <= Instant::now()
            {
                return phase;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}

/// A request in progress on its connection, from its head until its
/// response body is sent or dropped.
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn start(state: Arc<ConnState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        state.head_started.store(NONE, Ordering::Relaxed);
        Self(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let s = &self.0;
        s.idle_since.store(s.now(), Ordering::Relaxed);
        if s.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            s.wake.notify_one();
        }
    }
}

/// A response body holding its request's [`InFlight`].
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that fails with [`BodyTimeout`] when the server has
/// waited longer than its limit for the next part. Only time spent waiting
/// counts: a handler busy between two reads is not the client's fault.
struct TimedBody {
    inner: Incoming,
    limit: Duration,
    /// Armed while waiting for the client.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    state: Arc<ConnState>,
}

impl TimedBody {
    fn new(inner: Incoming, limit: Duration, state: Arc<ConnState>) -> Self {
        Self {
            inner,
            limit,
            timer: None,
            state,
        }
    }
}

/// No part of a request body arrived within the body-read timeout.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no part of the request body arrived for {} s (the body-read timeout)", .0.as_secs_f64())]
pub struct BodyTimeout(pub Duration);

impl HttpBody for TimedBody {
    type Data = axum::body::Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.timer = None;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let limit = this.limit;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(timer.as_mut().poll(cx));
        if !this.state.http2.load(Ordering::Relaxed) {
            // An HTTP/1 connection cannot skip the rest of the body.
            this.state.body_timed_out.store(true, Ordering::Relaxed);
        }
        Poll::Ready(Some(Err(Box::new(BodyTimeout(limit)))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The [`BodyTimeout`] behind a body error, if that is what it is.
pub fn body_timeout(e: &(dyn StdError + 'static)) -> Option<BodyTimeout> {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<BodyTimeout>() {
            return Some(*t);
        }
        cur = e.source();
    }
    None
}

/// The HTTP/2 client preface; a connection that starts with it speaks h2.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Past the preface check: the connection speaks HTTP/1.
const NOT_H2: usize = usize::MAX;

/// The connection's stream, telling its [`ConnState`] about every read.
struct Watched<I> {
    inner: I,
    state: Arc<ConnState>,
    /// Bytes of [`H2_PREFACE`] matched so far, or [`NOT_H2`].
    preface: usize,
}

impl<I> Watched<I> {
    fn new(inner: I, state: Arc<ConnState>) -> Self {
        Self {
            inner,
            state,
            preface: 0,
        }
    }

    fn saw(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.preface >= H2_PREFACE.len() {
                break;
            }
            if H2_PREFACE[self.preface] == b {
                self.preface += 1;
                if self.preface == H2_PREFACE.len() {
                    self.state.http2.store(true, Ordering::Relaxed);
                }
            } else {
                self.preface = NOT_H2;
            }
        }
        self.state.on_read();
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            let this = &mut *self;
            this.saw(&buf.filled()[before..]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ListenerConfig {
        ListenerConfig {
            header_read_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            ..Default::default()
        }
    }

    #[test]
    fn a_quiet_connection_has_the_idle_deadline_and_a_started_head_the_header_one() {
        let s = ConnState::new();
        let (at, phase) = s.deadline(&cfg()).unwrap();
        assert_eq!((at - s.born, phase), (Duration::from_secs(10), Phase::Idle));
        s.on_read();
        let (at, phase) = s.deadline(&cfg()).unwrap();
        assert_eq!(phase, Phase::Header);
        assert!(at - s.born <= Duration::from_secs(3), "{:?}", at - s.born);
        // A request in progress has no deadline; its end starts the idle one.
        let r = InFlight::start(Arc::new(ConnState::new()));
        assert!(r.0.deadline(&cfg()).is_none());
        r.0.on_read();
        assert!(r.0.deadline(&cfg()).is_none(), "body bytes are not a head");
        let state = r.0.clone();
        drop(r);
        assert_eq!(state.deadline(&cfg()).unwrap().1, Phase::Idle);
    }

    #[test]
    fn the_http2_preface_marks_the_connection_and_its_reads_are_not_heads() {
        let s = Arc::new(ConnState::new());
        let mut w = Watched::new((), s.clone());
        w.saw(&H2_PREFACE[..10]);
        assert!(!s.http2.load(Ordering::Relaxed));
        w.saw(&H2_PREFACE[10..]);
        assert!(s.http2.load(Ordering::Relaxed));
        // The preface itself started a "head" (it could have been one);
        // once known as h2, later reads start none.
        let s2 = Arc::new(ConnState::new());
        s2.http2.store(true, Ordering::Relaxed);
        s2.on_read();
        assert_eq!(s2.deadline(&cfg()).unwrap().1, Phase::Idle);
        let s3 = Arc::new(ConnState::new());
        let mut w = Watched::new((), s3.clone());
        w.saw(b"PRX");
        assert!(!s3.http2.load(Ordering::Relaxed));
        assert_eq!(w.preface, NOT_H2);
    }

    #[test]
    fn caps_fit_the_file_limit_with_a_reserve() {
        assert_eq!(fit_cap(4096, None, 2), 4096);
        assert_eq!(fit_cap(4096, Some(1 << 20), 3), 4096);
        assert_eq!(fit_cap(4096, Some(4096), 2), (4096 - 256) / 2);
        assert_eq!(fit_cap(4096, Some(100), 2), MIN_CAP);
        assert_eq!(fit_cap(10, Some(4096), 2), 10);
    }

    #[test]
    fn a_body_timeout_is_found_behind_wrapping_errors() {
        let e = axum::Error::new(BodyTimeout(Duration::from_secs(3)));
        assert_eq!(body_timeout(&e).map(|t| t.0), Some(Duration::from_secs(3)));
        let other = std::io::Error::other("nope");
        assert!(body_timeout(&other).is_none());
    }
}
