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

/// In cluster mode the receipts an ack stores in its transaction pass the
/// fence, as every store does: a claim of a receipt's recipient by another
/// node waits for the ack's commit (so that node's drain cannot miss the
/// receipt), and a recipient another node owns gets nothing inserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_stored_in_an_ack_pass_the_cluster_fence() {
    use signal_relay::envelope::Message;
    use signal_relay::storage::{cluster, messages};

    let app = spawn_app().await;
    let (_s, _s_events, sender) = app.register(&crate::helpers::unique("sender")).await;
    let (_k, _k_events, acker) = app.register(&crate::helpers::unique("acker")).await;
    let (me, other) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    cluster::register_node(&app.db, me, "node-me")
        .await
        .unwrap();
    cluster::register_node(&app.db, other, "node-other")
        .await
        .unwrap();
    let mine = cluster::claim_if_free(&app.db, sender.user_id, me, None)
        .await
        .unwrap();
    let mine = cluster::Holder {
        incarnation: me,
        epoch: mine.epoch.unwrap(),
    };
    let receipt = |original| {
        Message::receipt(
            acker.user_id,
            acker.username.as_str().into(),
            original,
            sender.user_id,
            1,
            1_000,
            60_000,
        )
    };
    let stored = |id| {
        let db = app.db.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM messages WHERE id = $1")
                .bind(id)
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };

    // Owned here: inserted, and the other node's claim waits for the commit.
    let first = receipt(uuid::Uuid::new_v4());
    let mut ack = app.db.begin().await.unwrap();
    let moved = messages::insert_receipts(&mut ack, &[&first], Some(me))
        .await
        .unwrap();
    assert!(moved.is_empty());
    let mut claimer = app.db.acquire().await.unwrap();
    sqlx::query("SET lock_timeout = '100ms'")
        .execute(&mut *claimer)
        .await
        .unwrap();
    let blocked = sqlx::query("SELECT * FROM relay_claim_if_free($1, $2, $3, $4)")
        .bind(sender.user_id)
        .bind(other)
        .bind(me)
        .bind(mine.epoch)
        .execute(&mut *claimer)
        .await
        .expect_err("the claim must wait for the ack's transaction");
    assert_eq!(
        blocked
            .as_database_error()
            .and_then(|e| e.code())
            .as_deref(),
        Some("55P03"),
        "lock_not_available, not {blocked}"
    );
    ack.commit().await.unwrap();
    assert_eq!(stored(first.id).await, 1);
    sqlx::query("RESET lock_timeout")
        .execute(&mut *claimer)
        .await
        .unwrap();
    drop(claimer);
    cluster::claim_if_free(&app.db, sender.user_id, other, Some(mine))
        .await
        .unwrap();

    // Owned by the other node now: refused, nothing inserted.
    let second = receipt(uuid::Uuid::new_v4());
    let mut ack = app.db.begin().await.unwrap();
    let moved = messages::insert_receipts(&mut ack, &[&second], Some(me))
        .await
        .unwrap();
    assert_eq!(moved.get(&sender.user_id), Some(&other));
    ack.commit().await.unwrap();
    assert_eq!(stored(second.id).await, 0);
}

/// Cluster ownership: a node that finds a user owned by another records
/// that it wants them, and the owner's claim check sees it (so a move
/// completes without Redis); a claim replaces only the claim it names as
/// waited on (not another node's, nor a newer one of the same node), and a
/// claim that replaced the owner's is lost to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wanted_claim_is_seen_by_its_owner_and_taken_only_from_it() {
    use signal_relay::storage::cluster::{self, ClaimCheck, Holder};

    let app = spawn_app().await;
    let (_u, _u_events, user) = app.register(&crate::helpers::unique("user")).await;
    let (owner, claimer, third) = (
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
    );
    let claim = |me, take_from| cluster::claim_if_free(&app.db, user.user_id, me, take_from);
    let first = claim(owner, None)
        .await
        .unwrap()
        .epoch
        .expect("nobody owned the user");
    let (db, user_id) = (&app.db, user.user_id);
    let check = |epoch: i64| async move {
        cluster::check_claims(db, owner, &[user_id], &[epoch])
            .await
            .unwrap()
    };
    assert_eq!(check(first).await, vec![], "held, and nobody wants it");

    let wanting = claim(claimer, None).await.unwrap();
    let held = Holder {
        incarnation: owner,
        epoch: first,
    };
    assert_eq!((wanting.epoch, wanting.held_by()), (None, Some(held)));
    assert_eq!(
        check(first).await,
        vec![(user.user_id, first, ClaimCheck::Wanted)]
    );
    let stale = Holder {
        incarnation: third,
        epoch: first,
    };
    let elsewhere = claim(claimer, Some(stale)).await.unwrap();
    assert_eq!(elsewhere.held_by(), Some(held), "waited on another node");

    // The user reconnects to the owner: a new claim, wanted by nobody, not
    // taken by a claimer that waited on the old one.
    let second = claim(owner, None).await.unwrap().epoch.unwrap();
    assert_eq!(check(second).await, vec![], "a new claim clears the want");
    let newer = claim(claimer, Some(held)).await.unwrap();
    let held = Holder {
        incarnation: owner,
        epoch: second,
    };
    assert_eq!(newer.held_by(), Some(held), "waited on an older claim");

    let taken = claim(claimer, Some(held)).await.unwrap();
    assert!(taken.epoch.is_some());
    assert_eq!(taken.previous, Some(owner));
    assert_eq!(
        check(second).await,
        vec![(user.user_id, second, ClaimCheck::Lost { exists: true })]
    );
}
