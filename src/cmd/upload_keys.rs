//! `UploadKeys`: publish some or all of the user's keys. Formats, ids and
//! counts are checked here at the edge; signatures and the upload rules in
//! [`crate::keys::upload`], inside one transaction. Rate-limited per user:
//! verifying an upload's signatures costs milliseconds of CPU.

use super::{Ctx, Done, Reply, later, ready};
use crate::keys::upload::{self, Upload};
use crate::metrics::Limit;
use crate::protocol::RequestError;
use crate::protocol::proto::{self, response};

pub struct UploadKeys {
    /// The parsed, format-checked upload.
    upload: Upload,
}

impl UploadKeys {
    pub fn from_frame(request: proto::UploadKeys) -> Result<Self, RequestError> {
        Ok(UploadKeys {
            upload: Upload::parse(request)?,
        })
    }

    pub fn apply(self, ctx: &mut Ctx<'_>) -> Reply {
        let state = ctx.state.clone();
        let user = ctx.auth.user_id;
        if let Err(retry_after) = state.upload_limiter().check(user) {
            state.metrics().rate_limited(Limit::upload_keys);
            return ready(Err(RequestError::RateLimited { retry_after }));
        }
        later(async move {
            let max_stored = state.limits().keys.max_stored_pre_keys;
            let counts = upload::store(state.db(), user, self.upload, max_stored).await?;
            // A refill: the next time the keys run low is news again.
            state.prekeys_low().uploaded(user);
            Ok(Done::reply(response::Result::UploadKeys(
                proto::UploadKeysResult {
                    one_time_pre_keys: counts.one_time,
                    kyber_pre_keys: counts.kyber,
                },
            )))
        })
    }
}
