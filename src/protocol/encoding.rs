//! The protocol's two encodings of the same frames, and how a connection
//! picks one: the WebSocket subprotocol (`Sec-WebSocket-Protocol`) of its
//! upgrade. `relay.v1.proto` is binary frames holding protobuf,
//! `relay.v1.json` text frames holding the canonical proto3 JSON mapping
//! (see [`super::json`]) of the same `ClientFrame` and `ServerFrame`.
//!
//! The encoding is chosen once per connection and then matched once per
//! frame, never per field: the protobuf path costs what it did before the
//! JSON one existed.

/// How a connection's frames are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// Binary frames, protobuf. What a client that asks for no subprotocol
    /// gets.
    #[default]
    Proto,
    /// Text frames, proto3 JSON: for tools that cannot build protobuf
    /// (wscat, websocat, Artillery, tsung).
    Json,
}

/// Every subprotocol the relay speaks, in its order of preference, for
/// error messages and documentation.
pub const SUBPROTOCOLS: [&str; 2] = [Encoding::Proto.subprotocol(), Encoding::Json.subprotocol()];

/// The upgrade offered subprotocols, and none of them is ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "none of the offered WebSocket subprotocols is supported; use relay.v1.proto or relay.v1.json"
)]
pub struct UnsupportedSubprotocols;

impl Encoding {
    /// The subprotocol name that selects this encoding.
    pub const fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Proto => "relay.v1.proto",
            Encoding::Json => "relay.v1.json",
        }
    }

    /// The encoding a subprotocol name selects. Exact: names are tokens,
    /// compared as RFC 6455 compares them, case and all.
    pub fn from_subprotocol(name: &str) -> Option<Encoding> {
        [Encoding::Proto, Encoding::Json]
            .into_iter()
            .find(|e| e.subprotocol() == name)
    }

    /// Chooses the encoding for an upgrade from the values of its
    /// `Sec-WebSocket-Protocol` headers (each a comma-separated list, the
    /// client's preference first). The rule: the first offered name we
    /// speak wins; no offer at all means protobuf, and the answer then
    /// names no subprotocol (RFC 6455 forbids naming one nobody asked
    /// for), so `Ok(None)`; offers of which we speak none are refused.
    pub fn negotiate<'a>(
        headers: impl IntoIterator<Item = &'a str>,
    ) -> Result<Option<Encoding>, UnsupportedSubprotocols> {
        let mut offered = headers
            .into_iter()
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .peekable();
        if offered.peek().is_none() {
            return Ok(None);
        }
        offered
            .find_map(Encoding::from_subprotocol)
            .map(Some)
            .ok_or(UnsupportedSubprotocols)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The negotiation rule, pinned: no offer is protobuf without an
    /// answer, the client's first supported offer wins, names are exact,
    /// and an offer of nothing we speak is refused.
    #[test]
    fn negotiation() {
        let pick = |headers: &[&str]| Encoding::negotiate(headers.iter().copied());
        assert_eq!(pick(&[]), Ok(None));
        assert_eq!(pick(&[" , "]), Ok(None), "empty names are no offer");
        assert_eq!(pick(&["relay.v1.proto"]), Ok(Some(Encoding::Proto)));
        assert_eq!(pick(&["relay.v1.json"]), Ok(Some(Encoding::Json)));
        assert_eq!(
            pick(&["chat, relay.v1.json , relay.v1.proto"]),
            Ok(Some(Encoding::Json))
        );
        assert_eq!(
            pick(&["relay.v1.proto,relay.v1.json"]),
            Ok(Some(Encoding::Proto))
        );
        assert_eq!(
            pick(&["chat", "relay.v1.json"]),
            Ok(Some(Encoding::Json)),
            "repeated headers are one list"
        );
        assert_eq!(pick(&["RELAY.V1.JSON"]), Err(UnsupportedSubprotocols));
        assert_eq!(pick(&["chat, mqtt"]), Err(UnsupportedSubprotocols));
    }

    #[test]
    fn names_round_trip_and_the_error_names_them_all() {
        for name in SUBPROTOCOLS {
            let encoding = Encoding::from_subprotocol(name).expect("ours");
            assert_eq!(encoding.subprotocol(), name);
            assert!(UnsupportedSubprotocols.to_string().contains(name));
        }
    }
}
