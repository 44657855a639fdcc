//! The HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process is alive) and
//! `/readyz` (the kernel hooks are attached and a policy is loaded).

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming, header, server::conn::http1, service::service_fn, Method, Request, Response,
    StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::oneshot,
};
use tracing::debug;

use super::Metrics;

/// Where the metrics server listens unless told otherwise.
///
/// Loopback, because `/metrics` is unauthenticated and describes who talks to the
/// node's control-plane ports: published on the node's address it would hand that map
/// to anyone who can reach the node, the very exposure this daemon exists to catch.
/// A DaemonSet that wants in-cluster scraping overrides it (e.g. the pod IP behind a
/// NetworkPolicy, or loopback behind an authenticating proxy sidecar). 9477 sits in the
/// exporters' 9100–9999 range and clears every port the policy watches.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";

/// A slow client gets this long to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections held at once. At the cap a new connection is never made to wait (a waiting
/// health probe is a failing one, and the liveness probe would restart the daemon in a
/// loop): the oldest connection is closed instead. Whoever holds connections open (idle,
/// or dribbling headers) loses them to newer ones; a probe or a scrape sends its request as
/// soon as it connects and is served long before 256 newer connections arrive. 256 is
/// well above any legitimate use (a kubelet's probes and a few scrapers) and, with
/// [`MAX_BUF_BYTES`], bounds what idle connections can cost to a few megabytes.
const MAX_CONNECTIONS: usize = 256;
/// Connections the kernel completes before we accept them. A burst of connects (hundreds
/// at once from one pod) would overflow a 128-deep queue before the accept loop drains it,
/// and a probe whose SYN is dropped waits a second for the retransmit. The kernel caps this
/// at `net.core.somaxconn` (4096 by default since Linux 5.4).
const ACCEPT_BACKLOG: u32 = 1024;
/// Per-connection buffer cap (hyper's minimum; its default is ~400 KiB). Our requests are
/// one short GET line and a Host header.
const MAX_BUF_BYTES: usize = 8192;

/// What `/readyz` waits for, set by the daemon as start-up progresses.
#[derive(Debug, Default)]
pub struct Readiness {
    attached: AtomicBool,
    policy_loaded: AtomicBool,
    /// False while the policy needs Kubernetes identities and they are not synced.
    identities_blocked: AtomicBool,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_attached(&self, yes: bool) {
        self.attached.store(yes, Ordering::Relaxed);
    }

    pub fn set_policy_loaded(&self, yes: bool) {
        self.policy_loaded.store(yes, Ordering::Relaxed);
    }

    /// `blocked`: the policy has selectors and the identity cache is not current (never
    /// synced, or the API is failing).
    pub fn set_identities_blocked(&self, blocked: bool) {
        self.identities_blocked.store(blocked, Ordering::Relaxed);
    }

    /// The conditions not yet met (empty when ready).
    pub fn missing(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if !self.attached.load(Ordering::Relaxed) {
            m.push("attached");
        }
        if !self.policy_loaded.load(Ordering::Relaxed) {
            m.push("policy_loaded");
        }
        if self.identities_blocked.load(Ordering::Relaxed) {
            m.push("kubernetes_identities");
        }
        m
    }

    pub fn is_ready(&self) -> bool {
        self.missing().is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsServerError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// A bound, not yet running, metrics server.
pub struct MetricsServer {
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

impl MetricsServer {
    pub async fn bind(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
    ) -> Result<Self, MetricsServerError> {
        let listener = listen(addr).map_err(|source| MetricsServerError::Bind { addr, source })?;
        Ok(Self {
            listener,
            metrics,
            readiness,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes; connections in flight finish on their own.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let open = OpenConnections::default();
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => return,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        debug!(error = %e, "metrics accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let (id, evicted) = open.admit();
            let metrics = Arc::clone(&self.metrics);
            let readiness = Arc::clone(&self.readiness);
            let open = open.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let r = respond(&req, &metrics, &readiness);
                    async move { Ok::<_, Infallible>(r) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .max_buf_size(MAX_BUF_BYTES)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    served = connection => {
                        if let Err(e) = served {
                            debug!(%peer, error = %e, "metrics connection ended with an error");
                        }
                    }
                    // Dropping the connection closes it.
                    _ = evicted => debug!(%peer, "metrics connection closed for a newer one"),
                }
                open.release(id);
            });
        }
    }
}

/// A listening socket with room for [`ACCEPT_BACKLOG`] connections not yet accepted.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// The connections being served, oldest first, each with the means to close it.
#[derive(Clone, Default)]
struct OpenConnections {
    inner: Arc<std::sync::Mutex<OpenInner>>,
}

#[derive(Default)]
struct OpenInner {
    next_id: u64,
    /// By id, which grows with every accept: the first entry is the oldest.
    live: std::collections::BTreeMap<u64, oneshot::Sender<()>>,
}

impl OpenConnections {
    /// Registers a new connection, closing the oldest when at [`MAX_CONNECTIONS`]. Returns
    /// its id and what resolves when it is closed for a newer one.
    fn admit(&self) -> (u64, oneshot::Receiver<()>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while inner.live.len() >= MAX_CONNECTIONS {
            if let Some((_, close)) = inner.live.pop_first() {
                let _ = close.send(());
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let (close, closed) = oneshot::channel();
        inner.live.insert(id, close);
        (id, closed)
    }

    fn release(&self, id: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.live.remove(&id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .live
            .len()
    }
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn respond(
    req: &Request<Incoming>,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "method not allowed\n",
        );
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.encode_text(),
        ),
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n"),
        "/readyz" => {
            let missing = readiness.missing();
            if missing.is_empty() {
                text(StatusCode::OK, PLAIN, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    format!("not ready: missing {}\n", missing.join(", ")),
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.expect("read");
        let status = buf
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status line");
        let body = buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        (status, body)
    }

    #[test]
    fn default_address_is_loopback() {
        let a: SocketAddr = DEFAULT_METRICS_ADDR.parse().expect("valid");
        assert!(a.ip().is_loopback());
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let metrics = Arc::new(Metrics::new());
        let readiness = Arc::new(Readiness::new());
        let server = MetricsServer::bind(
            "127.0.0.1:0".parse().expect("addr"),
            Arc::clone(&metrics),
            Arc::clone(&readiness),
        )
        .await
        .expect("bind");
        let addr = server.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));

        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("attached, policy_loaded"), "{body}");
        readiness.set_attached(true);
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(
            (code, body.trim()),
            (503, "not ready: missing policy_loaded")
        );
        readiness.set_policy_loaded(true);
        assert_eq!(get(addr, "/readyz").await.0, 200);

        metrics.decode_errors.inc();
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("k8s_ebpf_decode_errors_total 1"), "{body}");
        assert_eq!(get(addr, "/nope").await.0, 404);

        let _ = stop.send(());
        task.await.expect("server stops");
    }

    #[test]
    fn the_oldest_connection_makes_room() {
        let open = OpenConnections::default();
        let mut first = open.admit().1;
        let mut rest: Vec<_> = (1..MAX_CONNECTIONS).map(|_| open.admit()).collect();
        assert_eq!(open.len(), MAX_CONNECTIONS);
        assert!(first.try_recv().is_err(), "nothing closed below the cap");
        let (newest, _) = open.admit();
        assert_eq!(open.len(), MAX_CONNECTIONS);
        assert!(first.try_recv().is_ok(), "the oldest is told to close");
        assert!(rest[0].1.try_recv().is_err(), "the second oldest stays");
        open.release(newest);
        assert_eq!(open.len(), MAX_CONNECTIONS - 1);
    }

    /// Idle connections (connected, never a request) cannot starve the health endpoint:
    /// with 300 held open, `/healthz` and `/readyz` still answer, each within 1 s.
    #[tokio::test]
    async fn health_answers_while_300_idle_connections_are_held() {
        let readiness = Arc::new(Readiness::new());
        readiness.set_attached(true);
        readiness.set_policy_loaded(true);
        let server = MetricsServer::bind(
            "127.0.0.1:0".parse().expect("addr"),
            Arc::new(Metrics::new()),
            readiness,
        )
        .await
        .expect("bind");
        let addr = server.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        let mut idle = Vec::new();
        for _ in 0..300 {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        for path in ["/healthz", "/readyz"] {
            let answer = tokio::time::timeout(Duration::from_secs(1), get(addr, path)).await;
            assert!(
                matches!(answer, Ok((200, _))),
                "{path} with 300 idle connections held: {answer:?}"
            );
        }
        drop(idle);
        let _ = stop.send(());
        task.await.expect("server stops");
    }

    #[tokio::test]
    async fn bind_failure_names_the_address() {
        let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = taken.local_addr().expect("addr");
        let err = MetricsServer::bind(addr, Arc::new(Metrics::new()), Arc::new(Readiness::new()))
            .await
            .err()
            .expect("address in use");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
