//! relay-cli: an end-to-end encrypted chat client for signal-relay, built on
//! Signal's libsignal (PQXDH session setup, Double Ratchet messages).
//!
//! The relay only ever sees ciphertext: messages are encrypted here, with
//! keys that never leave the profile directory, and decrypted by the peer's
//! client.
//!
//! Layout:
//! - `args` — the command line;
//! - `commands` — one module per group of subcommands;
//! - `ctx` — what a signed-in command works with (profile, store, relay);
//! - `profile` — the profile directory: locking, file modes, atomic writes;
//! - `store` — libsignal's stores, persisted in the profile;
//! - `keys` — generating, publishing and replenishing pre-keys;
//! - `session` — encrypt/decrypt with libsignal;
//! - `receive` — receiving in batches: decrypt, store, then ack;
//! - `inbox` — the append-only record of what was received;
//! - `net` — reaching the relay through the library's typed client;
//! - `output` — human and `--json` output;
//! - `terminal`, `signals` — line editing, passwords, Ctrl-C;
//! - `error` — the failures that have their own exit codes.

#![forbid(unsafe_code)]

mod args;
mod commands;
mod ctx;
mod error;
mod inbox;
mod keys;
mod net;
mod output;
mod profile;
mod receive;
mod session;
mod signals;
mod store;
mod terminal;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = args::Args::parse();
    let out = output::Output::new(args.json);
    // libsignal's futures are !Send, so the command runs on this thread
    // (block_on), never in a spawned task. The relay client's own socket
    // tasks run on the same single-threaded runtime.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let err = anyhow::Error::new(e).context("starting the async runtime");
            out.error(error::Kind::Other, &err);
            return error::exit_code(error::Kind::Other);
        }
    };
    let result = runtime.block_on(commands::run(args, &out));
    // Input threads may still be blocked reading; do not wait for them.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let kind = error::classify(&err);
            out.error(kind, &err);
            error::exit_code(kind)
        }
    }
}
