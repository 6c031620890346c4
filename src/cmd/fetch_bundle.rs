//! PLACEHOLDER: replaced by the key-directory implementation.

use super::{Ctx, Reply, ready};
use crate::protocol::RequestError;
use crate::protocol::proto;

pub struct FetchBundle;

impl FetchBundle {
    pub fn from_frame(_: proto::FetchBundle) -> Result<Self, RequestError> {
        Ok(FetchBundle)
    }

    pub fn apply(self, _: &mut Ctx<'_>) -> Reply {
        ready(Err(RequestError::NotFound("not yet".into())))
    }
}
