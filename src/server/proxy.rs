//! The PROXY protocol (HAProxy's, versions 1 and 2): a TCP load balancer in
//! front of the relay names the client it relays for in a header before the
//! client's own bytes. Without it every client behind the balancer has the
//! balancer's address, and the per-address limits (unauthenticated sockets,
//! password attempts, the Argon2 queue) hold for all of them together.
//!
//! Only peers named in `--proxy-protocol-from` are read for a header, and
//! they must send one: anyone else could name any address. The header is
//! read exactly, never past its end, so what follows it reaches the TLS or
//! WebSocket handshake untouched. A version 2 header states its length; a
//! version 1 line is peeked at and read up to its end (byte by byte only in
//! the rare case that it arrived split).

use std::net::SocketAddr;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// A version 1 header is one line of at most this many bytes, CRLF
/// included (the specification's bound).
const V1_MAX: usize = 107;
/// A version 2 header's fixed part: signature, version and command,
/// family, and the length of the rest.
const V2_FIXED: usize = 16;
/// Most bytes after a version 2 header's fixed part: the addresses (216
/// at most, for UNIX sockets) and the balancer's TLVs. The balancer is
/// trusted, but its header is still bounded.
const V2_REST_MAX: usize = 2048;

/// Why a balancer's connection was dropped before its handshake.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Not the balancer's fault: its client left (or a bare TCP check).
    #[error("the connection closed before sending anything")]
    Closed,
    #[error("reading the PROXY header failed")]
    Io(#[from] std::io::Error),
    #[error("the balancer's connection does not start with a PROXY header")]
    Missing,
    #[error("the PROXY header is longer than allowed")]
    TooLong,
    #[error("malformed PROXY version 1 header")]
    V1(#[source] ppp::v1::BinaryParseError),
    #[error("malformed PROXY version 2 header")]
    V2(#[source] ppp::v2::ParseError),
}

/// Reads the PROXY header a balancer at `peer` put before the client's
/// bytes, and returns the client's address. A header that names no client
/// (version 2 `LOCAL`, the balancer's own health check; version 1
/// `UNKNOWN`; a UNIX socket) leaves the balancer's own.
pub async fn read_client(
    stream: &mut TcpStream,
    peer: SocketAddr,
) -> Result<SocketAddr, ProxyError> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(0) => return Err(ProxyError::Closed),
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {
            return Err(ProxyError::Closed);
        }
        Err(err) => return Err(err.into()),
    }
    match first[0] {
        b'\r' => read_v2(stream, peer).await,
        b'P' => read_v1(stream, peer).await,
        _ => Err(ProxyError::Missing),
    }
}

async fn read_v2(stream: &mut TcpStream, peer: SocketAddr) -> Result<SocketAddr, ProxyError> {
    let mut header = vec![0u8; V2_FIXED];
    stream.read_exact(&mut header).await?;
    if !header.starts_with(ppp::v2::PROTOCOL_PREFIX) {
        return Err(ProxyError::Missing);
    }
    let rest = usize::from(u16::from_be_bytes([header[14], header[15]]));
    if rest > V2_REST_MAX {
        return Err(ProxyError::TooLong);
    }
    header.resize(V2_FIXED + rest, 0);
    stream.read_exact(&mut header[V2_FIXED..]).await?;
    let parsed = ppp::v2::Header::try_from(&header[..]).map_err(ProxyError::V2)?;
    use ppp::v2::{Addresses, Command, Protocol};
    Ok(match (parsed.command, parsed.protocol, parsed.addresses) {
        (Command::Proxy, Protocol::Stream, Addresses::IPv4(a)) => {
            SocketAddr::from((a.source_address, a.source_port))
        }
        (Command::Proxy, Protocol::Stream, Addresses::IPv6(a)) => {
            canonical(SocketAddr::from((a.source_address, a.source_port)))
        }
        // The balancer's own connection (LOCAL: its health check), or one
        // the specification says to take at its real endpoints.
        _ => peer,
    })
}

async fn read_v1(stream: &mut TcpStream, peer: SocketAddr) -> Result<SocketAddr, ProxyError> {
    let mut line = [0u8; V1_MAX];
    let seen = stream.peek(&mut line).await?;
    let len = match line[..seen].windows(2).position(|w| w == b"\r\n") {
        Some(end) => {
            stream.read_exact(&mut line[..end + 2]).await?;
            end + 2
        }
        None => read_line_slowly(stream, &mut line).await?,
    };
    let parsed = ppp::v1::Header::try_from(&line[..len]).map_err(ProxyError::V1)?;
    Ok(match parsed.addresses {
        ppp::v1::Addresses::Tcp4(a) => SocketAddr::from((a.source_address, a.source_port)),
        ppp::v1::Addresses::Tcp6(a) => {
            canonical(SocketAddr::from((a.source_address, a.source_port)))
        }
        ppp::v1::Addresses::Unknown => peer,
    })
}

/// An IPv4 client named in its IPv6 form (`::ffff:a.b.c.d`) is an IPv4
/// client, as it is for the limits, in the logs too.
fn canonical(client: SocketAddr) -> SocketAddr {
    SocketAddr::new(client.ip().to_canonical(), client.port())
}

/// A version 1 line that arrived in pieces: read a byte at a time, so
/// nothing after its end is taken from the stream.
async fn read_line_slowly(
    stream: &mut TcpStream,
    line: &mut [u8; V1_MAX],
) -> Result<usize, ProxyError> {
    for len in 1..=V1_MAX {
        line[len - 1] = stream.read_u8().await?;
        if line[..len].ends_with(b"\r\n") {
            return Ok(len);
        }
    }
    Err(ProxyError::TooLong)
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    /// What the relay reads from a connection that starts with `bytes`,
    /// written in the given pieces, and what is left unread after it.
    async fn read_from(pieces: &[&[u8]]) -> (Result<SocketAddr, ProxyError>, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        client.set_nodelay(true).unwrap();
        let (mut server, peer) = listener.accept().await.unwrap();
        let pieces: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for piece in pieces {
                client.write_all(&piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            client.shutdown().await.unwrap();
            client
        });
        let result = read_client(&mut server, peer).await;
        let _client = writer.await.unwrap();
        let mut rest = Vec::new();
        let _ = server.read_to_end(&mut rest).await;
        (result, rest)
    }

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut header = ppp::v2::PROTOCOL_PREFIX.to_vec();
        header.push(0x20 | command);
        header.push(family);
        header.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        header.extend_from_slice(addresses);
        header
    }

    #[tokio::test]
    async fn version_1_names_the_client_and_leaves_the_rest() {
        let (client, rest) =
            read_from(&[b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n"]).await;
        assert_eq!(client.unwrap(), "203.0.113.7:51234".parse().unwrap());
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        let (client, _) = read_from(&[b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n"]).await;
        assert_eq!(client.unwrap(), "[2001:db8::7]:51234".parse().unwrap());
    }

    #[tokio::test]
    async fn a_version_1_line_split_in_pieces_is_read_to_its_end_only() {
        let (client, rest) = read_from(&[
            b"PROXY TCP4 198.51",
            b".100.9 10.0.0.1 4",
            b"000 443\r",
            b"\nhello",
        ])
        .await;
        assert_eq!(client.unwrap(), "198.51.100.9:4000".parse().unwrap());
        assert_eq!(rest, b"hello");
    }

    /// The path a line split in pieces takes, whatever the timing: it
    /// stops at the line's end.
    #[tokio::test]
    async fn a_line_read_slowly_ends_at_its_crlf() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        client.write_all(b"PROXY UNKNOWN\r\nafter").await.unwrap();
        drop(client);
        let mut line = [0u8; V1_MAX];
        let len = read_line_slowly(&mut server, &mut line).await.unwrap();
        assert_eq!(&line[..len], b"PROXY UNKNOWN\r\n");
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"after");
    }

    #[tokio::test]
    async fn version_2_names_the_client_and_leaves_the_rest() {
        let mut addresses = vec![203, 0, 113, 7, 10, 0, 0, 1];
        addresses.extend_from_slice(&51234u16.to_be_bytes());
        addresses.extend_from_slice(&443u16.to_be_bytes());
        // A TLV after the addresses (PP2_TYPE_AUTHORITY), as HAProxy adds.
        addresses.extend_from_slice(&[0x02, 0x00, 0x03, b'a', b'.', b'b']);
        let mut bytes = v2(0x1, 0x11, &addresses);
        bytes.extend_from_slice(b"\x16\x03\x01");
        let (client, rest) = read_from(&[&bytes]).await;
        assert_eq!(client.unwrap(), "203.0.113.7:51234".parse().unwrap());
        assert_eq!(rest, b"\x16\x03\x01", "the TLS hello after it is untouched");
    }

    #[tokio::test]
    async fn ipv6_clients_and_ipv4_ones_in_ipv6_form() {
        let mut addresses = "2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets()
            .to_vec();
        addresses.extend_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        addresses.extend_from_slice(&[0xc8, 0x22, 0x01, 0xbb]);
        let (client, _) = read_from(&[&v2(0x1, 0x21, &addresses)]).await;
        assert_eq!(client.unwrap(), "[2001:db8::7]:51234".parse().unwrap());
        let (client, _) =
            read_from(&[b"PROXY TCP6 ::ffff:203.0.113.7 ::ffff:10.0.0.1 51234 443\r\n"]).await;
        assert_eq!(client.unwrap(), "203.0.113.7:51234".parse().unwrap());
    }

    #[tokio::test]
    async fn headers_naming_no_client_leave_the_balancers_address() {
        let local = std::net::Ipv4Addr::LOCALHOST;
        let mut ipv4 = vec![203, 0, 113, 7, 10, 0, 0, 1];
        ipv4.extend_from_slice(&[0xc8, 0x22, 0x01, 0xbb]);
        // LOCAL (the balancer's health check), even with addresses.
        let (client, _) = read_from(&[&v2(0x0, 0x11, &ipv4)]).await;
        assert_eq!(client.unwrap().ip(), local);
        // PROXY over an unspecified family, or a datagram transport.
        let (client, _) = read_from(&[&v2(0x1, 0x00, &[])]).await;
        assert_eq!(client.unwrap().ip(), local);
        let (client, _) = read_from(&[&v2(0x1, 0x12, &ipv4)]).await;
        assert_eq!(client.unwrap().ip(), local);
        let (client, _) = read_from(&[b"PROXY UNKNOWN\r\n"]).await;
        assert_eq!(client.unwrap().ip(), local);
    }

    #[tokio::test]
    async fn anything_else_is_an_error() {
        let (missing, _) = read_from(&[b"GET / HTTP/1.1\r\n\r\n"]).await;
        assert!(matches!(missing, Err(ProxyError::Missing)), "{missing:?}");
        let (bad, _) = read_from(&[b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\n"]).await;
        assert!(matches!(bad, Err(ProxyError::V1(_))), "{bad:?}");
        let (endless, _) = read_from(&[&[b'P'; 200]]).await;
        assert!(matches!(endless, Err(ProxyError::TooLong)), "{endless:?}");
        let mut huge = v2(0x1, 0x11, &[]);
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        let (huge, _) = read_from(&[&huge]).await;
        assert!(matches!(huge, Err(ProxyError::TooLong)), "{huge:?}");
        let (cut, _) = read_from(&[b"PROXY TCP4 203.0.113.7"]).await;
        assert!(matches!(cut, Err(ProxyError::Io(_))), "{cut:?}");
        let (empty, _) = read_from(&[]).await;
        assert!(matches!(empty, Err(ProxyError::Closed)), "{empty:?}");
    }
}
