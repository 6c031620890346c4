//! The HTTP upgrade parser: the request head as `http::read_head` reads it
//! from the socket, `handshake::parse` checking it is a WebSocket upgrade
//! (or a probe), and the `Authorization` header's credentials. None may
//! panic. A head is what its bytes hold up to the first blank line, within
//! the size limit. For generated requests whose every part is known, the
//! parser's verdict must be the one the rules give (a small model of them
//! below), with the right `Sec-WebSocket-Accept` for an upgrade.

use futures::FutureExt;
use proptest::collection::vec;
use proptest::prelude::*;
use signal_relay::auth::HeaderCredentials;
use signal_relay::server::handshake::{self, Requested, UpgradeError, WEBSOCKET_PATH};
use signal_relay::server::http::{self, MAX_HEAD, Probe};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::support;

/// A request line and headers, each part chosen so the verdict is known.
#[derive(Debug, Clone)]
struct Head {
    method: &'static str,
    path: &'static str,
    upgrade: Option<&'static str>,
    connection: Option<&'static str>,
    version: Option<&'static str>,
    key: Option<String>,
    authorization: Option<String>,
    /// Headers the rules ignore.
    other: Vec<(String, String)>,
}

/// What the rules say about a [`Head`]; `Err` names the refusal.
fn verdict(head: &Head) -> Result<Option<Probe>, &'static str> {
    let path = head.path.split('?').next().unwrap_or("");
    let probe = Probe::from_path(path);
    if path != WEBSOCKET_PATH && probe.is_none() {
        return Err("not_found");
    }
    if head.method != "GET" {
        return Err("method_not_allowed");
    }
    if probe.is_some() {
        return Ok(probe);
    }
    let upgrade = head
        .upgrade
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let connection = head.connection.is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    });
    if !upgrade || !connection {
        return Err("not_websocket");
    }
    if head.version != Some("13") {
        return Err("unsupported_version");
    }
    if head.key.is_none() {
        return Err("missing_key");
    }
    Ok(None)
}

impl Head {
    fn to_bytes(&self) -> Vec<u8> {
        let mut text = format!("{} {} HTTP/1.1\r\nHost: relay\r\n", self.method, self.path);
        let mut header = |name: &str, value: &Option<String>| {
            if let Some(value) = value {
                text.push_str(&format!("{name}: {value}\r\n"));
            }
        };
        header("Upgrade", &self.upgrade.map(str::to_owned));
        header("Connection", &self.connection.map(str::to_owned));
        header("Sec-WebSocket-Version", &self.version.map(str::to_owned));
        header("Sec-WebSocket-Key", &self.key);
        header("Authorization", &self.authorization);
        for (name, value) in &self.other {
            text.push_str(&format!("{name}: {value}\r\n"));
        }
        text.push_str("\r\n");
        text.into_bytes()
    }
}

/// A header value: visible ASCII and spaces, trimmed as HTTP trims it.
fn value() -> impl Strategy<Value = String> {
    "[!-~][ -~]{0,30}[!-~]".prop_map(|v| v.trim().to_owned())
}

fn head() -> impl Strategy<Value = Head> {
    (
        (
            prop::sample::select(vec!["GET", "GET", "POST", "HEAD", "get"]),
            prop::sample::select(vec![
                WEBSOCKET_PATH,
                "/v1/websocket?v=1",
                "/v1/websocket/",
                "/healthz",
                "/readyz?x",
                "/",
                "/v1/WebSocket",
            ]),
            proptest::option::of(prop::sample::select(vec!["websocket", "WebSocket", "h2c"])),
            proptest::option::of(prop::sample::select(vec![
                "Upgrade",
                "keep-alive, upgrade",
                "close",
                "Upgradex",
            ])),
            proptest::option::of(prop::sample::select(vec!["13", "8", "13, 8"])),
        ),
        (
            proptest::option::of("[A-Za-z0-9+/]{22}=="),
            proptest::option::of(
                prop_oneof![
                    "Bearer [A-Za-z0-9_-]{0,50}",
                    "Basic [A-Za-z0-9+/=]{0,40}",
                    value(),
                ]
                .prop_map(|v| v.trim().to_owned()),
            ),
            vec(("X-[A-Za-z-]{1,12}", value()), 0..4),
        ),
    )
        .prop_map(
            |((method, path, upgrade, connection, version), (key, authorization, other))| Head {
                method,
                path,
                upgrade,
                connection,
                version,
                key,
                authorization,
                other,
            },
        )
}

fn reason(err: &UpgradeError) -> &'static str {
    err.reason()
}

/// A head and what followed it in the same read, as `read_head` returns
/// them; `None` for a head over the limit.
type Read = std::io::Result<Option<(Vec<u8>, Vec<u8>)>>;

/// Reads a head from `bytes` as the server reads one from its socket.
fn read_head(bytes: &[u8]) -> Option<Read> {
    let mut stream = bytes;
    http::read_head(&mut stream).now_or_never()
}

/// Checks what `read_head` made of `bytes`, and parses the head it read.
fn check_bytes(bytes: &[u8]) -> Result<(), TestCaseError> {
    let read = read_head(bytes);
    prop_assert!(read.is_some(), "reading from memory never waits");
    let Some(Ok(Some((head, leftover)))) = read else {
        return Ok(());
    };
    prop_assert!(head.ends_with(b"\r\n\r\n"));
    let first = head.windows(4).position(|w| w == b"\r\n\r\n");
    prop_assert_eq!(
        first,
        Some(head.len() - 4),
        "the head ends at the first blank line"
    );
    prop_assert!(bytes.starts_with(&head) && bytes[head.len()..].starts_with(&leftover));
    // One read of 1 KiB may cross the limit before it is checked.
    prop_assert!(
        head.len() <= MAX_HEAD + 1024,
        "head of {} bytes",
        head.len()
    );
    if let Ok(Requested::Upgrade {
        authorization: Some(value),
        ..
    }) = handshake::parse(&head)
    {
        let _ = HeaderCredentials::parse(value);
    }
    Ok(())
}

#[test]
fn upgrade_requests() {
    support::run("upgrade_requests", 1, head(), |head| {
        let bytes = head.to_bytes();
        let expected = verdict(&head);
        match (handshake::parse(&bytes), expected) {
            (Ok(Requested::Probe(probe)), Ok(Some(expected))) => prop_assert_eq!(probe, expected),
            (
                Ok(Requested::Upgrade {
                    accept_key,
                    authorization,
                    ..
                }),
                Ok(None),
            ) => {
                let key = head.key.as_deref().expect("an upgrade has a key");
                prop_assert_eq!(accept_key, derive_accept_key(key.as_bytes()));
                prop_assert_eq!(authorization, head.authorization.as_deref());
                if let Some(value) = authorization {
                    let _ = HeaderCredentials::parse(value);
                }
            }
            (Err(err), Err(expected)) => prop_assert_eq!(reason(&err), expected),
            (got, expected) => {
                prop_assert!(false, "parsed {got:?}, the rules say {expected:?}")
            }
        }
        check_bytes(&bytes)
    });
}

#[test]
fn arbitrary_heads() {
    let mutated = (head(), support::edits(6))
        .prop_map(|(head, edits)| support::mutate(head.to_bytes(), &edits));
    let random = prop_oneof![
        vec(any::<u8>(), 0..512),
        // Long heads, near the limit.
        (vec(any::<u8>(), 0..64), 8_000..10_000usize).prop_map(|(seed, len)| {
            let mut bytes: Vec<u8> = seed.into_iter().cycle().take(len).collect();
            bytes.extend_from_slice(b"\r\n\r\n");
            bytes
        }),
    ];
    support::run(
        "arbitrary_heads",
        1,
        prop_oneof![3 => mutated, 1 => random],
        |bytes| {
            check_bytes(&bytes)?;
            let _ = handshake::parse(&bytes);
            Ok(())
        },
    );
}
