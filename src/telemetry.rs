//! Logging set-up: `tracing` with `RUST_LOG` filtering, as text or JSON.
//!
//! Whatever `RUST_LOG` asks for, the WebSocket and TLS libraries log at
//! `info` at most: at `trace` tungstenite prints raw frames, which carry
//! passwords, session tokens and message content. `RUST_LOG`'s directives
//! for those libraries (or any of their modules, such as
//! `tungstenite::protocol`) are dropped before the cap is added, so none
//! can be more specific than it.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Libraries whose verbose levels would log what the relay must never log.
const CAPPED: &[&str] = &["tungstenite", "tokio_tungstenite", "rustls", "tokio_rustls"];

/// The filter directives: `rust_log` (else `default`) without any directive
/// for a [`CAPPED`] library, then each of those at `info`.
pub fn directives(rust_log: Option<&str>, default: &str) -> String {
    let requested = rust_log
        .filter(|spec| !spec.trim().is_empty())
        .unwrap_or(default);
    let kept = requested.split(',').map(str::trim).filter(|directive| {
        let target = directive.split(['=', '[']).next().unwrap_or("");
        !CAPPED.iter().any(|lib| {
            target
                .strip_prefix(lib)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
    });
    let caps = CAPPED.iter().map(|lib| format!("{lib}=info"));
    kept.map(str::to_owned)
        .chain(caps)
        .collect::<Vec<_>>()
        .join(",")
}

fn filter(default: &str) -> EnvFilter {
    let spec = directives(std::env::var("RUST_LOG").ok().as_deref(), default);
    EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new(directives(None, default)))
}

/// Installs the global subscriber for the server: to stdout, `info` unless
/// `RUST_LOG` says otherwise. Colours only on a terminal, and never when
/// `NO_COLOR` is set.
///
/// A log line that cannot be written is lost, silently: tracing-subscriber
/// would report it with `eprintln!`, which panics when stderr is broken
/// too (a closed pipe, as when whatever read the logs is gone), and the
/// panic takes down whichever task was logging: a connection finishing, or
/// the signal handler, after which SIGTERM no longer stops the relay.
pub fn init(format: LogFormat) {
    let ansi = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter("info"))
        .with_ansi(ansi)
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Installs the global subscriber for an admin command: to stderr, so its
/// report on stdout stays clean, and only warnings unless `RUST_LOG` says
/// otherwise.
pub fn init_for_admin(format: LogFormat) {
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter("warn"))
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_directive_can_lift_the_cap() {
        assert_eq!(
            directives(
                Some("trace,tungstenite::protocol=trace,rustls=debug,tungstenite_x=trace"),
                "info"
            ),
            "trace,tungstenite_x=trace,tungstenite=info,tokio_tungstenite=info,rustls=info,tokio_rustls=info"
        );
        assert_eq!(
            directives(Some("tokio_tungstenite[conn]=trace"), "info"),
            "tungstenite=info,tokio_tungstenite=info,rustls=info,tokio_rustls=info",
            "a directive with a span filter is one for the library too"
        );
        assert!(directives(None, "warn").starts_with("warn,"));
        assert!(directives(Some(" "), "info").starts_with("info,"));
    }
}
