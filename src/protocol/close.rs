//! Why the server closes a WebSocket: the one place close codes are named.
//! Every close the relay sends is a [`Close`], whether it comes from a bad
//! frame, the session loop, a command (logout) or another connection
//! (displacement), so a client sees the same code for the same cause.

use std::borrow::Cow;

/// The close codes the relay sends (RFC 6455 section 7.4 and the IANA
/// registry, plus our own in the private 4000–4999 range, each an HTTP
/// status moved there); [`CloseCode::code`] is the number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// Done as asked (logout, account deleted).
    Normal,
    /// The server is shutting down, or the peer went silent.
    GoingAway,
    /// The peer broke the WebSocket protocol itself (RFC 6455 section
    /// 7.4.1): an unmasked frame, reserved bits or opcodes, a bad control
    /// frame, a continuation with nothing to continue, a close code no
    /// endpoint may send.
    ProtocolError,
    /// A frame of a kind the protocol does not use (text).
    Unsupported,
    /// A frame that does not decode as the protocol's message, or text
    /// (a close reason) that is not UTF-8.
    InvalidPayload,
    /// The peer broke a rule (no authentication, stopped reading).
    PolicyViolation,
    /// A frame over the size limit.
    TooBig,
    /// The server failed; the client may reconnect and retry.
    InternalError,
    /// The server cannot take the session now: it is at its connection
    /// limit, or (cluster mode) the user could not be claimed for this
    /// node; reconnect shortly.
    TryAgainLater,
    /// The session token this socket authenticated with expired or was
    /// revoked (HTTP's 401 Unauthorized, moved into the private range):
    /// authenticate again with the password; a resume would be refused.
    SessionEnded,
    /// A newer connection of the same user took over (HTTP's 409 Conflict,
    /// moved into the private range).
    Displaced,
}

impl CloseCode {
    /// The number on the wire.
    pub const fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::Unsupported => 1003,
            CloseCode::InvalidPayload => 1007,
            CloseCode::PolicyViolation => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::InternalError => 1011,
            CloseCode::TryAgainLater => 1013,
            CloseCode::SessionEnded => 4401,
            CloseCode::Displaced => 4409,
        }
    }
}

/// A close frame to send: a code and a reason the client may show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: CloseCode,
    /// Static for the fixed causes; owned when it names a detail (which
    /// limit a frame broke).
    pub reason: Cow<'static, str>,
}

/// Most bytes of reason a close frame holds (RFC 6455: a control frame
/// carries at most 125 bytes, two of which are the code).
pub const MAX_REASON_BYTES: usize = 123;

impl Close {
    /// A close whose reason is cut, at a character boundary, to what a close
    /// frame holds: reasons may quote the client's input.
    pub fn new(code: CloseCode, reason: impl Into<Cow<'static, str>>) -> Self {
        let mut reason = reason.into();
        if reason.len() > MAX_REASON_BYTES {
            let mut end = MAX_REASON_BYTES;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.to_mut().truncate(end);
        }
        Close { code, reason }
    }

    pub const fn fixed(code: CloseCode, reason: &'static str) -> Self {
        Close {
            code,
            reason: Cow::Borrowed(reason),
        }
    }

    pub const DISPLACED: Close = Close::fixed(
        CloseCode::Displaced,
        "replaced by a newer connection of this user",
    );
    pub const SHUTTING_DOWN: Close = Close::fixed(CloseCode::GoingAway, "server shutting down");
    pub const IDLE: Close = Close::fixed(CloseCode::GoingAway, "idle timeout");
    pub const LOGGED_OUT: Close = Close::fixed(CloseCode::Normal, "logged out");
    pub const ACCOUNT_DELETED: Close = Close::fixed(CloseCode::Normal, "account deleted");
    pub const AUTH_TIMEOUT: Close =
        Close::fixed(CloseCode::PolicyViolation, "authentication timed out");
    pub const TOO_MUCH_BEFORE_AUTH: Close = Close::fixed(
        CloseCode::PolicyViolation,
        "too much sent before authentication",
    );
    pub const NOT_AUTHENTICATED: Close =
        Close::fixed(CloseCode::PolicyViolation, "not authenticated");
    pub const TOO_MANY_AUTH_FAILURES: Close = Close::fixed(
        CloseCode::PolicyViolation,
        "too many failed authentication attempts",
    );
    pub const STOPPED_READING: Close = Close::fixed(
        CloseCode::PolicyViolation,
        "write timeout: the client stopped reading",
    );
    pub const CANNOT_TAKE_SESSION: Close = Close::fixed(
        CloseCode::TryAgainLater,
        "cannot take over the session now; reconnect shortly",
    );
    pub const LEASE_LAPSED: Close = Close::fixed(
        CloseCode::TryAgainLater,
        "this node cannot confirm it still holds the session; reconnect",
    );
    pub const SESSION_EXPIRED: Close =
        Close::fixed(CloseCode::SessionEnded, "session token expired");
    pub const SESSION_REVOKED: Close =
        Close::fixed(CloseCode::SessionEnded, "session token revoked");
    pub const SERVER_FULL: Close = Close::fixed(
        CloseCode::TryAgainLater,
        "server is at its connection limit",
    );
    pub const DRAIN_FAILED: Close = Close::fixed(
        CloseCode::InternalError,
        "internal error while reading queued messages",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers are the protocol's contract with every client; pin them.
    #[test]
    fn codes_on_the_wire() {
        let all = [
            (CloseCode::Normal, 1000),
            (CloseCode::GoingAway, 1001),
            (CloseCode::ProtocolError, 1002),
            (CloseCode::Unsupported, 1003),
            (CloseCode::InvalidPayload, 1007),
            (CloseCode::PolicyViolation, 1008),
            (CloseCode::TooBig, 1009),
            (CloseCode::InternalError, 1011),
            (CloseCode::TryAgainLater, 1013),
            (CloseCode::SessionEnded, 4401),
            (CloseCode::Displaced, 4409),
        ];
        for (code, number) in all {
            assert_eq!(code.code(), number, "{code:?}");
        }
    }

    #[test]
    fn long_reasons_are_cut_to_fit_a_close_frame_at_a_character_boundary() {
        let long = "é".repeat(100);
        let close = Close::new(CloseCode::InvalidPayload, long);
        assert_eq!(
            close.reason.len(),
            122,
            "two-byte characters, cut before the 123rd byte"
        );
        assert!(close.reason.chars().all(|c| c == 'é'));
        let short = Close::new(CloseCode::InvalidPayload, "fine");
        assert_eq!(short.reason, "fine");
        let exact = "x".repeat(MAX_REASON_BYTES);
        assert_eq!(Close::new(CloseCode::Normal, exact.clone()).reason, exact);
    }
}
