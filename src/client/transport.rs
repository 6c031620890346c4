//! Opening the client's socket: TCP, optional TLS with a chosen CA, and the
//! WebSocket upgrade with an optional `Authorization` header and the
//! subprotocol of the chosen encoding.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, pki_types::ServerName};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self};

use super::{ClientError, TlsError, UrlError};
use crate::protocol::Encoding;

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// PEM CA certificate to trust for `wss://` (e.g. a local dev CA).
    /// Without it, the system's roots are used.
    pub ca_cert: Option<PathBuf>,
    /// Sent as the upgrade's `Authorization` header, e.g. `Bearer …`.
    pub authorization: Option<String>,
    /// Pushes buffered before the client stops reading the socket.
    pub event_buffer: usize,
    /// Local address to connect from (load tests spread source addresses).
    pub bind: Option<std::net::IpAddr>,
    /// The frames' encoding. `Proto` asks for no subprotocol (the server's
    /// default, as for any client that does not ask); `Json` asks for
    /// `relay.v1.json`.
    pub encoding: Encoding,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            ca_cert: None,
            authorization: None,
            event_buffer: 4096,
            bind: None,
            encoding: Encoding::Proto,
        }
    }
}

pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub(super) type Socket = WebSocketStream<Box<dyn Io>>;

pub(super) async fn connect(
    url: &str,
    options: &ConnectOptions,
) -> Result<(Socket, HashMap<String, String>), ClientError> {
    let parsed = url::Url::parse(url).map_err(UrlError::Parse)?;
    let tls = match parsed.scheme() {
        "ws" => false,
        "wss" => true,
        other => return Err(UrlError::Scheme(other.to_owned()).into()),
    };
    let host = parsed.host_str().ok_or(UrlError::MissingHost)?.to_owned();
    let port = parsed
        .port_or_known_default()
        .ok_or(UrlError::MissingPort)?;
    let addr = format!("{host}:{port}");
    let tcp = tcp_connect(&host, port, options.bind)
        .await
        .map_err(|source| ClientError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = if tls {
        let connector = tls_connector(options.ca_cert.as_ref())?;
        let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
            .map_err(TlsError::ServerName)?;
        Box::new(
            connector
                .connect(name, tcp)
                .await
                .map_err(TlsError::Handshake)?,
        )
    } else {
        Box::new(tcp)
    };
    let mut request = url.into_client_request().map_err(UrlError::Request)?;
    if let Some(auth) = &options.authorization {
        let value = HeaderValue::from_str(auth).map_err(UrlError::Authorization)?;
        request.headers_mut().insert("authorization", value);
    }
    if options.encoding != Encoding::Proto {
        // tungstenite checks that the answer names the same subprotocol.
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(options.encoding.subprotocol()),
        );
    }
    let config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(16 * 1024)
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20));
    match tokio_tungstenite::client_async_with_config(request, io, Some(config)).await {
        Ok((ws, response)) => {
            let headers = response
                .headers()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                .collect();
            Ok((ws, headers))
        }
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).trim().to_owned())
                .unwrap_or_default();
            Err(ClientError::Http { status, body })
        }
        Err(err) => Err(ClientError::WebSocket(err)),
    }
}

async fn tcp_connect(
    host: &str,
    port: u16,
    bind: Option<std::net::IpAddr>,
) -> std::io::Result<TcpStream> {
    let Some(local) = bind else {
        return TcpStream::connect((host, port)).await;
    };
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(std::net::SocketAddr::new(local, 0))?;
        match socket.connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no address")))
}

fn tls_connector(ca: Option<&PathBuf>) -> Result<TlsConnector, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| TlsError::ReadCa {
                path: path.clone(),
                source,
            })?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots
                    .add(cert.map_err(TlsError::Pem)?)
                    .map_err(TlsError::Config)?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}
