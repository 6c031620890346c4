//! Smoke tests of the scenarios for other load generators (bench/artillery,
//! bench/tsung): each runs for a few seconds against a real relay (in this
//! process, on a fresh database) with accounts from `relay-bench seed`, so
//! the scenarios cannot rot. Numbers are never asserted; only that every
//! message went through and nothing failed.
//!
//! They need the tool installed. `.ci/run` installs Artillery, so in CI
//! (`CI` set) a missing `artillery` fails the test; elsewhere, and for
//! tsung (not installed by CI: it brings Erlang), a missing tool skips it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::ExposeSecret;
use serde_json::Value;
use signal_relay::testing::{TestApp, spawn_app};

/// Whether `tool` runs; panics in CI for a tool CI installs.
fn installed(tool: &str, ci_installs: bool) -> bool {
    let found = std::process::Command::new(tool)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            !(ci_installs && std::env::var_os("CI").is_some()),
            "{tool} is not installed, and .ci/run installs it"
        );
        eprintln!("skipped: {tool} is not installed");
    }
    found
}

/// A fresh directory for one run's files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "relay-{name}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("create a scratch directory");
    dir
}

/// Seeds `count` accounts with `relay-bench seed` into `dir/<file>`.
async fn seed(app: &TestApp, dir: &Path, file: &str, count: usize) {
    let out = dir.join(file);
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay-bench"))
        .args(["seed", "--count", &count.to_string(), "--prefix", "tool"])
        .arg("--out")
        .arg(&out)
        .args(["--database-url", app.config.database_url.expose_secret()])
        .kill_on_drop(true)
        .status()
        .await
        .expect("run relay-bench seed");
    assert!(status.success(), "relay-bench seed failed");
    let csv = std::fs::read_to_string(&out).expect("the seed wrote its CSV");
    assert_eq!(csv.lines().count(), count);
    for line in csv.lines() {
        assert_eq!(line.split(',').count(), 3, "username,user_id,token: {line}");
    }
}

/// Copies the scenario's files from bench/`tool` into `dir`, beside the
/// accounts (the tools read them relative to the scenario).
fn copy_scenario(tool: &str, files: &[&str], dir: &Path) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(tool);
    for file in files {
        std::fs::copy(source.join(file), dir.join(file))
            .unwrap_or_else(|e| panic!("copy {tool}/{file}: {e}"));
    }
}

/// Runs `command` to completion with a generous bound, returning its
/// output; panics with both streams if it fails.
async fn run(mut command: tokio::process::Command, what: &str) -> std::process::Output {
    let output = tokio::time::timeout(
        Duration::from_secs(180),
        command.kill_on_drop(true).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{what} did not finish in 180 s"))
    .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

const USERS: usize = 4;
/// Per user: ten for Artillery, whose users send to each other, so that
/// partners arriving a quarter second apart still overlap by seconds.
const MESSAGES: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_artillery_scenario_runs() {
    if !installed("artillery", true) {
        return;
    }
    let app = spawn_app().await;
    let dir = scratch("artillery");
    seed(&app, &dir, "accounts.csv", USERS).await;
    copy_scenario("artillery", &["relay.yml", "relay.js"], &dir);
    let report = dir.join("report.json");
    let mut command = tokio::process::Command::new("artillery");
    command
        .current_dir(&dir)
        .env("ARTILLERY_DISABLE_TELEMETRY", "true")
        .args(["run", "--target", &app.url])
        .args(["--variables", &format!(r#"{{"messages": {MESSAGES}}}"#)])
        .args([
            "--overrides",
            &format!(r#"{{"config": {{"phases": [{{"duration": 1, "arrivalCount": {USERS}}}]}}}}"#),
        ])
        .arg("--output")
        .arg(&report)
        .arg("relay.yml");
    run(command, "artillery").await;

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("artillery's report"))
            .expect("the report is JSON");
    let counters = &report["aggregate"]["counters"];
    let count = |name: &str| counters[name].as_u64().unwrap_or(0);
    assert_eq!(count("vusers.created"), USERS as u64, "{counters:#}");
    assert_eq!(count("vusers.failed"), 0, "{counters:#}");
    assert_eq!(count("relay.errors"), 0, "{counters:#}");
    assert_eq!(
        count("relay.delivered") + count("relay.queued"),
        (USERS * MESSAGES) as u64,
        "every message answered: {counters:#}"
    );
    // Partners overlap, so most messages went live: delivered, acked, timed.
    assert!(count("relay.delivered") > 0, "{counters:#}");
    assert!(count("relay.received") > 0, "{counters:#}");
    let summaries = &report["aggregate"]["summaries"];
    for timed in ["relay.round_trip_ms", "relay.deliver_ms"] {
        assert!(
            summaries[timed]["count"].as_u64() > Some(0),
            "{timed}: {summaries:#}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tsung_scenario_runs() {
    if !installed("tsung", false) {
        return;
    }
    let app = spawn_app().await;
    let dir = scratch("tsung");
    seed(&app, &dir, "accounts.csv", USERS).await;
    seed(&app, &dir, "recipients.csv", USERS).await;
    // The scenario at a smoke test's size, pointed at this relay.
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tsung/relay.xml");
    let xml = std::fs::read_to_string(&source).expect("read tsung/relay.xml");
    let port = app.addr.port().to_string();
    let sized = xml
        .replace(r#"port="8080""#, &format!(r#"port="{port}""#))
        .replace(r#"to="150""#, &format!(r#"to="{MESSAGES}""#))
        .replace(
            r#"<users maxnumber="40" arrivalrate="4" unit="second"/>"#,
            &format!(r#"<users maxnumber="{USERS}" arrivalrate="{USERS}" unit="second"/>"#),
        );
    assert_ne!(sized, xml, "the scenario's sizes moved; update this test");
    std::fs::write(dir.join("relay.xml"), sized).expect("write the scenario");
    let logs = dir.join("log");
    let mut command = tokio::process::Command::new("tsung");
    command
        .current_dir(&dir)
        .args(["-f", "relay.xml", "-l"])
        .arg(&logs)
        .arg("start");
    run(command, "tsung").await;

    // tsung's statistics, the last interval's lines: a sample is `stats:
    // NAME count mean stddev max min mean_before count_before` (counts of
    // the last interval and of those before it), a counter `stats: NAME
    // count total`.
    let log = std::fs::read_dir(&logs)
        .expect("tsung's log directory")
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("tsung.log"))
        .find(|path| path.exists())
        .expect("a tsung.log");
    let stats = std::fs::read_to_string(log).expect("read tsung.log");
    let count = |name: &str| {
        stats
            .lines()
            .rev()
            .find_map(|line| {
                let mut words = line.strip_prefix("stats: ")?.split_whitespace();
                if words.next()? != name {
                    return None;
                }
                let numbers: Vec<f64> = words.filter_map(|w| w.parse().ok()).collect();
                match numbers.len() {
                    2 => Some(numbers[1] as u64),
                    7 => Some((numbers[0] + numbers[6]) as u64),
                    _ => None,
                }
            })
            .unwrap_or(0)
    };
    assert_eq!(count("tr_resume"), USERS as u64, "{stats}");
    assert_eq!(count("tr_send"), (USERS * MESSAGES) as u64, "{stats}");
    // Every match held: each resume answered OK, each send QUEUED.
    assert_eq!(count("match"), (USERS + USERS * MESSAGES) as u64, "{stats}");
    // This test's own database: every message is in the pool's queues.
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&app.db)
        .await
        .expect("count stored messages");
    assert_eq!(stored, (USERS * MESSAGES) as i64, "every message stored");
    let _ = std::fs::remove_dir_all(&dir);
}
