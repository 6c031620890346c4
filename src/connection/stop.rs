//! The server's stop as its connections see it: a flag that a session's
//! loop reads on every turn without a lock, and a token to wait on.
//!
//! A session waits for the stop, for the whole life of its socket, beside
//! everything else it waits for. Polling a [`CancellationToken`]'s wait
//! takes the token's mutex and its notifier's, and the server's token is
//! one for every connection: two shared locks on every turn of every
//! session's loop. So the flag is set before the token is cancelled, and a
//! session polls its wait once, to register, and again only when it finds
//! the flag set ([`Registered`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

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

/// A long-lived wait that is polled only when a flag says it has fired:
/// the session loop's waits on its stop and its kick, each of which has a
/// flag set before it fires. Polled once to register with the task's
/// waker, it needs no polling until then. It is polled again if the task's
/// waker changes (tokio's does not, but only the latest waker is promised
/// a wake-up), so no wake-up is lost either way.
pub struct Registered<'a, F> {
    wait: Pin<&'a mut F>,
    /// The waker `wait` last registered, if it is registered.
    waker: Option<Waker>,
}

impl<'a, F: Future> Registered<'a, F> {
    pub fn new(wait: Pin<&'a mut F>) -> Self {
        Registered { wait, waker: None }
    }

    /// Registers the wait with the current task; true if it has already
    /// fired.
    pub async fn register(&mut self) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(self.poll_wait(cx).is_ready())).await
    }

    /// Resolves when the wait does, polling it only once `fired` says it
    /// has fired or when the task's waker is not the one it registered. A
    /// `select!` branch guard could not do this: it is read once when the
    /// `select!` starts, so the wait's own wake-up would find its branch
    /// still disabled.
    pub fn when<'b>(
        &'b mut self,
        fired: impl Fn() -> bool + 'b,
    ) -> impl Future<Output = F::Output> + 'b {
        std::future::poll_fn(move |cx| {
            let current = self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
            if fired() || !current {
                self.poll_wait(cx)
            } else {
                Poll::Pending
            }
        })
    }

    fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<F::Output> {
        let polled = self.wait.as_mut().poll(cx);
        if polled.is_pending() {
            self.waker = Some(cx.waker().clone());
        }
        polled
    }
}

/// Calls [`Stop::stop`] when dropped: the server holds one while it runs,
/// so its connections are told to stop even if its future is dropped
/// before it gets to say so.
pub struct StopOnDrop(pub Stop);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
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
                let stopped = pin!(stop.stopped());
                let mut wait = Registered::new(stopped);
                assert!(!wait.register().await);
                registered_tx.send(()).unwrap();
                // Only the registration can wake this task.
                wait.when(|| stop.is_stopped()).await;
            }
        });
        registered_rx.await.unwrap();
        assert!(!stop.is_stopped());
        stop.stop();
        task.await.unwrap();
        assert!(stop.is_stopped());
    }

    #[tokio::test]
    async fn a_wait_polled_with_another_waker_registers_that_one() {
        let stop = Stop::default();
        let stopped = pin!(stop.stopped());
        let mut wait = Registered::new(stopped);
        // Registered with a waker that wakes nothing.
        let mut noop = Context::from_waker(Waker::noop());
        assert_eq!(pin!(wait.register()).poll(&mut noop), Poll::Ready(false));
        // Awaited by this task, whose waker differs: the wait is polled and
        // registers it, so the stop (by another task, once this one has
        // polled) wakes this one.
        let (polled_tx, polled_rx) = tokio::sync::oneshot::channel::<()>();
        let stopper = tokio::spawn({
            let stop = stop.clone();
            async move {
                polled_rx.await.unwrap();
                stop.stop();
            }
        });
        let mut turn = pin!(wait.when(|| stop.is_stopped()));
        let first = std::future::poll_fn(|cx| Poll::Ready(turn.as_mut().poll(cx).is_pending()));
        assert!(first.await);
        polled_tx.send(()).unwrap();
        turn.await;
        stopper.await.unwrap();
    }

    #[tokio::test]
    async fn a_wait_made_after_the_stop_is_done_at_once_and_dropping_the_guard_stops() {
        let stop = Stop::default();
        drop(StopOnDrop(stop.clone()));
        assert!(stop.is_stopped());
        stop.stop();
        assert!(Registered::new(pin!(stop.stopped())).register().await);
    }
}
