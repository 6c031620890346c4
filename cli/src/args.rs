//! The command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "relay-cli",
    version,
    about = "End-to-end encrypted chat through a signal-relay server, on Signal's libsignal",
    after_help = "Exit codes: 0 ok, 1 other error, 2 usage, 3 server unreachable, \
                  4 bad credentials, 5 unknown user, 6 peer identity changed, 7 profile problem, \
                  8 user has not published keys, 9 the account is in use on another device."
)]
pub struct Args {
    /// Profile directory (keys, sessions, token, inbox).
    /// Default: the user data directory, e.g. ~/.local/share/relay-cli.
    #[arg(long, env = "RELAY_CLI_PROFILE", global = true, value_name = "DIR")]
    pub profile: Option<PathBuf>,

    /// Relay URL, ws:// or wss:// (`/v1/websocket` may be left out).
    /// Saved in the profile by register/login.
    /// Default: the saved one, else ws://127.0.0.1:8080/v1/websocket.
    #[arg(long, env = "RELAY_SERVER", global = true, value_name = "URL")]
    pub server: Option<String>,

    /// PEM CA certificate to trust for wss:// (e.g. a local test CA).
    /// Saved in the profile by register/login.
    #[arg(long, env = "RELAY_CA_CERT", global = true, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,

    /// Print one JSON object per line (each with an "event" field).
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an account and save its session in the profile. The password
    /// is prompted for, or read from the first line of piped stdin.
    Register { username: String },
    /// Sign in to an existing account and save the session in the profile;
    /// the session the profile held before is revoked on the relay.
    ///
    /// One account is one device. If the account's keys were published from
    /// another profile, login refuses, unless --replace-device says to make
    /// this profile the account's device.
    Login {
        username: String,
        /// Make this profile the account's only device: publish its identity
        /// key in place of the one the relay holds. The other device stops
        /// working (it can no longer decrypt what is sent to this account),
        /// and everyone who talks to this account sees a safety-number
        /// change.
        #[arg(long)]
        replace_device: bool,
    },
    /// Generate and publish identity, signed, one-time and Kyber pre-keys.
    /// (send, recv and chat also do this on first use, and top keys up.)
    Keys,
    /// Send one message.
    Send {
        /// Recipient's username.
        user: String,
        /// The message.
        text: String,
    },
    /// Receive waiting messages (and with --follow, keep receiving).
    Recv {
        /// Keep running and print messages as they arrive, until Ctrl-C.
        #[arg(long, short)]
        follow: bool,
    },
    /// Chat with a user interactively; incoming messages appear as you type.
    Chat {
        /// The other person's username.
        user: String,
    },
    /// Show this account, its identity key and the pre-keys the relay holds.
    Whoami,
    /// End the saved session (keys and conversations stay in the profile).
    Logout,
    /// Delete the account on the relay, and its keys and sessions here.
    DeleteAccount,
    /// Accept a peer's new identity after verifying it with them: forget
    /// the old one, so the next message to or from them is trusted.
    Trust { user: String },
    /// Show the safety number to compare with a peer (as in Signal).
    SafetyNumber { user: String },
}
