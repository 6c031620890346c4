//! Argon2id password hashing on a fixed pool of dedicated threads, fed by a
//! bounded queue that is fair between clients, so a login storm can neither
//! stall the async workers, queue without limit, nor make one client's
//! flood everyone else's wait.
//!
//! Dedicated threads rather than tokio's blocking pool: each Argon2 run
//! allocates 19 MiB, and glibc keeps that memory in the arena of whichever
//! thread ran it; a blocking pool that grows to many threads left the relay
//! at 1 GB+ after a login storm, while a fixed pool bounds it to about
//! `concurrency` × 19 MiB.
//!
//! Fairness: waiting jobs are kept per client address, each address's in
//! its own short queue, and the workers serve the addresses round robin,
//! one job each per turn. A job from an address with nothing waiting is
//! therefore at most one turn away: it waits for at most one job of each
//! other waiting address (plus those already running), however many one
//! address has queued. When the whole queue is full, a job from an address
//! with fewer waiting than the longest sub-queue takes the place of that
//! sub-queue's newest job (which is answered `busy`), so even many
//! addresses together cannot shut a new one out. A job whose requester has
//! gone (its socket closed, its future dropped) is skipped when its turn
//! comes, not hashed.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use argon2::password_hash::{PasswordHash, SaltString, rand_core::OsRng};
use argon2::{Algorithm, Argon2, Params, PasswordHasher as _, PasswordVerifier, Version};
use tokio::sync::oneshot;

use super::{AuthError, Password};
use crate::ratelimit::address_key;

/// A job, told whether it has its turn or lost its place; given its turn,
/// it runs its hash only if its requester still waits for it.
type Job = Box<dyn FnOnce(Turn) + Send>;

/// What happens to a queued job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// A worker runs it now.
    Run,
    /// A job of an address with fewer waiting took its place.
    Evicted,
}

/// Runs Argon2id jobs. Cheap to clone; clones share the worker threads,
/// which exit once every clone is dropped.
#[derive(Clone)]
pub struct PasswordHasher {
    /// The jobs waiting for a worker.
    queue: Arc<Queue>,
    /// Tells the workers to stop when the last handle goes.
    _stop: Arc<StopOnDrop>,
    /// Argon2 parameters for new hashes.
    params: Params,
    /// A real hash of a random password, verified against when the user
    /// does not exist so both paths cost the same.
    dummy_hash: Arc<str>,
    /// Jobs skipped because their requester had gone.
    abandoned: Arc<AtomicU64>,
}

/// The fair queue: see the module docs.
struct Queue {
    waiting: Mutex<Waiting>,
    /// Signalled when a job is queued or the hasher stops.
    ready: Condvar,
    /// Most jobs waiting in all.
    capacity: usize,
    /// Most jobs waiting from one address.
    per_address: usize,
}

#[derive(Default)]
struct Waiting {
    /// Each address's waiting jobs, oldest first. An address is here only
    /// while it has jobs, so the map is bounded by the queue's capacity.
    jobs: HashMap<IpAddr, VecDeque<Job>>,
    /// The addresses with waiting jobs, in the order they will be served.
    turns: VecDeque<IpAddr>,
    /// Jobs waiting in all.
    len: usize,
    /// Every hasher handle is gone: workers exit.
    stopped: bool,
}

impl Waiting {
    /// Takes the newest job of the address with the most waiting, if it
    /// has more than `than`.
    fn evict_from_longest(&mut self, than: usize) -> Option<Job> {
        let jobs = self.jobs.values_mut().max_by_key(|jobs| jobs.len())?;
        if jobs.len() <= than + 1 {
            // Taking one would leave it no longer than the newcomer's.
            return None;
        }
        // It had more than one, so it still has jobs and keeps its turn.
        let job = jobs.pop_back().expect("a waiting address has jobs");
        self.len -= 1;
        Some(job)
    }
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Full {
    /// The whole queue is full: the server is busy.
    Queue,
    /// This address has its share waiting already.
    Address,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        // Jobs run outside the lock, so a panic cannot leave it half-done.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `job` for `from`, or says why not. The rule, atomic under the
    /// lock: refused when `from` already has `per_address` waiting; when
    /// the queue holds `capacity` jobs, the address with the most waiting
    /// loses its newest job if it has more waiting than `from`, else `job`
    /// is refused; then `job` is appended to `from`'s jobs, and `from`
    /// joins the back of the turns if it had none waiting.
    fn push(&self, from: IpAddr, job: Job) -> Result<(), Full> {
        let mut waiting = self.lock();
        let mine = waiting.jobs.get(&from).map_or(0, VecDeque::len);
        if mine >= self.per_address {
            return Err(Full::Address);
        }
        let evicted = if waiting.len >= self.capacity {
            Some(waiting.evict_from_longest(mine).ok_or(Full::Queue)?)
        } else {
            None
        };
        let jobs = waiting.jobs.entry(from).or_default();
        jobs.push_back(job);
        let first = jobs.len() == 1;
        if first {
            waiting.turns.push_back(from);
        }
        waiting.len += 1;
        drop(waiting);
        self.ready.notify_one();
        if let Some(evicted) = evicted {
            evicted(Turn::Evicted);
        }
        Ok(())
    }

    /// Takes the next job, waiting for one; `None` once stopped. The rule,
    /// atomic under the lock: the address at the front of the turns gives
    /// its oldest job and goes to the back if it has more.
    fn pop(&self) -> Option<Job> {
        let mut waiting = self.lock();
        loop {
            if let Some(from) = waiting.turns.pop_front() {
                let jobs = waiting.jobs.get_mut(&from).expect("a turn has jobs");
                let job = jobs.pop_front().expect("a turn has jobs");
                if jobs.is_empty() {
                    waiting.jobs.remove(&from);
                } else {
                    waiting.turns.push_back(from);
                }
                waiting.len -= 1;
                return Some(job);
            }
            if waiting.stopped {
                return None;
            }
            waiting = self
                .ready
                .wait(waiting)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Stops the workers when dropped (with the last hasher handle).
struct StopOnDrop(Arc<Queue>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let mut waiting = self.0.lock();
        waiting.stopped = true;
        // Waiting jobs are dropped: their requesters see `WorkerGone`.
        waiting.jobs.clear();
        waiting.turns.clear();
        waiting.len = 0;
        drop(waiting);
        self.0.ready.notify_all();
    }
}

impl PasswordHasher {
    /// OWASP's recommendation for Argon2id: 19 MiB, 2 iterations, 1 lane.
    pub fn owasp_params() -> Params {
        Params::new(19 * 1024, 2, 1, None).expect("valid Argon2 parameters")
    }

    /// `concurrency` worker threads; at most `queue` jobs waiting, at most
    /// `per_address` of them from one client address.
    pub fn new(concurrency: usize, queue: usize, per_address: usize) -> Self {
        let params = Self::owasp_params();
        let dummy_hash = hash_blocking(&params, "dummy password for unknown users")
            .expect("hashing a constant succeeds");
        let queue = Arc::new(Queue {
            waiting: Mutex::default(),
            ready: Condvar::new(),
            capacity: queue.max(1),
            per_address: per_address.max(1),
        });
        for i in 0..concurrency.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    while let Some(job) = queue.pop() {
                        // A panicking job must not take the worker with it;
                        // its caller sees `WorkerGone`.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            job(Turn::Run)
                        }));
                    }
                })
                .expect("spawn an Argon2 worker thread");
        }
        Self {
            _stop: Arc::new(StopOnDrop(queue.clone())),
            queue,
            params,
            dummy_hash: dummy_hash.into(),
            abandoned: Arc::default(),
        }
    }

    /// Reads how many jobs wait for a worker.
    pub fn depth_reader(&self) -> impl Fn() -> i64 + Send + Sync + 'static {
        let queue = self.queue.clone();
        move || queue.lock().len as i64
    }

    /// Reads how many jobs were skipped because their requester had gone.
    pub fn abandoned_reader(&self) -> impl Fn() -> u64 + Send + Sync + 'static {
        let abandoned = self.abandoned.clone();
        move || abandoned.load(Ordering::Relaxed)
    }

    /// Hashes a new password for the client at `from`.
    pub async fn hash(&self, password: Password, from: IpAddr) -> Result<String, AuthError> {
        let params = self.params.clone();
        self.run(from, move || hash_blocking(&params, password.expose()))
            .await?
            .map_err(AuthError::Hashing)
    }

    /// Verifies `password` against `hash`, or against the dummy hash when
    /// `hash` is `None` (and then always answers false), for the client at
    /// `from`.
    pub async fn verify(
        &self,
        password: Password,
        hash: Option<String>,
        from: IpAddr,
    ) -> Result<bool, AuthError> {
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.dummy_hash.to_string());
        let matched = self
            .run(from, move || {
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

    /// Runs `work` on a worker, in `from`'s turn. Dropping the returned
    /// future before then withdraws it: the worker skips it.
    async fn run<T: Send + 'static>(
        &self,
        from: IpAddr,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let (done, result) = oneshot::channel();
        let abandoned = self.abandoned.clone();
        let job: Job = Box::new(move |turn| match turn {
            Turn::Evicted => {
                let _ = done.send(Err(AuthError::Busy));
            }
            Turn::Run if done.is_closed() => {
                abandoned.fetch_add(1, Ordering::Relaxed);
            }
            Turn::Run => {
                let _ = done.send(Ok(work()));
            }
        });
        match self.queue.push(address_key(from), job) {
            Ok(()) => result.await.map_err(|_| AuthError::WorkerGone)?,
            Err(Full::Queue) => Err(AuthError::Busy),
            Err(Full::Address) => Err(AuthError::TooManyPending),
        }
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
    use std::sync::mpsc;

    fn addr(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[tokio::test]
    async fn hashes_verify_and_a_full_queue_answers_busy() {
        let hasher = PasswordHasher::new(1, 1, 1);
        let hash = hasher
            .hash(Password::parse("correct horse".into()).unwrap(), addr(1))
            .await
            .unwrap();
        let check = |pw: &str, from: u8| {
            hasher.verify(
                Password::parse(pw.into()).unwrap(),
                Some(hash.clone()),
                addr(from),
            )
        };
        assert!(check("correct horse", 1).await.unwrap());
        assert!(!check("wrong horse!", 1).await.unwrap());
        assert!(
            !hasher
                .verify(
                    Password::parse("correct horse".into()).unwrap(),
                    None,
                    addr(1)
                )
                .await
                .unwrap(),
            "the dummy hash never matches"
        );
        // One worker, one queue slot: a burst of ten is mostly refused, not
        // queued without bound.
        let burst = (0..10).map(|i| check("correct horse", i));
        let results = futures::future::join_all(burst).await;
        let busy = results
            .iter()
            .filter(|r| matches!(r, Err(AuthError::Busy)))
            .count();
        assert!(busy >= 8, "{busy} of 10 refused");
        assert!(results.iter().any(|r| matches!(r, Ok(true))));
    }

    /// Holds the single worker until the returned sender is used (or
    /// dropped), so the test can queue jobs behind it.
    async fn hold_the_worker(hasher: &PasswordHasher) -> mpsc::Sender<()> {
        let (release, held) = mpsc::channel::<()>();
        let (started, running) = oneshot::channel();
        let h = hasher.clone();
        tokio::spawn(async move {
            h.run(addr(250), move || {
                let _ = started.send(());
                let _ = held.recv();
            })
            .await
        });
        running.await.expect("the worker starts the blocker");
        release
    }

    /// The fairness rule: addresses take turns, so a job from an address
    /// with nothing waiting runs after at most one job of each other
    /// address, however many those have queued; and one address cannot
    /// queue more than its share.
    #[tokio::test]
    async fn addresses_take_turns_and_hold_a_bounded_share() {
        let hasher = PasswordHasher::new(1, 100, 5);
        let release = hold_the_worker(&hasher).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut jobs = Vec::new();
        let mut queue_from = |from: u8, name: &'static str| {
            let (order, h) = (order.clone(), hasher.clone());
            jobs.push(tokio::spawn(async move {
                h.run(addr(from), move || order.lock().unwrap().push(name))
                    .await
            }));
        };
        for name in ["a1", "a2", "a3", "a4", "a5"] {
            queue_from(1, name);
        }
        // Let the spawned tasks queue their jobs, in order.
        tokio::task::yield_now().await;
        wait_for_depth(&hasher, 5).await;
        assert!(matches!(
            hasher.run(addr(1), || ()).await,
            Err(AuthError::TooManyPending)
        ));
        queue_from(2, "b1");
        wait_for_depth(&hasher, 6).await;
        drop(release);
        for job in jobs {
            job.await.unwrap().unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order, ["a1", "b1", "a2", "a3", "a4", "a5"]);
    }

    /// The rule when the queue is full: a newcomer with fewer waiting takes
    /// the place of the newest job of the address with the most (which is
    /// answered busy); one that would not be shorter is refused.
    #[tokio::test]
    async fn a_full_queue_makes_room_for_an_address_with_fewer_waiting() {
        let hasher = PasswordHasher::new(1, 4, 4);
        let release = hold_the_worker(&hasher).await;
        let run_from = |from: u8| {
            let h = hasher.clone();
            tokio::spawn(async move { h.run(addr(from), move || from).await })
        };
        let flood: Vec<_> = (0..4).map(|_| run_from(1)).collect();
        wait_for_depth(&hasher, 4).await;
        let newcomer = run_from(2);
        // The flood's newest lost its place to the newcomer.
        let mut flood = flood;
        let newest = flood.pop().unwrap();
        assert!(matches!(newest.await.unwrap(), Err(AuthError::Busy)));
        // Now 1 has three waiting and 2 one: a second job from 2 still
        // takes a place (three is more than two), a third would not.
        let second = run_from(2);
        let evicted = flood.pop().unwrap();
        assert!(matches!(evicted.await.unwrap(), Err(AuthError::Busy)));
        assert!(matches!(
            hasher.run(addr(2), || 2).await,
            Err(AuthError::Busy)
        ));
        drop(release);
        assert_eq!(newcomer.await.unwrap().unwrap(), 2);
        assert_eq!(second.await.unwrap().unwrap(), 2);
        for job in flood {
            assert_eq!(job.await.unwrap().unwrap(), 1);
        }
    }

    async fn wait_for_depth(hasher: &PasswordHasher, depth: i64) {
        let read = hasher.depth_reader();
        while read() < depth {
            tokio::task::yield_now().await;
        }
    }

    /// A job whose requester stopped waiting is skipped, not run.
    #[tokio::test]
    async fn a_withdrawn_job_is_skipped() {
        let hasher = PasswordHasher::new(1, 100, 100);
        let release = hold_the_worker(&hasher).await;
        let ran = Arc::new(AtomicU64::new(0));
        let withdrawn = {
            let (ran, h) = (ran.clone(), hasher.clone());
            tokio::spawn(async move {
                h.run(addr(1), move || ran.fetch_add(1, Ordering::Relaxed))
                    .await
            })
        };
        wait_for_depth(&hasher, 1).await;
        withdrawn.abort();
        let _ = withdrawn.await;
        let kept = {
            let ran = ran.clone();
            hasher.run(addr(2), move || ran.fetch_add(10, Ordering::Relaxed))
        };
        drop(release);
        kept.await.unwrap();
        assert_eq!(ran.load(Ordering::Relaxed), 10, "only the kept job ran");
        assert_eq!(hasher.abandoned_reader()(), 1);
    }
}
