//! Argon2id password hashing on a fixed pool of dedicated threads, with a
//! bounded wait queue, so a login storm can neither stall the async workers
//! nor queue without limit. Dedicated threads rather than tokio's blocking
//! pool: each Argon2 run allocates 19 MiB, and glibc keeps that memory in the
//! arena of whichever thread ran it; a blocking pool that grows to many
//! threads left the relay at 1 GB+ after a login storm, while a fixed pool
//! bounds it to about `concurrency` × 19 MiB.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use argon2::password_hash::{PasswordHash, SaltString, rand_core::OsRng};
use argon2::{Algorithm, Argon2, Params, PasswordHasher as _, PasswordVerifier, Version};
use tokio::sync::oneshot;

use super::{AuthError, Password};

type Job = Box<dyn FnOnce() + Send>;

/// Runs Argon2id jobs. Cheap to clone; clones share the worker threads,
/// which exit once every clone is dropped.
#[derive(Clone)]
pub struct PasswordHasher {
    /// The bounded queue of the worker threads; when it is full callers get
    /// `Busy` instead of waiting.
    jobs: mpsc::SyncSender<Job>,
    /// Argon2 parameters for new hashes.
    params: Params,
    /// A real hash of a random password, verified against when the user
    /// does not exist so both paths cost the same.
    dummy_hash: Arc<str>,
    /// Jobs queued and not yet started, for the queue-depth metric (the
    /// standard channel does not say).
    queued: Arc<AtomicUsize>,
}

impl PasswordHasher {
    /// OWASP's recommendation for Argon2id: 19 MiB, 2 iterations, 1 lane.
    pub fn owasp_params() -> Params {
        Params::new(19 * 1024, 2, 1, None).expect("valid Argon2 parameters")
    }

    pub fn new(concurrency: usize, queue: usize) -> Self {
        let params = Self::owasp_params();
        let dummy_hash = hash_blocking(&params, "dummy password for unknown users")
            .expect("hashing a constant succeeds");
        let (jobs, queue_rx) = mpsc::sync_channel::<Job>(queue.max(1));
        let queue_rx = Arc::new(Mutex::new(queue_rx));
        for i in 0..concurrency.max(1) {
            let queue_rx = queue_rx.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for a job.
                        let job = match queue_rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            // A panicking job must not take the worker with
                            // it; its caller sees `WorkerGone`.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => return, // every hasher handle is gone
                        }
                    }
                })
                .expect("spawn an Argon2 worker thread");
        }
        Self {
            jobs,
            params,
            dummy_hash: dummy_hash.into(),
            queued: Arc::default(),
        }
    }

    /// Reads how many jobs wait for a worker.
    pub fn depth_reader(&self) -> impl Fn() -> i64 + Send + Sync + 'static {
        let queued = self.queued.clone();
        move || queued.load(Ordering::Relaxed) as i64
    }

    pub async fn hash(&self, password: Password) -> Result<String, AuthError> {
        let params = self.params.clone();
        self.run(move || hash_blocking(&params, password.expose()))
            .await?
            .map_err(AuthError::Hashing)
    }

    /// Verifies `password` against `hash`, or against the dummy hash when
    /// `hash` is `None` (and then always answers false).
    pub async fn verify(
        &self,
        password: Password,
        hash: Option<String>,
    ) -> Result<bool, AuthError> {
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.dummy_hash.to_string());
        let matched = self
            .run(move || {
                let parsed = PasswordHash::new(&hash)?;
                match Argon2::default().verify_password(password.expose().as_bytes(), &parsed) {
                    Ok(()) => Ok(true),
                    Err(argon2::password_hash::Error::Password) => Ok(false),
                    Err(e) => Err(e),
                }
            })
            .await?
            .map_err(AuthError::Hashing)?;
        Ok(known && matched)
    }

    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let (done, result) = oneshot::channel();
        let queued = self.queued.clone();
        let job: Job = Box::new(move || {
            queued.fetch_sub(1, Ordering::Relaxed);
            let _ = done.send(job());
        });
        self.queued.fetch_add(1, Ordering::Relaxed);
        if self.jobs.try_send(job).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(AuthError::Busy);
        }
        result.await.map_err(|_| AuthError::WorkerGone)
    }
}

fn hash_blocking(params: &Params, password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_a_full_queue_answers_busy() {
        let hasher = PasswordHasher::new(1, 1);
        let hash = hasher
            .hash(Password::parse("correct horse".into()).unwrap())
            .await
            .unwrap();
        let check =
            |pw: &str| hasher.verify(Password::parse(pw.into()).unwrap(), Some(hash.clone()));
        assert!(check("correct horse").await.unwrap());
        assert!(!check("wrong horse!").await.unwrap());
        assert!(
            !hasher
                .verify(Password::parse("correct horse".into()).unwrap(), None)
                .await
                .unwrap(),
            "the dummy hash never matches"
        );
        // One worker, one queue slot: a burst of ten is mostly refused, not
        // queued without bound.
        let burst = (0..10).map(|_| check("correct horse"));
        let results = futures::future::join_all(burst).await;
        let busy = results
            .iter()
            .filter(|r| matches!(r, Err(AuthError::Busy)))
            .count();
        assert!(busy >= 8, "{busy} of 10 refused");
        assert!(results.iter().any(|r| matches!(r, Ok(true))));
    }
}
