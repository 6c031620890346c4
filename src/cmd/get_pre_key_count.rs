//! PLACEHOLDER: replaced by the key-directory implementation.

use super::{Ctx, Reply, ready};
use crate::protocol::RequestError;
use crate::protocol::proto;

pub struct GetPreKeyCount;

impl GetPreKeyCount {
    pub fn from_frame(_: proto::GetPreKeyCount) -> Result<Self, RequestError> {
        Ok(GetPreKeyCount)
    }

    pub fn apply(self, _: &mut Ctx<'_>) -> Reply {
        ready(Err(RequestError::NotFound("not yet".into())))
    }
}
