//! `exposure --probe`: what a listener on this node answers without credentials — the
//! question `nmap --script ssl-cert,http-title` asks, and nothing beyond it: a TLS
//! handshake (the certificate is read, not trusted) and one GET per path in [`PATHS`].

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, SignatureScheme,
};
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    time::timeout,
};
use tokio_rustls::TlsConnector;

/// The unauthenticated GETs made on each listener.
pub const PATHS: &[&str] = &[
    "/healthz",
    "/version",
    "/metrics",
    "/pods",
    "/configz",
    "/api/v1/namespaces",
];

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Certificate {
    pub subject: String,
    pub issuer: String,
    /// DNS names and IP addresses (`kubernetes.default.svc`, `10.96.0.1`, …).
    pub sans: Vec<String>,
    pub not_after: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PathResult {
    pub path: &'static str,
    /// The HTTP status, or absent when no HTTP answer came (see `error`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeResult {
    /// The address connected to (a wildcard listener is probed on loopback).
    pub target: SocketAddr,
    pub tls: bool,
    /// The server asked for a client certificate (mutual TLS, as etcd with
    /// `--client-cert-auth` and the kubelet with `--client-ca-file` do).
    pub client_certificate_requested: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<Certificate>,
    pub paths: Vec<PathResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ProbeResult {
    /// The status `path` answered with, if it answered.
    pub fn status(&self, path: &str) -> Option<u16> {
        self.paths.iter().find(|p| p.path == path)?.status
    }
}

/// Where to connect for a listener bound to `addr`.
pub fn target(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

pub async fn probe(listener: SocketAddr) -> ProbeResult {
    let target = target(listener);
    let mut result = ProbeResult {
        target,
        tls: false,
        client_certificate_requested: false,
        certificate: None,
        paths: Vec::new(),
        error: None,
    };
    let asked = Arc::new(CertificateRequests::default());
    let connector = TlsConnector::from(Arc::new(client_config(Arc::clone(&asked))));
    // TLS or plain: try the handshake once.
    match connect(target).await {
        Ok(stream) => match timeout(
            REQUEST_TIMEOUT,
            connector.connect(server_name(target), stream),
        )
        .await
        {
            Ok(Ok(mut tls)) => {
                result.tls = true;
                result.certificate = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|der| parse_certificate(der));
                // Under TLS 1.3 a refused client certificate shows only after the
                // handshake: give the server a moment to say so.
                let mut byte = [0u8; 1];
                let _ = timeout(Duration::from_millis(300), tls.read(&mut byte)).await;
            }
            // A handshake that failed after a certificate request is still TLS.
            Ok(Err(_)) => result.tls = asked.any(),
            Err(_) => result.tls = false,
        },
        Err(e) => {
            result.error = Some(format!("connect: {e}"));
            return result;
        }
    }
    for &path in PATHS {
        let answer = if result.tls {
            async {
                let stream = connect(target).await?;
                let tls = timeout(
                    REQUEST_TIMEOUT,
                    connector.connect(server_name(target), stream),
                )
                .await
                .map_err(|_| std::io::Error::other("TLS handshake timed out"))??;
                get(tls, target, path).await
            }
            .await
        } else {
            async { get(connect(target).await?, target, path).await }.await
        };
        result.paths.push(match answer {
            Ok(status) => PathResult {
                path,
                status: Some(status),
                error: None,
            },
            Err(e) => PathResult {
                path,
                status: None,
                error: Some(e.to_string()),
            },
        });
    }
    result.client_certificate_requested = asked.any();
    result
}

async fn connect(target: SocketAddr) -> std::io::Result<TcpStream> {
    timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

fn server_name(target: SocketAddr) -> ServerName<'static> {
    ServerName::IpAddress(target.ip().into())
}

/// One `GET path` with no credentials; the status code of the answer.
async fn get<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    target: SocketAddr,
    path: &str,
) -> std::io::Result<u16> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: k8s-ebpf-exposure-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    timeout(REQUEST_TIMEOUT, async {
        stream.write_all(request.as_bytes()).await?;
        let mut head = Vec::with_capacity(256);
        let mut buf = [0u8; 256];
        // The status line is all we need; read until it is complete (bounded).
        while !head.contains(&b'\n') && head.len() < 4096 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        parse_status(&head).ok_or_else(|| std::io::Error::other("no HTTP answer"))
    })
    .await
    .map_err(|_| std::io::Error::other("request timed out"))?
}

fn parse_status(head: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(head).ok()?.lines().next()?;
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

fn parse_certificate(der: &CertificateDer<'_>) -> Option<Certificate> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => sans.push((*d).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                    4 => sans.push(IpAddr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                    16 => sans.push(IpAddr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Some(Certificate {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        sans,
        not_after: cert.validity().not_after.to_string(),
    })
}

fn client_config(asked: Arc<CertificateRequests>) -> ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ReadOnly(provider)))
        .with_client_cert_resolver(asked)
}

/// Notes whether the server asked for a client certificate; never offers one.
#[derive(Debug, Default)]
struct CertificateRequests(std::sync::atomic::AtomicBool);

impl CertificateRequests {
    fn any(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl rustls::client::ResolvesClientCert for CertificateRequests {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

/// Accepts any certificate: the probe reads what a listener presents to anyone; it never
/// trusts it, sends no credentials and reads nothing but status lines.
#[derive(Debug)]
struct ReadOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for ReadOnly {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 401 Unauthorized\r\n"), Some(401));
        assert_eq!(
            parse_status(b"HTTP/1.0 200 OK\r\nContent-Length: 0"),
            Some(200)
        );
        assert_eq!(parse_status(b"\x15\x03\x01\x00\x02\x02\x46"), None);
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n"), None);
    }

    #[test]
    fn wildcards_are_probed_on_loopback() {
        assert_eq!(
            target("0.0.0.0:10255".parse().unwrap()),
            "127.0.0.1:10255".parse().unwrap()
        );
        assert_eq!(
            target("[::]:6443".parse().unwrap()),
            "[::1]:6443".parse().unwrap()
        );
        assert_eq!(
            target("192.0.2.1:2379".parse().unwrap()),
            "192.0.2.1:2379".parse().unwrap()
        );
    }
}
