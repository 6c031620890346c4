//! Argon2id password hashing on the blocking pool, with bounded concurrency
//! and a bounded wait queue, so a login storm can neither stall the async
//! workers nor queue without limit.

use std::sync::Arc;

use argon2::password_hash::{PasswordHash, SaltString, rand_core::OsRng};
use argon2::{Algorithm, Argon2, Params, PasswordHasher as _, PasswordVerifier, Version};
use tokio::sync::Semaphore;

use super::{AuthError, Password};

/// Runs Argon2id jobs. Cheap to clone; clones share the limits.
#[derive(Clone)]
pub struct PasswordHasher {
    /// Jobs running at once.
    running: Arc<Semaphore>,
    /// Jobs admitted (running or waiting); beyond it callers get `Busy`.
    admitted: Arc<Semaphore>,
    /// Argon2 parameters for new hashes.
    params: Params,
    /// A real hash of a random password, verified against when the user
    /// does not exist so both paths cost the same.
    dummy_hash: Arc<str>,
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
        Self {
            running: Arc::new(Semaphore::new(concurrency.max(1))),
            admitted: Arc::new(Semaphore::new(queue.max(concurrency).max(1))),
            params,
            dummy_hash: dummy_hash.into(),
        }
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
        let _admitted = self
            .admitted
            .clone()
            .try_acquire_owned()
            .map_err(|_| AuthError::Busy)?;
        let _running = self
            .running
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| AuthError::Busy)?;
        tokio::task::spawn_blocking(job)
            .await
            .map_err(AuthError::Task)
    }
}

fn hash_blocking(params: &Params, password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
}
