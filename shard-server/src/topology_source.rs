//! Where a process gets its topology from, and how it follows changes. The file source (local mode)
//! watches the file's directory and re-reads on change, with a slow poll as a safety net; the
//! ConfigMap source (Kubernetes) watches one ConfigMap through the API, since a mounted ConfigMap
//! lags by up to a minute; the URL source (local mode with every process in a network namespace of
//! its own) long-polls the operator's `GET /topology?after=EPOCH`, so that a process cut off from
//! the operator stops learning changes, as it would in a cluster. Does I/O.
//!
//! Readers see the document through a `watch` channel: swapping is atomic, a document that fails to
//! parse is logged and ignored, and a document whose epoch is not newer than the current one is
//! ignored, so a stale write can never move a reader backwards.

use crate::topology::Topology;
use notify::{RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub type TopologyRx = watch::Receiver<Option<Arc<Topology>>>;

/// How often the file is re-read even without a change notification.
const POLL: Duration = Duration::from_secs(2);

/// Writes the document atomically (temporary file + rename), so readers never see half a file.
pub fn write_atomic(path: &Path, topology: &Topology) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, topology.to_json_pretty())?;
    std::fs::rename(&tmp, path)
}

/// A topology that never changes (tests, or a process started without a source).
pub fn fixed(topology: Option<Topology>) -> TopologyRx {
    let (tx, rx) = watch::channel(topology.map(Arc::new));
    // Keep the sender alive for the life of the process so receivers never see a closed channel.
    std::mem::forget(tx);
    rx
}

/// Follows a topology file. A missing file means "no topology yet" and is waited for.
pub fn watch_file(path: PathBuf) -> TopologyRx {
    watch_file_counting(path, Arc::default())
}

/// [`watch_file`], counting each time the file is read (tests use it to see the watcher idle).
fn watch_file_counting(path: PathBuf, reads: Arc<std::sync::atomic::AtomicU64>) -> TopologyRx {
    let (tx, rx) = watch::channel(None);
    let tx = Arc::new(tx);
    reload(&path, &tx);
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::channel::<()>(1);
    let file_name = path.file_name().map(|n| n.to_owned());
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Only changes count: reading the file raises access events, and reacting to those would
        // make every process that follows the file re-read it in an endless loop.
        if let Ok(ev) = res
            && !matches!(ev.kind, notify::EventKind::Access(_))
            && ev.paths.iter().any(|p| p.file_name() == file_name.as_deref())
        {
            let _ = ev_tx.try_send(());
        }
    });
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let watcher = match watcher {
        Ok(mut w) => match w.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch topology directory; polling only");
                None
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "no file watcher; polling the topology file only");
            None
        }
    };
    tokio::spawn(async move {
        let mut notified = watcher.is_some();
        let _keep = watcher;
        loop {
            if notified {
                tokio::select! {
                    ev = ev_rx.recv() => notified = ev.is_some(),
                    _ = tokio::time::sleep(POLL) => {}
                }
            } else {
                // No watcher (or it went away): the poll alone drives reloads.
                tokio::time::sleep(POLL).await;
            }
            reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            reload(&path, &tx);
        }
    });
    rx
}

fn reload(path: &Path, tx: &watch::Sender<Option<Arc<Topology>>>) {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read topology");
            return;
        }
    };
    match Topology::parse(&bytes) {
        Ok(t) => offer(tx, t),
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "ignoring invalid topology"),
    }
}

/// How long the URL source waits for one answer: the server holds a poll for about 10 s.
pub const URL_POLL_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed poll before the next.
const URL_RETRY: Duration = Duration::from_millis(250);

/// Follows the document served at `url` (`GET url?after=EPOCH`: the document once one newer than
/// `EPOCH` exists, or 204 after a while), asking with `http` (which presents this process's
/// credentials: the endpoint answers the database's components alone, and should time out after
/// [`URL_POLL_TIMEOUT`]). Until the first answer there is no topology.
pub fn watch_url(url: String, http: reqwest::Client) -> TopologyRx {
    let (tx, rx) = watch::channel::<Option<Arc<Topology>>>(None);
    tokio::spawn(async move {
        loop {
            let after = tx.borrow().as_ref().map(|t| t.epoch);
            let req = match after {
                Some(epoch) => http.get(format!("{url}?after={epoch}")),
                None => http.get(&url),
            };
            let outcome = async {
                let resp = req.send().await?.error_for_status()?;
                if resp.status() == reqwest::StatusCode::NO_CONTENT {
                    return Ok(None);
                }
                resp.bytes().await.map(Some)
            }
            .await;
            match outcome {
                Ok(Some(body)) => match Topology::parse(&body) {
                    Ok(t) => offer(&tx, t),
                    Err(e) => {
                        tracing::warn!(%url, error = %e, "ignoring invalid topology");
                        tokio::time::sleep(URL_RETRY).await;
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(%url, error = %e, "topology poll failed; retrying");
                    tokio::time::sleep(URL_RETRY).await;
                }
            }
        }
    });
    rx
}

/// The ConfigMap key holding the document (the operator writes it).
pub const CONFIGMAP_KEY: &str = "topology.json";

/// Follows the `topology.json` key of one ConfigMap through a watch (selected by name, so the
/// pod needs read access to that ConfigMap only). Until it exists there is no topology; the
/// watcher reconnects with backoff on errors.
pub fn watch_configmap(client: kube::Client, namespace: &str, name: &str) -> TopologyRx {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::{WatchStreamExt, watcher};

    let (tx, rx) = watch::channel(None);
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let source = format!("{namespace}/{name}");
    tokio::spawn(async move {
        let mut objects = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
        while let Some(item) = objects.next().await {
            match item {
                Ok(cm) => match cm.data.as_ref().and_then(|d| d.get(CONFIGMAP_KEY)) {
                    Some(json) => match Topology::parse(json.as_bytes()) {
                        Ok(t) => offer(&tx, t),
                        Err(e) => tracing::warn!(configmap = %source, error = %e, "ignoring invalid topology"),
                    },
                    None => tracing::warn!(configmap = %source, "ConfigMap has no {CONFIGMAP_KEY}"),
                },
                Err(e) => tracing::warn!(configmap = %source, error = %e, "topology watch failed; retrying"),
            }
        }
    });
    rx
}

/// Parses `NAMESPACE/NAME` (the `--topology-configmap` flag).
pub fn parse_configmap_ref(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
    }
}

/// Publishes `t` if it is newer than what readers hold. Shared by every source.
pub fn offer(tx: &watch::Sender<Option<Arc<Topology>>>, t: Topology) {
    let epoch = t.epoch;
    let published = tx.send_if_modified(|cur| match cur {
        Some(c) if c.epoch >= epoch => false,
        _ => {
            *cur = Some(Arc::new(t));
            true
        }
    });
    if published {
        tracing::info!(epoch, "topology loaded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::tests::sample;

    #[tokio::test]
    async fn reading_the_file_does_not_trigger_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("topology.json");
        write_atomic(&path, &sample()).unwrap();
        let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let _rx = watch_file_counting(path.clone(), reads.clone());
        // Other processes read the same file all the time; none of that is a change.
        for _ in 0..50 {
            std::fs::read(&path).unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let n = reads.load(std::sync::atomic::Ordering::Relaxed);
        // One poll may fall into the window; a feedback loop re-reads hundreds of times.
        assert!(n <= 2, "the file was re-read {n} times without changing");
    }

    #[tokio::test]
    async fn follows_the_file_and_never_goes_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("topology.json");
        let mut rx = watch_file(path.clone());
        assert!(rx.borrow().is_none(), "no file yet");

        let mut t = sample();
        write_atomic(&path, &t).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed()).await.unwrap().unwrap();
        assert_eq!(rx.borrow().as_ref().unwrap().epoch, 3);

        // Garbage is ignored; the next good document is taken.
        std::fs::write(&path, b"{ not json").unwrap();
        // A newer epoch is taken.
        t.epoch = 4;
        write_atomic(&path, &t).unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                rx.changed().await.unwrap();
                if rx.borrow().as_ref().unwrap().epoch == 4 {
                    break;
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(rx.borrow().as_ref().unwrap().epoch, 4);
    }

    /// A tiny stand-in for the operator's endpoint: serves `doc` once its epoch is past `after`,
    /// else answers 204 at once.
    async fn serve_topology(doc: Arc<std::sync::Mutex<Topology>>) -> String {
        use axum::extract::{Query, State};
        use axum::response::IntoResponse;
        #[derive(serde::Deserialize)]
        struct Q {
            after: Option<u64>,
        }
        async fn get(
            State(doc): State<Arc<std::sync::Mutex<Topology>>>,
            Query(q): Query<Q>,
        ) -> axum::response::Response {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let t = doc.lock().unwrap().clone();
            if q.after.is_some_and(|a| t.epoch <= a) {
                return axum::http::StatusCode::NO_CONTENT.into_response();
            }
            t.to_json_pretty().into_response()
        }
        let app = axum::Router::new().route("/topology", axum::routing::get(get)).with_state(doc);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/topology", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    #[tokio::test]
    async fn follows_a_url() {
        crate::api::install_crypto_provider();
        let doc = Arc::new(std::sync::Mutex::new(sample()));
        let url = serve_topology(doc.clone()).await;
        let mut rx = watch_url(url, crate::api::http_client(URL_POLL_TIMEOUT));
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|t| t.is_some())).await.unwrap().unwrap();
        assert_eq!(rx.borrow().as_ref().unwrap().epoch, 3);
        doc.lock().unwrap().epoch = 9;
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|t| t.as_ref().is_some_and(|t| t.epoch == 9)))
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn offers_only_move_forward() {
        let (tx, rx) = watch::channel(None);
        let mut t = sample();
        offer(&tx, t.clone());
        t.epoch = 2;
        offer(&tx, t.clone());
        assert_eq!(rx.borrow().as_ref().unwrap().epoch, 3, "an older epoch is ignored");
        t.epoch = 3;
        t.shards.pop();
        offer(&tx, t.clone());
        assert_eq!(rx.borrow().as_ref().unwrap().shards.len(), 2, "the same epoch is not taken twice");
        t.epoch = 4;
        offer(&tx, t);
        assert_eq!(rx.borrow().as_ref().unwrap().epoch, 4);
    }
}
