//! The server's stop as its connections see it: a flag that a session's
//! loop reads on every turn without a lock, and a token to wait on.
//!
//! A session waits for the stop, for the whole life of its socket, beside
//! everything else it waits for. Polling a [`CancellationToken`]'s wait
//! takes the token's mutex and its notifier's, and the server's token is
//! one for every connection: two shared locks on every turn of every
//! session's loop. So the flag is set before the token is cancelled, and a
//! session polls its wait once, to register ([`registered`]), and again
//! only when it finds the flag set ([`when_flagged`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// The connections' side of the server's shutdown. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Stop(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    /// Set before `token` is cancelled, so whoever the cancel wakes reads
    /// it set.
    stopped: AtomicBool,
    /// What the connections wait on.
    token: CancellationToken,
}

impl Stop {
    /// Tells every connection to stop. Idempotent.
    pub fn stop(&self) {
        self.0.stopped.store(true, Ordering::Release);
        self.0.token.cancel();
    }

    /// Whether [`stop`](Stop::stop) was called; no lock.
    pub fn is_stopped(&self) -> bool {
        self.0.stopped.load(Ordering::Acquire)
    }

    /// Resolves once the connections are told to stop.
    pub fn stopped(&self) -> WaitForCancellationFuture<'_> {
        self.0.token.cancelled()
    }
}

/// Polls `wait` once with the current task's waker, so it is registered to
/// wake this task, and says whether it is already done. A wait registered
/// so need not be polled again until what it waits for has happened: the
/// task's waker does not change while the task lives, so the registration
/// stays good. For the session loop's long-lived waits on its stop and
/// its kick, each of which has a flag set before it fires.
pub async fn registered<F: Future>(wait: Pin<&mut F>) -> bool {
    let mut wait = Some(wait);
    std::future::poll_fn(|cx| {
        let wait = wait.take().expect("polled once");
        Poll::Ready(wait.poll(cx).is_ready())
    })
    .await
}

/// `wait`, already [`registered`], polled only once `fired` (a flag set
/// before `wait` fires) says it has fired. A `select!` branch guard cannot
/// do this: it is read once when the `select!` starts, so a wake-up by the
/// wait itself would find the branch still disabled.
pub fn when_flagged<'a, F: Future>(
    mut wait: Pin<&'a mut F>,
    fired: impl Fn() -> bool + 'a,
) -> impl Future<Output = F::Output> + 'a {
    std::future::poll_fn(move |cx| {
        if fired() {
            wait.as_mut().poll(cx)
        } else {
            Poll::Pending
        }
    })
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use super::*;

    #[tokio::test]
    async fn a_registered_wait_wakes_its_task_at_the_stop_and_the_flag_is_set_by_then() {
        let stop = Stop::default();
        let (registered_tx, registered_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut wait = pin!(stop.stopped());
                assert!(!registered(wait.as_mut()).await);
                registered_tx.send(()).unwrap();
                // Only the registration can wake this task.
                when_flagged(wait, || stop.is_stopped()).await;
            }
        });
        registered_rx.await.unwrap();
        assert!(!stop.is_stopped());
        stop.stop();
        task.await.unwrap();
        assert!(stop.is_stopped());
    }

    #[tokio::test]
    async fn a_wait_made_after_the_stop_is_done_at_once() {
        let stop = Stop::default();
        stop.stop();
        stop.stop();
        assert!(registered(pin!(stop.stopped())).await);
    }
}
