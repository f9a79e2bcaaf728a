//! Serving an axum application over HTTP/1.1 with the limits production HTTP servers apply, so
//! that no client can hold a connection, or many connections, forever. Shared by the shard server
//! and the router. Does I/O (accepts and serves connections).
//!
//! - **Connections**: at most `max_connections` are served at once. Past that the listener stops
//!   accepting (new connections wait in the kernel's backlog) until one closes, as nginx does when
//!   its worker connections are used up; the limit bounds the memory and tasks clients can cost.
//! - **Header timeout** (hyper's `header_read_timeout`): a request's head must be complete within
//!   this long after the server starts waiting for it (the connection opened, or the previous
//!   response was sent). Headers trickled one line at a time, or never finished, end the
//!   connection here.
//! - **Idle timeout**: a connection on which no byte moves, in either direction, for this long
//!   while no request of it is being handled is closed: idle between requests (keep-alive), or a
//!   client that stopped reading its answer. A request being handled is bounded by its own limits
//!   instead (an `/init` may take a minute). Clients' pools keep idle connections for less
//!   (`api::http_client`: 30 s), so a pooled connection is never reused just as the server drops
//!   it.
//! - **Body timeout** is enforced where bodies are read (the JSON body extractors): a body must
//!   have arrived in full within this long, however slowly it trickles (or stalls: a chunked body
//!   that stops, a `Content-Length` whose bytes never come), or the request is answered 408 in the
//!   error shape.

use crate::tls::TlsPeer;
use axum::Router;
use axum::extract::connect_info::ConnectInfo;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

/// The flags that set [`ServeLimits`], shared by the binaries that serve HTTP.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// How long a request's head may take to arrive, counted from when the server starts waiting
    /// for it (the connection opened, or the previous answer was sent), e.g. `75s`.
    #[arg(long, env = "SHARDDB_HEADER_TIMEOUT", default_value = "75s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// How long a request's body may take to arrive in full; a slower one is answered 408.
    #[arg(long, env = "SHARDDB_BODY_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub body_timeout: Duration,
    /// How long a connection may stay open with no byte moving while none of its requests is
    /// being handled (idle keep-alive, or a client that stopped reading its answer).
    #[arg(long, env = "SHARDDB_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Connections served at once; further ones wait to be accepted until one closes.
    #[arg(long, env = "SHARDDB_MAX_CONNECTIONS", default_value_t = ServeLimits::DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
}

impl ServeArgs {
    pub fn limits(&self) -> ServeLimits {
        ServeLimits {
            header_timeout: self.header_timeout,
            body_timeout: self.body_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections as usize,
        }
    }
}

/// Parses `250ms`, `10s`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 10s, 500ms)"))?;
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        u => Err(format!("unknown duration unit {u:?} (use ms, s or m)")),
    }
}

/// The limits of one HTTP server (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeLimits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl ServeLimits {
    pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(75);
    pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
}

/// How long shutting down waits for requests in flight before dropping their connections.
const DRAIN: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` under `limits` until `shutdown` resolves; then stops accepting, lets
/// requests in flight finish (at most [`DRAIN`]) and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve_with(listener, app, limits, None, shutdown).await
}

/// As [`serve`], over TLS with `config`: each connection's handshake runs in its own task within
/// the connection's slot (bounded by [`crate::tls::listener::HANDSHAKE_TIMEOUT`]), and every
/// request carries the peer ([`TlsPeer`], as `ConnectInfo`) that `crate::auth` checks.
pub async fn serve_tls(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    config: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve_with(listener, app, limits, Some((TlsAcceptor::from(config), false)), shutdown).await
}

/// As [`serve_tls`], and plain HTTP on the same port (`--internal-auth=migrate`): the first byte
/// of each connection decides, `0x16` (a TLS handshake record) for TLS. A plain connection's
/// requests carry no [`TlsPeer`], which is how `crate::auth` tells them apart. The wait for that
/// byte is bounded by the header timeout, as a request's headers are.
pub async fn serve_migrate(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    config: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve_with(listener, app, limits, Some((TlsAcceptor::from(config), true)), shutdown).await
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM, how Kubernetes and the local supervisor stop a
/// process: the signal every binary's graceful stop starts from. Without a SIGTERM handler (it
/// could not be installed) only Ctrl-C stops it, and a warning says so.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The first byte of every TLS connection: the record type of a handshake.
const TLS_HANDSHAKE: u8 = 0x16;

/// Whether the connection starts with a TLS handshake; `None` when no byte came within `wait`
/// (or the peer went away).
async fn starts_with_tls(tcp: &TcpStream, wait: Duration) -> Option<bool> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(wait, tcp.peek(&mut first)).await {
        Ok(Ok(1)) => Some(first[0] == TLS_HANDSHAKE),
        _ => None,
    }
}

/// `tls`: the acceptor, and whether plain HTTP is served beside it.
async fn serve_with(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    tls: Option<(TlsAcceptor, bool)>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = Arc::clone(&slots).acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (tcp, addr) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let app = app.clone();
        let stop = stop_rx.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let busy = Arc::new(AtomicUsize::new(0));
            let tls = match tls {
                Some((acceptor, true)) => match starts_with_tls(&tcp, limits.header_timeout).await {
                    Some(true) => Some(acceptor),
                    Some(false) => None,
                    None => return,
                },
                Some((acceptor, false)) => Some(acceptor),
                None => None,
            };
            let io = IdleTimeout::new(tcp, limits.idle_timeout, Arc::clone(&busy));
            match tls {
                None => connection(io, app, None, busy, limits, stop).await,
                Some(acceptor) => {
                    let Some((stream, peer)) = crate::tls::listener::handshake(acceptor, io, addr).await else {
                        return;
                    };
                    connection(stream, app, Some(peer), busy, limits, stop).await
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a slot until it ends: holding them all means every one has ended.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN, slots.acquire_many(all)).await.is_err() {
        tracing::warn!("connections still open after {DRAIN:?}; stopping anyway");
    }
    Ok(())
}

/// Serves one connection's requests until it ends or the server stops.
async fn connection<Io>(
    io: Io,
    app: Router,
    peer: Option<TlsPeer>,
    busy: Arc<AtomicUsize>,
    limits: ServeLimits,
    mut stop: watch::Receiver<bool>,
) where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let app = TowerToHyperService::new(app);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let guard = Busy::enter(&busy);
        if let Some(peer) = &peer {
            req.extensions_mut().insert(ConnectInfo(peer.clone()));
        }
        let answer = hyper::service::Service::call(&app, req);
        async move {
            let r = answer.await;
            drop(guard);
            r
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Counts a connection's requests being handled while it lives.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn enter(count: &Arc<AtomicUsize>) -> Busy {
        count.fetch_add(1, Ordering::AcqRel);
        Busy(Arc::clone(count))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A TCP stream that fails with `TimedOut` once no byte has moved for `timeout` while none of its
/// requests is being handled (`busy` is zero).
struct IdleTimeout {
    io: TcpStream,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    busy: Arc<AtomicUsize>,
}

impl IdleTimeout {
    fn new(io: TcpStream, timeout: Duration, busy: Arc<AtomicUsize>) -> IdleTimeout {
        IdleTimeout { io, timeout, deadline: Box::pin(tokio::time::sleep(timeout)), busy }
    }

    fn moved(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.timeout);
    }

    /// Ready with the error once the deadline passed with no request being handled; while one is,
    /// the deadline moves on (the request's own limits apply).
    fn expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            ready!(self.deadline.as_mut().poll(cx));
            if self.busy.load(Ordering::Acquire) == 0 {
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "connection idle for too long"));
            }
            self.moved();
        }
    }
}

impl AsyncRead for IdleTimeout {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.expired(cx).map(Err),
        }
    }
}

impl AsyncWrite for IdleTimeout {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write(cx, data) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.moved();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.expired(cx).map(Err),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.moved();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.expired(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn flags_have_the_documented_defaults() {
        let limits = Flags::try_parse_from(["x"]).unwrap().serve.limits();
        assert_eq!(
            limits,
            ServeLimits {
                header_timeout: Duration::from_secs(75),
                body_timeout: Duration::from_secs(60),
                idle_timeout: Duration::from_secs(60),
                max_connections: 1024,
            }
        );
        let f =
            Flags::try_parse_from(["x", "--header-timeout", "2s", "--body-timeout", "500ms", "--max-connections", "8"]);
        let limits = f.unwrap().serve.limits();
        assert_eq!(
            (limits.header_timeout, limits.body_timeout, limits.max_connections),
            (Duration::from_secs(2), Duration::from_millis(500), 8)
        );
        assert!(Flags::try_parse_from(["x", "--max-connections", "0"]).is_err());
        assert!(Flags::try_parse_from(["x", "--idle-timeout", "5h"]).is_err());
    }
}
