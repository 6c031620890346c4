//! The `relay` binary: parse configuration, start logging, bind, and run
//! until SIGINT or SIGTERM.

use anyhow::Context;
use signal_relay::{Config, server, telemetry};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = match Config::load() {
        Ok(config) => config,
        // --help and --version print and exit; real errors exit non-zero.
        Err(signal_relay::config::ConfigError::Invalid(err)) => err.exit(),
        Err(err) => return Err(err.into()),
    };
    telemetry::init(config.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_on_termination(shutdown.clone()));
    server::run(listener, config, shutdown)
        .await
        .context("relay failed")
}

async fn signal_on_termination(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
