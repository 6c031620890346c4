//! The batch-worker mechanism under the store writer and the reader, on a
//! real database, with each connection source a caller may choose.

use signal_relay::storage::StorageError;
use signal_relay::storage::batch::{Batch, Conn, Source, WorkerLimits, Workers};
use signal_relay::testing::spawn_app;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

use crate::helpers::WAIT;

/// Doubles numbers in PostgreSQL, a whole batch per statement.
struct Doubler;

type Job = (i64, oneshot::Sender<Result<i64, String>>);

impl Batch for Doubler {
    type Job = Job;

    async fn run(&mut self, conn: &mut Conn, jobs: &mut Vec<Job>) {
        let inputs: Vec<i64> = jobs.iter().map(|(n, _)| *n).collect();
        let doubled = conn
            .run(|| {
                async |c| {
                    sqlx::query_scalar::<_, i64>("SELECT n * 2 FROM UNNEST($1::int8[]) AS t(n)")
                        .bind(&inputs)
                        .fetch_all(c)
                        .await
                        .map_err(StorageError::from)
                }
            })
            .await;
        for (i, (_, done)) in jobs.drain(..).enumerate() {
            let _ = done.send(match &doubled {
                Ok(rows) => Ok(rows[i]),
                Err(err) => Err(err.to_string()),
            });
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_workers_answer_every_job_and_stop_with_their_last_handle() {
    // The app is only here for its database, dropped with it.
    let app = spawn_app().await;
    let pool = app.db.clone();
    for source in [Source::Dedicated, Source::Pool] {
        let tasks = TaskTracker::new();
        let limits = WorkerLimits {
            timeout: WAIT,
            workers: 2,
            queue: 8,
            batch: 16,
        };
        let workers = Workers::spawn(pool.clone(), source, limits, &tasks, || Doubler);
        // More jobs than the queue holds, all at once: submitters wait for
        // room, and workers take several per batch.
        let answers = futures::future::join_all((0..100).map(|n| {
            let workers = workers.clone();
            async move {
                let (done, answer) = oneshot::channel();
                workers.submit((n, done)).await.expect("workers running");
                answer.await.expect("answered")
            }
        }))
        .await;
        for (n, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer, Ok(2 * n as i64), "{source:?}");
        }
        drop(workers);
        tasks.close();
        tokio::time::timeout(WAIT, tasks.wait())
            .await
            .unwrap_or_else(|_| panic!("{source:?} workers outlived their handles"));
    }
}
