//! Operating the relay: the admin endpoint's metrics move by exactly what
//! clients did, the probes answer on both listeners, and `/healthz` turns
//! 503 once shutdown begins.

use std::collections::HashMap;

use bytes::Bytes;
use signal_relay::client::Outgoing;
use signal_relay::proto::SendOutcome;
use signal_relay::testing::spawn_app;
use uuid::Uuid;

use crate::helpers::{Raw, expect_queue_empty, get, next_delivery, scrape, wait_until};

/// How much `series` grew between two scrapes.
fn moved(before: &HashMap<String, f64>, after: &HashMap<String, f64>, series: &str) -> f64 {
    let value = |m: &HashMap<String, f64>| m.get(series).copied().unwrap_or(0.0);
    value(after) - value(before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_clients_did() {
    let app = spawn_app().await;
    let before = scrape(&app).await;

    let (alice, _alice_events, _) = app.register_live("alice").await;
    let (bob, mut bob_events, bob_auth) = app.register_live("bob").await;
    let bob_id = bob_auth.user_id;
    let content = |n: u8| Bytes::from(vec![n; 8]);

    // Three live deliveries, acked.
    for n in 0..3 {
        let deliver_and_ack = async {
            let delivery = next_delivery(&mut bob_events).await;
            let id = Uuid::from_slice(&delivery.message_id).unwrap();
            bob.ack(&[id]).await.expect("ack");
        };
        let (sent, ()) = tokio::join!(
            alice.send(Outgoing::new(bob_id, content(n))),
            deliver_and_ack
        );
        assert_eq!(sent.expect("send").outcome, SendOutcome::Delivered);
    }
    // Bob leaves: two stored, one ephemeral dropped, one to nobody.
    bob.close().await;
    bob.closed().await;
    wait_until("bob is offline", || async {
        !app.registry.is_online(bob_id)
    })
    .await;
    for n in 3..5 {
        let sent = alice.send(Outgoing::new(bob_id, content(n))).await.unwrap();
        assert_eq!(sent.outcome, SendOutcome::Queued);
    }
    let ephemeral = Outgoing {
        ephemeral: true,
        ..Outgoing::new(bob_id, content(9))
    };
    assert_eq!(
        alice.send(ephemeral).await.unwrap().outcome,
        SendOutcome::Dropped
    );
    assert!(
        alice
            .send(Outgoing::new(Uuid::new_v4(), content(9)))
            .await
            .is_err(),
        "an unknown recipient is refused"
    );
    // Bob comes back: the two stored are drained, acked, and receipted.
    let (bob, mut bob_events) = app.connect().await;
    bob.resume(&bob_auth.token).await.expect("resume");
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(Uuid::from_slice(&next_delivery(&mut bob_events).await.message_id).unwrap());
    }
    expect_queue_empty(&mut bob_events).await;
    bob.ack(&ids).await.expect("ack stored");
    // A failed login.
    let (stranger, _stranger_events) = app.connect().await;
    assert!(stranger.login("bob", "wrong password").await.is_err());

    let after = scrape(&app).await;
    let expect = |series: &str, by: f64| {
        assert_eq!(moved(&before, &after, series), by, "{series}");
    };
    expect(r#"relay_messages_total{outcome="delivered"}"#, 3.0);
    expect(r#"relay_messages_total{outcome="queued"}"#, 2.0);
    expect(r#"relay_messages_total{outcome="dropped"}"#, 1.0);
    expect(r#"relay_messages_total{outcome="rejected"}"#, 1.0);
    expect("relay_acks_total", 5.0);
    expect("relay_messages_drained_total", 2.0);
    expect("relay_receipts_total", 2.0);
    expect("relay_delivery_seconds_count", 3.0);
    expect(r#"relay_auth_total{method="register",result="ok"}"#, 2.0);
    expect(r#"relay_auth_total{method="resume",result="ok"}"#, 1.0);
    expect(
        r#"relay_auth_total{method="login",result="bad_credentials"}"#,
        1.0,
    );
    expect("relay_connections_opened_total", 3.0);
    expect(r#"relay_connections_closed_total{code="none"}"#, 1.0);
    expect("relay_connections", 2.0);
    assert!(
        after["relay_store_batch_size_count"] >= 1.0,
        "the stored messages went through the store writer"
    );
    for present in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        r#"relay_db_pool_connections{state="idle"}"#,
        "relay_store_queue_depth",
        "relay_argon2_queue_depth",
        r#"relay_rate_limited_total{limit="send"}"#,
    ] {
        assert!(after.contains_key(present), "{present} is missing");
    }
    assert!(after["process_resident_memory_bytes"] > 0.0);
    let build_info = after
        .keys()
        .find(|k| k.starts_with("relay_build_info{"))
        .expect("relay_build_info");
    assert!(build_info.contains("version=") && build_info.contains("commit="));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_on_both_listeners_and_metrics_only_on_the_admin_one() {
    let mut app = spawn_app().await;
    for addr in [app.addr, app.admin_addr] {
        assert_eq!(get(addr, "/healthz").await.0, 200);
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(r#""ready":true"#), "{body}");
    }
    assert_eq!(get(app.addr, "/metrics").await.0, 404, "never public");

    // A connected socket that never reads keeps the graceful shutdown going
    // (it answers no close frame, so the server waits for it), during which
    // the admin endpoint must say the relay is going away. A library client
    // would answer the close frame at once and end the shutdown too soon.
    let (client, _events, auth) = app.register("carol").await;
    drop(client);
    let _silent = Raw::upgrade(&app, Some(&auth.token)).await;
    app.shutdown.cancel();
    wait_until("healthz turns 503", || async {
        get(app.admin_addr, "/healthz").await.0 == 503
    })
    .await;
    let (status, body) = get(app.admin_addr, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("shutting_down"), "{body}");
    app.stop().await;
}

/// The relay binary at `trace`, driven through a login, a failed login, a
/// send and an ack: its log holds no password, no session token (hex or
/// base64url) and no message content, and it says who connected and who
/// failed to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_hold_no_secret_and_name_who_came_and_went() {
    use base64::Engine;
    use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncBufReadExt;
    use tokio::process::Command;

    const PASSWORD: &str = "correct-horse-battery";
    const WRONG: &str = "not-the-right-one";
    const CONTENT: &[u8] = b"the-plaintext-never-leaves";

    let (db_name, db_url) = signal_relay::testing::create_database().await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .env("DATABASE_URL", &db_url)
        .env("RELAY_ADMIN_LISTEN", "127.0.0.1:0")
        // Asking by name for the modules that print raw frames, too.
        .env(
            "RUST_LOG",
            "trace,tungstenite=trace,tungstenite::protocol=trace,tokio_tungstenite=trace",
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the relay binary");
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    for output in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let log = log.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(output).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                log.lock().unwrap().push(line);
            }
        });
    }
    let logged = |needle: &str| log.lock().unwrap().iter().any(|l| l.contains(needle));
    let mut addr = None;
    wait_until("the relay listens", || {
        addr = log.lock().unwrap().iter().find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            let fields = v.get("fields")?;
            (fields.get("message")?.as_str()? == "relay listening").then_some(())?;
            let addr = fields.get("addr")?.as_str()?;
            Some(
                addr.trim_start_matches("Some(")
                    .trim_end_matches(')')
                    .to_owned(),
            )
        });
        let found = addr.is_some();
        async move { found }
    })
    .await;
    let url = format!("ws://{}/v1/websocket", addr.unwrap());

    let connect = || signal_relay::client::Client::connect(&url);
    let (alice, _alice_events) = connect().await.unwrap();
    let alice_auth = alice.register("alice", PASSWORD).await.unwrap();
    let (bob, mut bob_events) = connect().await.unwrap();
    let bob_auth = bob.register("bob", PASSWORD).await.unwrap();
    expect_queue_empty(&mut bob_events).await;
    let deliver_and_ack = async {
        let delivery = next_delivery(&mut bob_events).await;
        bob.ack(&[Uuid::from_slice(&delivery.message_id).unwrap()])
            .await
            .unwrap();
    };
    let (sent, ()) = tokio::join!(
        alice.send(Outgoing::new(bob_auth.user_id, Bytes::from_static(CONTENT))),
        deliver_and_ack
    );
    sent.unwrap();
    let (again, _again_events) = connect().await.unwrap();
    let again_auth = again.login("alice", PASSWORD).await.unwrap();
    let (wrong, _wrong_events) = connect().await.unwrap();
    assert!(wrong.login("alice", WRONG).await.is_err());
    for client in [&alice, &bob, &again, &wrong] {
        client.close().await;
    }
    let alice_id = alice_auth.user_id.to_string();
    wait_until("both of alice's sessions are logged as ended", || {
        let ended = log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("connection ended") && l.contains(&alice_id))
            .count();
        async move { ended == 2 }
    })
    .await;
    wait_until("the failed login is logged", || {
        let found = log.lock().unwrap().iter().any(|l| {
            l.contains("authentication failed") && l.contains("alice") && l.contains("127.0.0.1")
        });
        async move { found }
    })
    .await;
    child.kill().await.unwrap();

    let text = log.lock().unwrap().join("\n");
    let mut secrets = vec![PASSWORD.to_owned(), WRONG.to_owned()];
    for token in [&alice_auth.token, &bob_auth.token, &again_auth.token] {
        secrets.push(hex::encode(token));
        secrets.push(URL_SAFE.encode(token));
        secrets.push(URL_SAFE_NO_PAD.encode(token));
    }
    secrets.push(String::from_utf8(CONTENT.to_vec()).unwrap());
    secrets.push(hex::encode(CONTENT));
    secrets.push(base64::engine::general_purpose::STANDARD.encode(CONTENT));
    for secret in &secrets {
        assert!(!text.contains(secret.as_str()), "the log holds {secret:?}");
    }
    assert!(
        logged("sqlx") || logged("TRACE"),
        "the relay really logged at trace"
    );
    let ended = log
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("connection ended") && l.contains(&alice_id))
        .cloned()
        .unwrap();
    for field in [
        "conn_id",
        "peer",
        "auth",
        "close_code",
        "duration_ms",
        "sent",
        "received",
    ] {
        assert!(ended.contains(field), "{field} missing from {ended}");
    }
    tokio::task::block_in_place(|| signal_relay::testing::drop_database(&db_name));
}

/// A relay whose log reader is gone (a supervisor's pipe closed, `relay |
/// tee` with tee killed) keeps serving and still stops on SIGTERM. Every
/// log line then fails with a broken pipe; tracing-subscriber used to
/// report that with `eprintln!` to the same broken pipe, which panics, and
/// the panic took down whichever task was logging: the start itself (this
/// test then never sees the port open), sessions as they ended, and the
/// signal handler, so a SIGTERM was logged into the void and nothing else
/// happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_log_pipe_broke_serves_on_and_stops_on_sigterm() {
    use signal_relay::client::Client;
    use std::process::Stdio;
    use tokio::process::Command;

    let (db_name, db_url) = signal_relay::testing::create_database().await;
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(["--listen", &addr.to_string(), "--admin-listen", "off"])
        .env("DATABASE_URL", &db_url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the relay binary");
    // Nobody reads the logs: the pipes' read ends close now.
    drop(child.stdout.take());
    drop(child.stderr.take());
    wait_until("the relay listens", || {
        signal_relay::testing::listening(addr)
    })
    .await;

    let url = format!("ws://{addr}/v1/websocket");
    // Sessions that log as they start and end, one after the other.
    for round in 0..3 {
        let (client, _events) = Client::connect(&url).await.unwrap();
        match round {
            0 => client.register("alice", "password123").await.map(drop),
            _ => client.login("alice", "password123").await.map(drop),
        }
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
        client.close().await;
        client.closed().await;
    }

    let status = crate::helpers::terminate(&mut child).await;
    assert!(status.success(), "{status:?}");
    tokio::task::block_in_place(|| signal_relay::testing::drop_database(&db_name));
}
