//! The `relay` binary: parse configuration, start logging, reach the
//! database, bind, and run until SIGINT or SIGTERM.

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
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_on_termination(shutdown.clone()));
    let listen = config.listen;
    // The public port opens only once the database is reached and
    // migrated: a load balancer sees nothing rather than a relay that
    // accepts clients only to fail them.
    let server = server::Server::build(config, &shutdown)
        .await
        .context("relay failed to start")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    server.run(listener, shutdown).await.context("relay failed")
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
