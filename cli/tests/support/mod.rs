//! Driving `relay-cli` as a user would: one profile directory per user, the
//! real binary as a child process, `--json` output read line by line.
//!
//! Nothing here sleeps to synchronise: every wait is for a line of output
//! or a process exit, bounded by [`WAIT`] so a broken build fails instead of
//! hanging.

#![allow(dead_code)] // Each test file uses a different part of this.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;
use signal_relay::testing::TestApp;
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use uuid::Uuid;

/// Upper bound on one wait. Generous: tests run in parallel, in debug
/// builds, on small CI machines.
pub const WAIT: Duration = Duration::from_secs(90);

pub const PASSWORD: &str = "correct horse battery";

/// Exit codes, as documented in `relay-cli --help`.
pub const EXIT_UNREACHABLE: i32 = 3;
pub const EXIT_BAD_CREDENTIALS: i32 = 4;
pub const EXIT_UNKNOWN_USER: i32 = 5;
pub const EXIT_IDENTITY_CHANGED: i32 = 6;
pub const EXIT_PROFILE: i32 = 7;
pub const EXIT_NO_KEYS: i32 = 8;
pub const EXIT_OTHER_DEVICE: i32 = 9;

/// A username unique to this run (the relay's usernames are global).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &Uuid::new_v4().simple().to_string()[..10])
}

/// One user: a profile directory and the relay it talks to.
pub struct User {
    pub name: String,
    /// Removed when the user is dropped.
    dir: tempfile::TempDir,
    /// `--profile`; a subdirectory, so the CLI creates it with its own mode.
    pub profile: PathBuf,
    pub server: String,
}

/// A finished command.
#[derive(Debug)]
pub struct Done {
    pub status: ExitStatus,
    /// Every stdout line, parsed.
    pub events: Vec<Value>,
    pub stderr: String,
}

impl Done {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The events named `name`.
    pub fn named(&self, name: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["event"] == name).collect()
    }

    /// The one event named `name`.
    pub fn one(&self, name: &str) -> &Value {
        let found = self.named(name);
        assert_eq!(found.len(), 1, "expected one {name:?} event in {self:#?}");
        found[0]
    }

    /// The message of the error the command ended with.
    pub fn error_message(&self) -> &str {
        self.one("error")["message"]
            .as_str()
            .expect("an error message")
    }

    /// The texts of the messages received, in order.
    pub fn texts(&self) -> Vec<String> {
        self.named("message")
            .iter()
            .map(|m| m["text"].as_str().expect("text").to_owned())
            .collect()
    }
}

impl User {
    pub fn new(app: &TestApp, prefix: &str) -> User {
        let dir = tempfile::tempdir().expect("temp dir");
        let profile = dir.path().join("profile");
        User {
            name: unique(prefix),
            dir,
            profile,
            server: app.url.clone(),
        }
    }

    /// The same user on a fresh, empty profile (a reinstall).
    pub fn reinstalled(&self) -> User {
        let dir = tempfile::tempdir().expect("temp dir");
        let profile = dir.path().join("profile");
        User {
            name: self.name.clone(),
            dir,
            profile,
            server: self.server.clone(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        self.command_at(&self.server, args)
    }

    fn command_at(&self, server: &str, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_relay-cli"));
        command
            .arg("--profile")
            .arg(&self.profile)
            .arg("--server")
            .arg(server)
            .arg("--json")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// Runs a command to completion, feeding it `stdin`.
    pub async fn run_with(&self, args: &[&str], stdin: &str) -> Done {
        self.finish(self.command(args), args, stdin).await
    }

    /// Runs a command against another server URL.
    pub async fn run_at(&self, server: &str, args: &[&str]) -> Done {
        self.finish(self.command_at(server, args), args, "").await
    }

    async fn finish(&self, mut command: Command, args: &[&str], stdin: &str) -> Done {
        let mut child = command.spawn().expect("start relay-cli");
        let mut input = child.stdin.take().expect("stdin");
        input
            .write_all(stdin.as_bytes())
            .await
            .expect("write stdin");
        drop(input);
        let output = tokio::time::timeout(WAIT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("relay-cli {args:?} did not finish within {WAIT:?}"))
            .expect("relay-cli output");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let events = stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?} from {args:?}"))
            })
            .collect();
        Done {
            status: output.status,
            events,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    pub async fn run(&self, args: &[&str]) -> Done {
        self.run_with(args, "").await
    }

    /// Runs a command that must succeed.
    pub async fn ok(&self, args: &[&str]) -> Done {
        let done = self.run(args).await;
        assert!(
            done.status.success(),
            "{} {args:?} failed: {done:#?}",
            self.name
        );
        done
    }

    /// Runs a command that must fail with `code`.
    pub async fn fails(&self, args: &[&str], code: i32) -> Done {
        self.fails_with(args, "", code).await
    }

    /// Runs a command, fed `stdin`, that must fail with `code`.
    pub async fn fails_with(&self, args: &[&str], stdin: &str, code: i32) -> Done {
        let done = self.run_with(args, stdin).await;
        assert_eq!(
            done.code(),
            Some(code),
            "{} {args:?} should exit {code}: {done:#?}",
            self.name
        );
        let error = done.one("error");
        assert_eq!(error["exit_code"], code, "{error}");
        done
    }

    /// Registers (password on stdin) and publishes keys.
    pub async fn register_with_keys(&self) -> Uuid {
        let done = self
            .run_with(&["register", &self.name], &format!("{PASSWORD}\n"))
            .await;
        assert!(done.status.success(), "register {}: {done:#?}", self.name);
        let id = done.one("registered")["user_id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .expect("user id");
        let keys = self.ok(&["keys"]).await;
        let up = keys.one("keys_uploaded");
        assert_eq!(up["one_time_pre_keys"], 100, "{up}");
        assert_eq!(up["kyber_pre_keys"], 100, "{up}");
        id
    }

    /// Sends one message; returns the `sent` event.
    pub async fn send(&self, to: &User, text: &str) -> Value {
        self.ok(&["send", &to.name, text]).await.one("sent").clone()
    }

    /// Starts a long-running command (`chat`, `recv --follow`).
    pub fn spawn(&self, args: &[&str]) -> Running {
        let mut child = self.command(args).spawn().expect("start relay-cli");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::unbounded_channel();
        let label = format!("{} {args:?}", self.name);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?} from {label}"));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        Running {
            label: format!("{} {args:?}", self.name),
            child,
            stdin,
            lines: rx,
            pending: VecDeque::new(),
            seen: Vec::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A command that keeps running.
pub struct Running {
    label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<Value>,
    /// Events read but not yet expected, oldest first.
    pending: VecDeque<Value>,
    /// Every event read so far, for failure messages.
    pub seen: Vec<Value>,
}

impl Running {
    /// Takes the first event matching `matches`, waiting for it if needed.
    /// Events that do not match stay for later `expect`s.
    pub async fn expect(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.pending.iter().position(&matches) {
            return self.pending.remove(i).expect("position is in range");
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.lines.recv()).await;
            match next {
                Ok(Some(value)) => {
                    self.seen.push(value.clone());
                    if matches(&value) {
                        return value;
                    }
                    self.pending.push_back(value);
                }
                Ok(None) => panic!(
                    "{} ended while waiting for {what}; it printed {:#?}",
                    self.label, self.seen
                ),
                Err(_) => panic!(
                    "{} did not print {what} within {WAIT:?}; it printed {:#?}",
                    self.label, self.seen
                ),
            }
        }
    }

    /// Waits for an event by name.
    pub async fn event(&mut self, name: &str) -> Value {
        self.expect(name, |v| v["event"] == name).await
    }

    /// Waits for a received message with this text.
    pub async fn message(&mut self, text: &str) -> Value {
        self.expect(&format!("message {text:?}"), |v| {
            v["event"] == "message" && v["text"] == text
        })
        .await
    }

    /// Types a line (chat).
    pub async fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write to chat");
        stdin.flush().await.expect("flush chat input");
    }

    /// Ends input (Ctrl-D) and waits for a clean exit.
    pub async fn close_input(mut self) -> ExitStatus {
        drop(self.stdin.take());
        self.wait().await
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub async fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().expect("still running") as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        self.wait().await
    }

    async fn wait(&mut self) -> ExitStatus {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {WAIT:?}", self.label))
            .expect("wait");
        // Whatever it printed last.
        while let Ok(value) = self.lines.try_recv() {
            self.seen.push(value);
        }
        status
    }
}

/// The user id of a username, from the relay's database.
pub async fn user_id(db: &PgPool, name: &str) -> Uuid {
    sqlx::query_scalar("SELECT id FROM users WHERE username = $1")
        .bind(name)
        .fetch_one(db)
        .await
        .expect("user row")
}

/// (one-time EC, one-time Kyber) pre-keys the relay holds for a user.
pub async fn key_counts(db: &PgPool, user: Uuid) -> (i64, i64) {
    let ec = sqlx::query_scalar("SELECT count(*) FROM one_time_pre_keys WHERE user_id = $1")
        .bind(user)
        .fetch_one(db)
        .await
        .expect("count one-time pre-keys");
    let kyber = sqlx::query_scalar("SELECT count(*) FROM kyber_pre_keys WHERE user_id = $1")
        .bind(user)
        .fetch_one(db)
        .await
        .expect("count Kyber pre-keys");
    (ec, kyber)
}

/// The identity key the relay holds for a user, if any.
pub async fn identity_on_relay(db: &PgPool, user: Uuid) -> Option<Vec<u8>> {
    sqlx::query_scalar("SELECT identity_key FROM identity_keys WHERE user_id = $1")
        .bind(user)
        .fetch_optional(db)
        .await
        .expect("identity key")
}

/// Live sessions (tokens) a user holds on the relay.
pub async fn sessions(db: &PgPool, user: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM sessions WHERE user_id = $1")
        .bind(user)
        .fetch_one(db)
        .await
        .expect("count sessions")
}

/// (envelope type, content) of the messages queued for a user, in order.
pub async fn queued(db: &PgPool, recipient: Uuid) -> Vec<(i16, Vec<u8>)> {
    sqlx::query_as(
        "SELECT envelope_type, content FROM messages WHERE recipient_id = $1 ORDER BY seq",
    )
    .bind(recipient)
    .fetch_all(db)
    .await
    .expect("queued messages")
}

/// Asserts that no stored message contains any of `texts`, in any form a
/// careless client might have sent it.
pub async fn assert_no_plaintext(db: &PgPool, texts: &[&str]) {
    let rows: Vec<Vec<u8>> = sqlx::query_scalar("SELECT content FROM messages")
        .fetch_all(db)
        .await
        .expect("message contents");
    for content in &rows {
        for text in texts {
            let needle = text.as_bytes();
            assert!(
                !content.windows(needle.len()).any(|w| w == needle),
                "the relay stored the plaintext {text:?}"
            );
        }
    }
}

/// Asserts every file in the profile is 0600 and every directory 0700.
pub fn assert_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{} has mode {mode:o}", dir.display());
    for entry in std::fs::read_dir(dir).expect("list profile") {
        let entry = entry.expect("entry");
        let path = entry.path();
        if path.is_dir() {
            assert_private(&path);
        } else {
            let mode = entry.metadata().expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} has mode {mode:o}", path.display());
        }
    }
}
