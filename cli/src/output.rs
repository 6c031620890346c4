//! Everything the CLI prints, in one place: human-readable lines by default,
//! or with `--json` one JSON object per line on stdout, each with an
//! `"event"` field naming what it reports.
//!
//! Results go to stdout, warnings and errors to stderr (in `--json` mode,
//! warnings and errors are JSON objects on stdout too, so a script reads one
//! stream). While `chat` is editing a line, every human line goes through
//! the line editor's printer, which redraws the prompt below it.

use std::cell::RefCell;
use std::io::Write;

use chrono::{Local, TimeZone};
use rustyline::ExternalPrinter;
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::error::Kind;
use crate::inbox::Entry;
use crate::keys::Uploaded;
use crate::session::Started;

/// Where human output goes.
enum Sink {
    /// Plain stdout/stderr.
    Std,
    /// The line editor's printer, while `chat` owns the terminal.
    Editor(Box<dyn ExternalPrinter + Send>),
}

pub struct Output {
    /// `--json`.
    json: bool,
    /// Swapped to the editor's printer for the life of an interactive chat.
    sink: RefCell<Sink>,
}

/// What happened to a sent message.
#[derive(Debug, Clone, Serialize)]
pub struct SentReport {
    /// The relay's id for the message; receipts refer to it.
    pub id: Uuid,
    pub to: String,
    pub to_id: Uuid,
    /// "delivered" (the recipient acked it), "queued" (stored until they
    /// connect) or "dropped".
    pub outcome: &'static str,
    /// "prekey_bundle" or "ciphertext".
    pub envelope: &'static str,
    /// Set when this message started a new session from a fetched bundle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<Started>,
}

impl Output {
    pub fn new(json: bool) -> Output {
        Output {
            json,
            sink: RefCell::new(Sink::Std),
        }
    }

    pub fn json(&self) -> bool {
        self.json
    }

    /// Routes human output through a line editor's printer (`chat`).
    pub fn use_printer(&self, printer: Box<dyn ExternalPrinter + Send>) {
        *self.sink.borrow_mut() = Sink::Editor(printer);
    }

    /// Back to plain stdout/stderr.
    pub fn use_std(&self) {
        *self.sink.borrow_mut() = Sink::Std;
    }

    fn line(&self, text: &str, to_stderr: bool) {
        let mut sink = self.sink.borrow_mut();
        match &mut *sink {
            Sink::Editor(printer) => {
                if printer.print(format!("{text}\n")).is_ok() {
                    return;
                }
                // The editor is gone (chat is ending); fall back.
                *sink = Sink::Std;
            }
            Sink::Std => {}
        }
        // A closed pipe must not turn into a panic; the exit code still
        // tells what happened.
        if to_stderr {
            let _ = writeln!(std::io::stderr(), "{text}");
        } else {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
        }
    }

    fn emit_json(&self, value: &serde_json::Value) {
        self.line(&value.to_string(), false);
    }

    fn emit<T: Serialize>(&self, event: &str, value: &T) {
        let mut object = serde_json::to_value(value).unwrap_or_else(|_| json!({}));
        if let Some(map) = object.as_object_mut() {
            map.insert("event".into(), event.into());
        }
        self.emit_json(&object);
    }

    /// A plain human line (ignored in `--json` mode).
    pub fn say(&self, text: &str) {
        if !self.json {
            self.line(text, false);
        }
    }

    pub fn registered(&self, event: &str, user_id: Uuid, username: &str, server: &str) {
        if self.json {
            self.emit_json(&json!({
                "event": event, "user_id": user_id, "username": username, "server": server,
            }));
        } else {
            let verb = if event == "registered" {
                "Registered"
            } else {
                "Logged in as"
            };
            self.line(&format!("{verb} {username} ({user_id}) on {server}"), false);
        }
    }

    pub fn uploaded(&self, up: &Uploaded) {
        if self.json {
            self.emit("keys_uploaded", up);
            return;
        }
        let mut text = format!(
            "Published {} one-time EC and {} Kyber pre-keys; the relay now holds {} and {}",
            up.new_one_time_pre_keys,
            up.new_kyber_pre_keys,
            up.one_time_pre_keys,
            up.kyber_pre_keys
        );
        if up.rotated_signed_pre_key {
            text.push_str(" (new signed pre-key)");
        }
        if up.reason != "keys" {
            text = format!("[keys] {text}");
        }
        self.line(&text, false);
    }

    pub fn sent(&self, sent: &SentReport) {
        if self.json {
            self.emit("sent", sent);
            return;
        }
        let outcome = match sent.outcome {
            "delivered" => "delivered".to_owned(),
            "queued" => format!("queued until {} connects", sent.to),
            other => other.to_owned(),
        };
        self.line(&format!("  ✓ sent to {} ({outcome})", sent.to), false);
    }

    /// A received entry. `quoted` is the text of our own message a receipt
    /// refers to, when chat still knows it.
    pub fn entry(&self, entry: &Entry, quoted: Option<&str>) {
        if self.json {
            let mut value = serde_json::to_value(entry).unwrap_or_else(|_| json!({}));
            if let (Entry::Undecryptable { .. }, Some(map)) = (entry, value.as_object_mut()) {
                // Up to the relay's size limit of base64, and no use on a
                // terminal: the inbox has it.
                map.remove("content");
            }
            self.emit_json(&value);
            return;
        }
        match entry {
            Entry::Message {
                from,
                text,
                sent_at_ms,
                server_at_ms,
                ..
            } => {
                let at = if *sent_at_ms > 0 {
                    *sent_at_ms
                } else {
                    *server_at_ms
                };
                self.line(&format!("[{}] {from}: {text}", clock(at)), false);
            }
            Entry::Receipt { delivered, by, .. } => {
                let what = match quoted {
                    Some(text) => format!("{:?}", shorten(text)),
                    None => format!("message {}", &delivered.simple().to_string()[..8]),
                };
                self.line(&format!("  ✓✓ {by} received {what}"), false);
            }
            Entry::Undecryptable {
                id, from, error, ..
            } => self.line(
                &format!(
                    "⚠ a message from {from} could not be decrypted ({error}). It is kept, \
                     encrypted, in the profile's inbox.jsonl (id {id}). If {from} or you \
                     changed devices, ask {from} to send it again."
                ),
                true,
            ),
        }
    }

    /// The loud warning for a changed identity, as Signal gives it.
    pub fn identity_changed(&self, user: &str, user_id: Uuid, held: usize, new_account: bool) {
        if self.json {
            self.emit_json(&json!({
                "event": "identity_changed", "user": user, "user_id": user_id,
                "new_account": new_account, "held_messages": held,
            }));
            return;
        }
        let why = if new_account {
            format!("The username {user:?} now belongs to a DIFFERENT ACCOUNT ({user_id}).")
        } else {
            format!("{user}'s IDENTITY KEY HAS CHANGED.")
        };
        let text = format!(
            "\n\
             ⚠⚠⚠  SAFETY NUMBER CHANGED  ⚠⚠⚠\n\
             {why}\n\
             This happens when {user} reinstalls or loses their profile, or when\n\
             someone is impersonating them or intercepting your messages.\n\
             Nothing is sent to or accepted from this identity{held}.\n\
             Verify with {user} through another channel, then run:\n\
             \x20   relay-cli trust {user}\n",
            held = if held > 0 {
                format!(" ({held} message(s) left waiting on the relay)")
            } else {
                String::new()
            },
        );
        self.line(&text, true);
    }

    pub fn warn(&self, text: &str) {
        if self.json {
            self.emit_json(&json!({ "event": "warning", "message": text }));
        } else {
            self.line(&format!("warning: {text}"), true);
        }
    }

    /// Any other event: JSON as given, human as `human`.
    pub fn report(&self, event: &str, fields: serde_json::Value, human: &str) {
        if self.json {
            let mut object = fields;
            if let Some(map) = object.as_object_mut() {
                map.insert("event".into(), event.into());
            }
            self.emit_json(&object);
        } else {
            self.line(human, false);
        }
    }

    /// The error that ends the command.
    pub fn error(&self, kind: Kind, err: &anyhow::Error) {
        // `{:#}` gives the whole context chain on one line.
        let message = format!("{err:#}");
        if self.json {
            self.emit_json(&json!({
                "event": "error", "kind": kind.name(), "exit_code": kind.exit_code(),
                "message": message,
            }));
        } else {
            self.line(&format!("error: {message}"), true);
        }
    }
}

/// Local wall-clock time of a Unix-ms timestamp.
fn clock(ms: u64) -> String {
    match Local.timestamp_millis_opt(ms as i64) {
        chrono::LocalResult::Single(t) => t.format("%H:%M:%S").to_string(),
        _ => "--:--:--".into(),
    }
}

fn shorten(text: &str) -> String {
    const MAX: usize = 40;
    if text.chars().count() <= MAX {
        text.to_owned()
    } else {
        let mut short: String = text.chars().take(MAX - 1).collect();
        short.push('…');
        short
    }
}
