//! Serving axum over TLS: a listener whose connections are TLS streams, with the peer's verified
//! identity as the connection's info. Does I/O (sockets).
//!
//! Handshakes run in their own tasks, at most [`MAX_HANDSHAKES`] at once and each for at most
//! [`HANDSHAKE_TIMEOUT`], so a client that opens a connection and says nothing holds up neither
//! other clients nor the accept loop. A failed handshake (a certificate of another CA, plain
//! HTTP sent to a TLS port) is logged at debug level and the connection dropped: nothing of it
//! reaches the application.

use super::identity::Identity;
use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Longest a client may take to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once; further connections wait in the kernel's backlog.
pub const MAX_HANDSHAKES: usize = 256;

/// Who is at the other end of a connection: its address and, when it presented a certificate of
/// the trusted CA that names one, its identity.
#[derive(Clone, Debug)]
pub struct TlsPeer {
    pub addr: SocketAddr,
    pub identity: Option<Arc<Identity>>,
}

/// Accepts TCP connections from `inner` and completes a TLS handshake on each.
pub struct TlsListener<L: Listener> {
    inner: L,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(TlsStream<L::Io>, TlsPeer)>>,
}

impl<L> TlsListener<L>
where
    L: Listener<Addr = SocketAddr>,
{
    pub fn new(inner: L, config: Arc<rustls::ServerConfig>) -> Self {
        TlsListener { inner, acceptor: TlsAcceptor::from(config), handshakes: JoinSet::new() }
    }
}

/// Completes the TLS handshake on `io` (within [`HANDSHAKE_TIMEOUT`]); the stream and the peer's
/// identity, or `None` (logged) when it failed.
pub(crate) async fn handshake<Io>(acceptor: TlsAcceptor, io: Io, addr: SocketAddr) -> Option<(TlsStream<Io>, TlsPeer)>
where
    Io: AsyncRead + AsyncWrite + Unpin,
{
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!(peer = %addr, "TLS handshake timed out");
            return None;
        }
    };
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|cert| Identity::from_certificate(cert).ok())
        .map(Arc::new);
    Some((stream, TlsPeer { addr, identity }))
}

impl<L> Listener for TlsListener<L>
where
    L: Listener<Addr = SocketAddr>,
    L::Io: Send,
{
    type Io = TlsStream<L::Io>;
    type Addr = TlsPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            if self.handshakes.len() >= MAX_HANDSHAKES {
                if let Some(Ok(Some(done))) = self.handshakes.join_next().await {
                    return done;
                }
                continue;
            }
            tokio::select! {
                (io, addr) = self.inner.accept() => {
                    self.handshakes.spawn(handshake(self.acceptor.clone(), io, addr));
                }
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(done)) = done {
                        return done;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(TlsPeer { addr: self.inner.local_addr()?, identity: None })
    }
}

impl<L> Connected<IncomingStream<'_, TlsListener<L>>> for TlsPeer
where
    L: Listener<Addr = SocketAddr>,
    L::Io: Send,
{
    fn connect_info(stream: IncomingStream<'_, TlsListener<L>>) -> Self {
        stream.remote_addr().clone()
    }
}
