//! `FetchBundle`: another user's pre-key bundle, by user id or username,
//! consuming one one-time key of each kind. Rate-limited per requester.
//! When the fetch leaves the owner short of one-time keys, the owner is
//! told with a `PreKeysLow` push (if online), once per crossing (see
//! [`crate::keys::low`]).
//!
//! Fetching one's own bundle is refused (`forbidden`): Signal allows it to
//! reach one's *other* devices, but here one user is one device, so it
//! would only burn the user's own one-time keys.

use uuid::Uuid;

use super::{Ctx, Done, Reply, later, ready};
use crate::keys::bundle::{self, Owner};
use crate::keys::{self, KeyError};
use crate::metrics::Limit;
use crate::protocol::RequestError;
use crate::protocol::proto::{self, push, response};
use crate::state::AppState;

pub struct FetchBundle {
    /// Whose bundle.
    owner: Owner,
}

impl FetchBundle {
    pub fn from_frame(request: proto::FetchBundle) -> Result<Self, RequestError> {
        Ok(FetchBundle {
            owner: Owner::parse(request.target)?,
        })
    }

    pub fn apply(self, ctx: &mut Ctx<'_>) -> Reply {
        if self.owner.is(ctx.auth.user_id, &ctx.auth.username) {
            return ready(Err(KeyError::OwnBundle.into()));
        }
        let state = ctx.state.clone();
        if let Err(retry_after) = state.bundle_limiter().check(ctx.auth.user_id) {
            state.metrics().rate_limited(Limit::bundle);
            return ready(Err(RequestError::RateLimited { retry_after }));
        }
        later(async move {
            let fetched = bundle::fetch(state.db(), &self.owner).await?;
            warn_if_low(&state, fetched.owner).await;
            Ok(Done::reply(response::Result::Bundle(fetched.bundle)))
        })
    }
}

/// Pushes `PreKeysLow` to `owner` if either kind of one-time key is now
/// below the threshold and they were not told already (see
/// [`crate::keys::low`]). Counted after the fetch committed. Advisory: a
/// failure is logged and the fetch (whose keys are already consumed) still
/// answers.
async fn warn_if_low(state: &AppState, owner: Uuid) {
    let threshold = state.limits().keys.prekey_low_threshold;
    match keys::count(state.db(), owner).await {
        Ok(left) if left.one_time < threshold || left.kyber < threshold => {
            let notices = state.prekeys_low();
            if !notices.claim(owner, std::time::Instant::now()) {
                return;
            }
            let low = proto::PreKeysLow {
                one_time_pre_keys: left.one_time,
                kyber_pre_keys: left.kyber,
                threshold,
            };
            if state.relay().push(owner, push::Event::PreKeysLow(low)) {
                state.metrics().prekeys_low.inc();
            } else {
                notices.unsent(owner);
            }
        }
        Ok(_) => {}
        Err(err) => {
            tracing::warn!(error = %err, source = ?std::error::Error::source(&err), %owner, "counting pre-keys after a fetch failed");
        }
    }
}
