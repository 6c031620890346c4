//! Logging set-up: `tracing` with `RUST_LOG` filtering, as text or JSON.
//!
//! Whatever `RUST_LOG` asks for, the WebSocket and TLS libraries log at
//! `info` at most: at `trace` tungstenite prints raw frames, which carry
//! passwords, session tokens and message content.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::Directive;

use crate::config::LogFormat;

/// Libraries whose verbose levels would log what the relay must never log.
const CAPPED: &[&str] = &["tungstenite", "tokio_tungstenite", "rustls", "tokio_rustls"];

/// The filter: `RUST_LOG` (else `default`), with [`CAPPED`] held at `info`.
pub fn filter(rust_log: Option<&str>, default: &str) -> EnvFilter {
    let mut filter = rust_log
        .and_then(|spec| EnvFilter::try_new(spec).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    for target in CAPPED {
        let cap: Directive = format!("{target}=info").parse().expect("a valid directive");
        // Added last, so it replaces a directive for the same target.
        filter = filter.add_directive(cap);
    }
    filter
}

/// Installs the global subscriber for the server: to stdout, `info` unless
/// `RUST_LOG` says otherwise. Colours only on a terminal, and never when
/// `NO_COLOR` is set.
pub fn init(format: LogFormat) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let ansi = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(rust_log.as_deref(), "info"))
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Installs the global subscriber for an admin command: to stderr, so its
/// report on stdout stays clean, and only warnings unless `RUST_LOG` says
/// otherwise.
pub fn init_for_admin(format: LogFormat) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(rust_log.as_deref(), "warn"))
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
