//! The load generator's HTTP/1.1 client: keep-alive connections to one server, each used by one
//! request at a time and put back when its answer has been read.
//!
//! The load generator shares the machine with what it measures, so its own CPU per request is
//! part of every result. reqwest parses the URL, walks a pool keyed by origin and runs its
//! middleware on each request; this sends the same bytes over the same kind of connection
//! (`TCP_NODELAY`, as the router's own clients would set) for less. Does I/O.

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::{Arc, Mutex};

/// Connections to one `host:port`, shared by the load generator's tasks.
#[derive(Clone, Debug)]
pub struct Http1 {
    authority: Arc<str>,
    host: HeaderValue,
    idle: Arc<Mutex<Vec<SendRequest<Full<Bytes>>>>>,
}

impl Http1 {
    /// A client for `base`, an `http://host:port` URL (a trailing `/` is ignored).
    pub fn new(base: &str) -> Result<Http1> {
        let authority = base
            .strip_prefix("http://")
            .with_context(|| format!("{base}: only http:// URLs are supported"))?
            .trim_end_matches('/');
        anyhow::ensure!(!authority.is_empty() && !authority.contains('/'), "{base}: expected http://host:port");
        Ok(Http1 {
            authority: authority.into(),
            host: HeaderValue::from_str(authority).with_context(|| format!("{base}: not a valid host"))?,
            idle: Arc::default(),
        })
    }

    async fn connection(&self) -> Result<SendRequest<Full<Bytes>>> {
        loop {
            let Some(mut c) = self.idle.lock().expect("lock").pop() else { break };
            // A connection the server closed is dropped; `ready` also waits out nothing here,
            // since an idle connection has no request in flight.
            if c.ready().await.is_ok() {
                return Ok(c);
            }
        }
        let tcp = tokio::net::TcpStream::connect(&*self.authority)
            .await
            .with_context(|| format!("connecting to {}", self.authority))?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            // Ends when the sender is dropped or the server closes; a failure shows up in the
            // request that was using it.
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Sends one request and reads its whole answer.
    pub async fn request(&self, method: Method, path: &str, body: Option<Bytes>) -> Result<(StatusCode, Bytes)> {
        let mut c = self.connection().await?;
        let mut req = Request::builder().method(method).uri(path).header(HOST, self.host.clone());
        if body.is_some() {
            req = req.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let req = req.body(Full::new(body.unwrap_or_default()))?;
        let resp = c.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        self.idle.lock().expect("lock").push(c);
        Ok((status, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_origins_are_accepted() {
        assert_eq!(&*Http1::new("http://127.0.0.1:8080/").unwrap().authority, "127.0.0.1:8080");
        for bad in ["https://a:1", "127.0.0.1:80", "http://", "http://a:1/path"] {
            assert!(Http1::new(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn connections_are_reused_and_answers_read_whole() {
        use axum::routing::post;
        let app = axum::Router::new().route("/echo", post(|body: Bytes| async move { body }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&accepted);
        let listener = axum::serve::ListenerExt::tap_io(listener, move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let client = Http1::new(&format!("http://{addr}")).unwrap();
        let big = Bytes::from(vec![b'x'; 200_000]);
        for body in [Bytes::from_static(b"{\"a\":1}"), big.clone(), Bytes::from_static(b"[]")] {
            let (status, got) = client.request(Method::POST, "/echo", Some(body.clone())).await.unwrap();
            assert_eq!(status, StatusCode::OK);
            assert_eq!(got, body);
        }
        let (status, _) = client.request(Method::GET, "/missing", None).await.unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1, "one connection, kept alive");
    }
}
