//! The `relay` binary's admin subcommands, each run as a process against a
//! fresh database, checked by their output, exit code and the rows they
//! leave.

use std::process::Output;
use std::str::FromStr;

use signal_relay::client::Outgoing;
use signal_relay::keys::testing::TestIdentity;
use signal_relay::proto::Status;
use signal_relay::testing::{TestApp, admin_url, spawn_app};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use uuid::Uuid;

use crate::helpers::{WAIT, unique, wait_until};

/// Runs `relay ARGS` with only `env` in its environment (nothing of this
/// process's DATABASE_URL or RELAY_* leaks in).
async fn relay(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay"));
    command.env_clear().args(args).kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    tokio::time::timeout(WAIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("relay {args:?} did not finish within {WAIT:?}"))
        .expect("run relay")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts the exit code, showing both streams when it differs.
fn assert_exit(output: &Output, code: i32, what: &str) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "{what}: stdout {:?}, stderr {:?}",
        stdout(output),
        stderr(output)
    );
}

/// The app's database URL, for `--database-url`.
fn url_of(app: &TestApp) -> String {
    use secrecy::ExposeSecret;
    app.config.database_url.expose_secret().to_owned()
}

/// The migrations in `migrations/`, as (version, description) from their
/// file names.
fn migrations() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut found: Vec<(String, String)> = std::fs::read_dir(dir)
        .expect("migrations directory")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter_map(|name| {
            let stem = name.strip_suffix(".sql")?;
            let (version, description) = stem.split_once('_')?;
            Some((version.to_owned(), description.replace('_', " ")))
        })
        .collect();
    found.sort();
    found
}

/// A database name no one has created; dropped (if it was) on drop.
struct Scratch {
    name: String,
    url: String,
}

impl Scratch {
    fn new() -> Scratch {
        let name = format!("relay_test_{}", Uuid::new_v4().simple());
        let url = PgConnectOptions::from_str(&admin_url())
            .expect("valid admin URL")
            .database(&name)
            .to_url_lossy()
            .to_string();
        Scratch { name, url }
    }

    async fn exists(&self) -> bool {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url())
            .await
            .expect("admin connection");
        let exists =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&self.name)
                .fetch_one(&admin)
                .await
                .expect("query pg_database");
        admin.close().await;
        exists
    }

    async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.url)
            .await
            .expect("connect to the scratch database")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        signal_relay::testing::drop_database(&self.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_applies_and_check_reports_pending() {
    let db = Scratch::new();
    let url = db.url.as_str();
    let all = migrations();
    assert!(!all.is_empty());

    // --check on a missing database: everything pending, nothing created.
    let check = relay(&["migrate", "--check", "--database-url", url], &[]).await;
    assert_exit(&check, 3, "check before migrating");
    let text = stdout(&check);
    for (version, description) in &all {
        assert!(
            text.contains(&format!("pending {version} {description}\n")),
            "{text}"
        );
    }
    assert!(text.contains("does not exist"), "{text}");
    assert!(!db.exists().await, "--check must not create the database");

    // The admin commands refuse a database that is not migrated.
    let list = relay(&["users", "list"], &[("DATABASE_URL", url)]).await;
    assert_exit(&list, 1, "users list before migrating");
    assert!(stderr(&list).contains("relay migrate"), "{}", stderr(&list));

    // migrate creates the database and applies everything, in order.
    let migrate = relay(&["--database-url", url, "migrate"], &[]).await;
    assert_exit(&migrate, 0, "migrate");
    let text = stdout(&migrate);
    assert!(
        text.starts_with(&format!("created database {}\n", db.name)),
        "{text}"
    );
    let applied: Vec<&str> = text.lines().filter(|l| l.starts_with("applied ")).collect();
    let expected: Vec<String> = all
        .iter()
        .map(|(v, d)| format!("applied {v} {d}"))
        .collect();
    assert_eq!(applied, expected);
    let pool = db.pool().await;
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(recorded as usize, all.len());

    let check = relay(&["migrate", "--check"], &[("DATABASE_URL", url)]).await;
    assert_exit(&check, 0, "check after migrating");
    assert!(
        stdout(&check).contains("is up to date"),
        "{}",
        stdout(&check)
    );

    // Undo the newest migration by hand: --check names it, migrate
    // re-applies just it, and a second migrate has nothing to do. (Each of
    // its statements may run again, so forgetting it was applied is undo
    // enough.)
    let (version, description) = all.last().unwrap().clone();
    assert_eq!(description, "presence wanted", "the undo below is for it");
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(version.parse::<i64>().unwrap())
        .execute(&pool)
        .await
        .unwrap();
    let check = relay(&["migrate", "--check"], &[("DATABASE_URL", url)]).await;
    assert_exit(&check, 3, "check with one pending");
    let pending: Vec<String> = stdout(&check)
        .lines()
        .filter(|l| l.starts_with("pending "))
        .map(str::to_owned)
        .collect();
    assert_eq!(pending, vec![format!("pending {version} {description}")]);

    let migrate = relay(&["migrate"], &[("DATABASE_URL", url)]).await;
    assert_exit(&migrate, 0, "migrate the one pending");
    let text = stdout(&migrate);
    assert!(!text.contains("created database"), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("applied "))
            .collect::<Vec<_>>(),
        vec![format!("applied {version} {description}")]
    );
    let again = relay(&["migrate"], &[("DATABASE_URL", url)]).await;
    assert_exit(&again, 0, "migrate when up to date");
    assert!(
        !stdout(&again).lines().any(|l| l.starts_with("applied ")),
        "{}",
        stdout(&again)
    );
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_shows_every_layer_and_masks_the_password() {
    let dir = std::env::temp_dir().join(format!("relay-admin-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("relay.toml");
    std::fs::write(
        &file,
        "database_url = \"postgres://relay:s3cret-pw@db.internal:5432/relay?sslmode=prefer\"\n\
         max_connections = 7\nidle-timeout-secs = 9\nmax_sessions_per_user = 5\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let env = [("RELAY_CONFIG", file), ("RELAY_IDLE_TIMEOUT_SECS", "11")];
    let out = relay(&["--max-sessions-per-user", "6", "check-config"], &env).await;
    assert_exit(&out, 0, "check-config");
    let text = stdout(&out);
    for line in [
        "database_url = \"postgres://relay:********@db.internal:5432/relay?sslmode=prefer\"  # config file",
        "max_connections = 7  # config file",
        "idle_timeout_secs = 11  # env RELAY_IDLE_TIMEOUT_SECS",
        "max_sessions_per_user = 6  # flag",
        "max_frame_bytes = 524288  # default",
        "listen = \"127.0.0.1:8080\"  # default",
        "# tls_cert is unset",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in\n{text}"
        );
    }
    assert!(!text.contains("s3cret-pw") && !stderr(&out).contains("s3cret-pw"));

    // A password given in the environment is masked too, as is one in a
    // query parameter.
    let out = relay(
        &["check-config"],
        &[("DATABASE_URL", "postgres://u:envpw@h/db?password=qpw")],
    )
    .await;
    assert_exit(&out, 0, "check-config with DATABASE_URL");
    let text = stdout(&out);
    assert!(!text.contains("envpw") && !text.contains("qpw"), "{text}");
    assert!(text.contains("# env DATABASE_URL"), "{text}");

    // The output is itself a config file the relay accepts, to the same
    // effect.
    let out = relay(&["check-config", "--config", file], &[]).await;
    let printed = dir.join("printed.toml");
    std::fs::write(&printed, stdout(&out)).unwrap();
    let reread = relay(
        &["check-config", "--config", printed.to_str().unwrap()],
        &[],
    )
    .await;
    assert_exit(&reread, 0, "check-config of its own output");
    let values = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split("  # ").next().map(str::to_owned))
            .collect()
    };
    assert_eq!(values(&stdout(&out)), values(&stdout(&reread)));

    // Broken configurations fail: an unknown file key exits 1, a bad value 2.
    std::fs::write(dir.join("bad.toml"), "no_such_setting = 1\n").unwrap();
    let bad = dir.join("bad.toml");
    let out = relay(&["check-config", "--config", bad.to_str().unwrap()], &[]).await;
    assert_exit(&out, 1, "unknown key");
    assert!(stderr(&out).contains("no_such_setting"), "{}", stderr(&out));
    let out = relay(&["check-config"], &[("RELAY_MAX_SESSIONS_PER_USER", "0")]).await;
    assert_exit(&out, 2, "a cap of zero sessions");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_list_show_revoke_and_delete() {
    let app = spawn_app().await;
    let url = url_of(&app);
    let env = [("DATABASE_URL", url.as_str())];
    let alice = unique("Alice");
    let bob = unique("bob");

    // Alice publishes keys, holds two sessions, and goes offline; Bob queues
    // two messages for her.
    let (client, events, alice_auth) = app.register_live(&alice).await;
    let identity = TestIdentity::generate();
    client
        .upload_keys(identity.upload(7, 1..=5, 1..=3, 100))
        .await
        .expect("upload keys");
    let (second, _e) = app.connect().await;
    let second_login = second.login(&alice, "password123").await.unwrap();
    second.close().await;
    client.close().await;
    drop(events);
    client.closed().await;
    let (bob_client, _bob_events, _bob_auth) = app.register_live(&bob).await;
    for body in ["one", "two"] {
        bob_client
            .send(Outgoing::new(alice_auth.user_id, body.as_bytes().to_vec()))
            .await
            .expect("send to offline alice");
    }

    let list = relay(&["users", "list"], &env).await;
    assert_exit(&list, 0, "users list");
    let text = stdout(&list);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["USERNAME", "ID", "CREATED"]);
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert_eq!(rows[0][0], alice, "oldest first");
    assert_eq!(rows[0][1], alice_auth.user_id.to_string());
    assert!(rows[0][2].ends_with('Z'), "RFC 3339 UTC: {text}");
    assert_eq!(rows[1][0], bob);
    assert_eq!(stderr(&list), "", "nothing more follows");

    // A page at a time: stderr says how to go on, stdout stays the list.
    let first = relay(&["users", "list", "--limit", "1"], &env).await;
    assert_exit(&first, 0, "users list --limit 1");
    let text = stdout(&first);
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{text}");
    assert!(rows[0].starts_with(&alice), "{text}");
    assert_eq!(
        stderr(&first),
        format!("more users follow: relay users list --limit 1 --after={alice}\n")
    );
    let next = relay(
        &[
            "users",
            "list",
            "--limit",
            "1",
            "--after",
            &alice.to_uppercase(),
        ],
        &env,
    )
    .await;
    assert_exit(&next, 0, "users list --after");
    let text = stdout(&next);
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{text}");
    assert!(rows[0].starts_with(&bob), "{text}");
    assert_eq!(stderr(&next), "", "bob is the last");
    let past = relay(&["users", "list", "--after", &bob], &env).await;
    assert_exit(&past, 0, "users list after the last");
    assert_eq!(stdout(&past).lines().count(), 1, "only the header");
    let unknown = relay(&["users", "list", "--after", "nobody-has-this-name"], &env).await;
    assert_exit(&unknown, 4, "users list --after an unknown name");
    let zero = relay(&["users", "list", "--limit", "0"], &env).await;
    assert_exit(&zero, 2, "users list --limit 0");

    // Any letter case finds her.
    let show = relay(&["users", "show", &alice.to_uppercase()], &env).await;
    assert_exit(&show, 0, "users show");
    let text = stdout(&show);
    for line in [
        format!("username:           {alice}"),
        format!("id:                 {}", alice_auth.user_id),
        "identity key:       present".to_owned(),
        "signed pre-key:     present".to_owned(),
        "one-time EC keys:   5".to_owned(),
        "one-time Kyber keys: 3".to_owned(),
        "Kyber last resort:  present".to_owned(),
        "queued messages:    2".to_owned(),
        "live sessions:      2".to_owned(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in\n{text}"
        );
    }
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users WHERE id = $1")
        .bind(alice_auth.user_id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(!text.contains(&hash) && !text.contains("argon2"), "{text}");
    let show_bob = relay(&["users", "show", &bob], &env).await;
    assert!(stdout(&show_bob).contains("signed pre-key:     absent"));

    // Revoking her sessions: both tokens stop resuming.
    let revoke = relay(&["users", "revoke-sessions", &alice], &env).await;
    assert_exit(&revoke, 0, "revoke-sessions");
    assert_eq!(
        stdout(&revoke),
        format!("revoked 2 session(s) of {alice} ({})\n", alice_auth.user_id)
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions WHERE user_id = $1")
        .bind(alice_auth.user_id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(left, 0);
    for token in [&alice_auth.token, &second_login.token] {
        let (c, _e) = app.connect().await;
        let err = c.resume(token).await.unwrap_err();
        assert_eq!(err.status(), Some(Status::Unauthorized));
    }

    // Without --yes, nothing goes: it says what would.
    let unconfirmed = relay(&["users", "delete", &alice], &env).await;
    assert_exit(&unconfirmed, 1, "delete without --yes");
    assert!(unconfirmed.stdout.is_empty());
    let said = stderr(&unconfirmed);
    assert!(
        said.starts_with(&format!(
            "error: would delete {alice} ({})",
            alice_auth.user_id
        )) && said.ends_with("nothing was changed: run again with --yes to do it\n"),
        "{said}"
    );
    let still: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE id = $1")
        .bind(alice_auth.user_id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(still, 1);

    // Deleting her removes everything of hers, and nothing of Bob's.
    let delete = relay(&["users", "delete", &alice, "--yes"], &env).await;
    assert_exit(&delete, 0, "delete");
    assert!(
        stdout(&delete).starts_with(&format!("deleted {alice} ({})", alice_auth.user_id)),
        "{}",
        stdout(&delete)
    );
    for table in [
        "users WHERE id = $1",
        "identity_keys WHERE user_id = $1",
        "signed_pre_keys WHERE user_id = $1",
        "one_time_pre_keys WHERE user_id = $1",
        "kyber_pre_keys WHERE user_id = $1",
        "kyber_last_resort_keys WHERE user_id = $1",
        "sessions WHERE user_id = $1",
        "messages WHERE recipient_id = $1",
    ] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .bind(alice_auth.user_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
        assert_eq!(n, 0, "{table}");
    }
    let bobs: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE username = $1")
        .bind(&bob)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(bobs, 1);

    // An unknown name is a clear error with its own exit code.
    for command in ["show", "delete", "revoke-sessions"] {
        let out = relay(&["users", command, &alice], &env).await;
        assert_exit(&out, 4, command);
        assert!(out.stdout.is_empty());
        assert_eq!(stderr(&out), format!("error: no user is named {alice:?}\n"));
    }
}

/// `relay users list | head -0`: output cut by its reader is the reader's
/// choice. The command exits as its task did, not with a panic (101).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_command_whose_reader_left_exits_as_its_task_did() {
    let app = spawn_app().await;
    let url = url_of(&app);
    app.register_live(&unique("listed")).await;
    for (args, code) in [
        (&["users", "list"][..], 0),
        // An error's message goes to stderr, which is closed too.
        (&["users", "show", "nobody-has-this-name"][..], 4),
    ] {
        // Both pipes lose their reader before the command starts.
        let (out_read, out_write) = std::io::pipe().expect("a pipe");
        let (err_read, err_write) = std::io::pipe().expect("a pipe");
        drop((out_read, err_read));
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay"));
        command
            .env_clear()
            .env("DATABASE_URL", &url)
            .args(args)
            .stdout(out_write)
            .stderr(err_write)
            .kill_on_drop(true);
        let status = tokio::time::timeout(WAIT, command.status())
            .await
            .expect("the command finished in time")
            .expect("run relay");
        assert_eq!(status.code(), Some(code), "relay {args:?}: {status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_subcommand_relay_still_serves() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let db = Scratch::new();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .env_clear()
        .env("RUST_LOG", "info")
        .args(["--listen", "127.0.0.1:0", "--database-url", &db.url])
        // Not the default admin port: other relays may run beside it.
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(["--argon2-concurrency", "1", "--log-format", "json"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start relay");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.expect("read log") {
            if !line.contains("relay listening") {
                continue;
            }
            if let Some(rest) = line.split("Some(").nth(1) {
                return rest.split(')').next().map(str::to_owned);
            }
        }
        None
    })
    .await
    .expect("relay listening in time")
    .expect("a listening line with the address");

    let url = format!("ws://{addr}/v1/websocket");
    let (client, _events) = signal_relay::client::Client::connect(&url)
        .await
        .expect("connect");
    client
        .register(&unique("served"), "password123")
        .await
        .expect("register");
    assert!(db.exists().await, "the server created its database");

    let status = crate::helpers::terminate(&mut child).await;
    assert!(status.success(), "{status}");
}

/// An operator's `users revoke-sessions` and `users delete` run in another
/// process. The relay holding the user's socket hears of it through
/// PostgreSQL and closes the socket at once (4401 "session token revoked",
/// 1000 "account deleted"), rather than leaving it open until it
/// reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_cutting_a_user_off_closes_their_socket() {
    let app = spawn_app().await;
    let url = url_of(&app);
    let env = [("DATABASE_URL", url.as_str())];
    let carol = unique("carol");
    let (_client, mut events, _auth) = app.register_live(&carol).await;
    // The relay listens on a connection of its own; a notification sent
    // before it listens is not heard (and the test would wait in vain).
    wait_until("the relay listens for users cut off", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE 'LISTEN%relay_cut_off%'",
        )
        .fetch_one(&app.db)
        .await
        .unwrap()
            > 0
    })
    .await;

    let out = relay(&["users", "revoke-sessions", &carol], &env).await;
    assert_exit(&out, 0, "users revoke-sessions");
    let closed = tokio::time::timeout(WAIT, events.closed())
        .await
        .expect("the socket closed in time");
    assert_eq!(closed.code, Some(4401), "{closed:?}");
    assert_eq!(closed.reason, "session token revoked");

    let (client, mut events) = app.connect().await;
    client
        .login(&carol, "password123")
        .await
        .expect("log in again");
    let out = relay(&["users", "delete", &carol, "--yes"], &env).await;
    assert_exit(&out, 0, "users delete");
    let closed = tokio::time::timeout(WAIT, events.closed())
        .await
        .expect("the socket closed in time");
    assert_eq!(closed.code, Some(1000), "{closed:?}");
    assert_eq!(closed.reason, "account deleted");
}
