//! PLACEHOLDER: replaced by the key-directory implementation.

use super::{Ctx, Reply, ready};
use crate::protocol::RequestError;
use crate::protocol::proto;

pub struct UploadKeys;

impl UploadKeys {
    pub fn from_frame(_: proto::UploadKeys) -> Result<Self, RequestError> {
        Ok(UploadKeys)
    }

    pub fn apply(self, _: &mut Ctx<'_>) -> Reply {
        ready(Err(RequestError::NotFound("not yet".into())))
    }
}
