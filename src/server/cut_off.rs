//! Closes the sockets of users an operator cut off from another process
//! (`relay users delete`, `relay users revoke-sessions`):
//! `storage::cut_off` says how the relays are told, and what can be missed.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::protocol::Close;
use crate::state::AppState;
use crate::storage::cut_off::{self, CutOff};

/// Shortest and longest wait before listening again after a failure.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the listening connection is checked, and how long the check
/// may take. It only ever receives, so a connection lost without a word
/// (a firewall's idle cut, a database host gone) would otherwise be waited
/// on forever, every cut-off missed and nothing logged.
const CHECK_EVERY: Duration = Duration::from_secs(30);
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Listens until `shutdown`, again after every failure.
pub async fn run(state: AppState, shutdown: CancellationToken) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let listening = tokio::select! {
            () = shutdown.cancelled() => return,
            listening = cut_off::listen(state.db().pool()) => listening,
        };
        match listening {
            Ok(mut listener) => loop {
                let mut check = tokio::time::interval_at(
                    tokio::time::Instant::now() + CHECK_EVERY,
                    CHECK_EVERY,
                );
                let next = tokio::select! {
                    () = shutdown.cancelled() => return,
                    next = listener.try_recv() => next,
                    _ = check.tick() => {
                        let answered = tokio::time::timeout(
                            CHECK_TIMEOUT,
                            sqlx::query("SELECT 1").execute(&mut listener),
                        )
                        .await;
                        if matches!(answered, Ok(Ok(_))) {
                            continue;
                        }
                        tracing::warn!("the connection that hears of users cut off by an operator stopped answering; listening again");
                        break;
                    }
                };
                match next {
                    Ok(Some(notification)) => {
                        backoff = MIN_BACKOFF;
                        close(&state, notification.payload());
                    }
                    Ok(None) => tracing::warn!(
                        "lost the connection that hears of users cut off by an operator, \
                         and made it again; any cut off meanwhile keep their socket"
                    ),
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot hear of users cut off by an operator");
                        break;
                    }
                }
            },
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for users cut off by an operator");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Closes the socket here of the user a notification names, if any.
fn close(state: &AppState, payload: &str) {
    let Some((user, what)) = cut_off::parse(payload) else {
        tracing::warn!("ignoring an unreadable cut-off notification");
        return;
    };
    if let Some(conn) = state.relay().registry().connection(user) {
        tracing::info!(user_id = %user, ?what, "closing the socket of a user an operator cut off");
        conn.close(match what {
            CutOff::Deleted => Close::ACCOUNT_DELETED,
            CutOff::Revoked => Close::SESSION_REVOKED,
        });
    }
}
