//! Usernames, passwords and `Authorization` headers, validated once at the
//! edge. Each rule that fails is named in the error, so a client knows what
//! to fix.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretString};

use super::SessionToken;
use crate::protocol::RequestError;

/// A username that obeys the rules: 3 to 50 characters, each an ASCII
/// letter, digit, `_`, `.` or `-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username(String);

impl Username {
    pub const MIN_LEN: usize = 3;
    pub const MAX_LEN: usize = 50;

    pub fn parse(raw: &str) -> Result<Self, RequestError> {
        let len = raw.chars().count();
        if len < Self::MIN_LEN {
            return Err(RequestError::bad_request(format!(
                "username must be at least {} characters",
                Self::MIN_LEN
            )));
        }
        if len > Self::MAX_LEN {
            return Err(RequestError::bad_request(format!(
                "username must be at most {} characters",
                Self::MAX_LEN
            )));
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return Err(RequestError::bad_request(format!(
                "username may contain only letters, digits, '_', '.' and '-' (found {bad:?})"
            )));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

impl AsRef<str> for Username {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A password of 8 to 256 bytes. Kept secret so it never reaches a log.
#[derive(Debug)]
pub struct Password(SecretString);

impl Password {
    pub const MIN_BYTES: usize = 8;
    pub const MAX_BYTES: usize = 256;

    pub fn parse(raw: String) -> Result<Self, RequestError> {
        if raw.len() < Self::MIN_BYTES {
            return Err(RequestError::bad_request(format!(
                "password must be at least {} bytes",
                Self::MIN_BYTES
            )));
        }
        if raw.len() > Self::MAX_BYTES {
            return Err(RequestError::bad_request(format!(
                "password must be at most {} bytes",
                Self::MAX_BYTES
            )));
        }
        Ok(Self(SecretString::from(raw)))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

/// What an upgrade request's `Authorization` header carries.
#[derive(Debug)]
pub enum HeaderCredentials {
    /// `Bearer <base64url token>`: resume a session.
    Bearer(SessionToken),
    /// `Basic <base64 user:password>`: log in, issuing a new session.
    Basic(Username, Password),
}

impl HeaderCredentials {
    pub fn parse(value: &str) -> Result<Self, RequestError> {
        let value = value.trim();
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            let token = SessionToken::from_base64(rest)
                .ok_or_else(|| RequestError::Unauthorized("malformed bearer token".into()))?;
            Ok(HeaderCredentials::Bearer(token))
        } else if scheme.eq_ignore_ascii_case("basic") {
            let malformed = || RequestError::Unauthorized("malformed basic credentials".into());
            let decoded = STANDARD
                .decode(rest)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(malformed)?;
            let (user, password) = decoded.split_once(':').ok_or_else(malformed)?;
            Ok(HeaderCredentials::Basic(
                Username::parse(user)?,
                Password::parse(password.to_owned())?,
            ))
        } else {
            Err(RequestError::Unauthorized(
                "unsupported authorization scheme; use Bearer or Basic".into(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_headers() {
        let basic = format!("Basic {}", STANDARD.encode("alice:correct horse"));
        assert!(matches!(
            HeaderCredentials::parse(&basic),
            Ok(HeaderCredentials::Basic(user, _)) if user.as_ref() == "alice"
        ));
        let token = SessionToken::generate();
        let bearer = format!("bearer  {} ", token.to_base64());
        assert!(matches!(
            HeaderCredentials::parse(&bearer),
            Ok(HeaderCredentials::Bearer(t)) if t.hash() == token.hash()
        ));
        for bad in [
            "Basic !!!",
            "Basic YWxpY2U=", // no colon
            "Bearer not-a-token",
            "Digest abc",
            "",
        ] {
            assert!(
                matches!(
                    HeaderCredentials::parse(bad),
                    Err(RequestError::Unauthorized(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn username_rules() {
        assert!(Username::parse("bob").is_ok());
        assert!(Username::parse("a.b-c_D9").is_ok());
        assert!(Username::parse(&"x".repeat(50)).is_ok());
        for bad in ["ab", "", "has space", "émile", "semi;colon"] {
            assert!(Username::parse(bad).is_err(), "{bad}");
        }
        assert!(Username::parse(&"x".repeat(51)).is_err());
    }

    #[test]
    fn password_rules() {
        assert!(Password::parse("12345678".into()).is_ok());
        assert!(Password::parse("1234567".into()).is_err());
        assert!(Password::parse("x".repeat(256)).is_ok());
        assert!(Password::parse("x".repeat(257)).is_err());
    }
}
