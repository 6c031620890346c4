//! Session tokens: 32 random bytes given to the client once; the server
//! keeps only their SHA-256.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::protocol::RequestError;

pub const TOKEN_LEN: usize = 32;

/// A session token. `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionToken([u8; TOKEN_LEN]);

impl std::fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionToken(..)")
    }
}

impl SessionToken {
    pub fn generate() -> Self {
        let mut bytes = [0u8; TOKEN_LEN];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, RequestError> {
        <[u8; TOKEN_LEN]>::try_from(bytes)
            .map(Self)
            .map_err(|_| RequestError::bad_request(format!("token must be {TOKEN_LEN} bytes")))
    }

    /// Parses the base64url form used in `Authorization: Bearer`.
    pub fn from_base64(text: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')).ok()?;
        <[u8; TOKEN_LEN]>::try_from(bytes.as_slice()).ok().map(Self)
    }

    pub fn to_base64(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; TOKEN_LEN] {
        &self.0
    }

    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.0).into()
    }
}
