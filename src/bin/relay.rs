//! The `relay` binary: parse configuration; without a subcommand, start
//! logging, reach the database, bind, and serve until SIGINT or SIGTERM;
//! with one, run that admin task ([`signal_relay::admin`]) and exit with
//! its status.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use signal_relay::admin::{self, AdminCommand, Cli};
use signal_relay::config::{self, ConfigError, Layered, Setting};
use signal_relay::{Config, server, telemetry};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let Layered {
        value: cli,
        settings,
    } = match config::load_layered::<Cli, _, _>(std::env::args_os()) {
        Ok(loaded) => loaded,
        // --help and --version print and exit; real errors exit non-zero.
        Err(ConfigError::Invalid(err)) => err.exit(),
        Err(err) => return Err(err.into()),
    };
    match cli.command {
        None => serve(cli.config).await.map(|()| ExitCode::SUCCESS),
        Some(command) => Ok(run_admin(&command, &cli.config, &settings).await),
    }
}

async fn run_admin(command: &AdminCommand, config: &Config, settings: &[Setting]) -> ExitCode {
    telemetry::init_for_admin(config.log_format);
    // Written with `write_all`, whose errors are ignored, not `print!`, which
    // panics (exit 101) when the reader has gone: `relay users list | head`
    // must exit as the task did, like any Unix tool whose output was cut.
    match admin::run(command, config, settings).await {
        Ok(outcome) => {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout
                .write_all(outcome.output.as_bytes())
                .and_then(|()| stdout.flush());
            if let Some(note) = &outcome.note {
                let _ = std::io::stderr().lock().write_all(note.as_bytes());
            }
            ExitCode::from(outcome.exit.code())
        }
        Err(err) => {
            let exit = err.exit();
            let _ = writeln!(
                std::io::stderr().lock(),
                "error: {:#}",
                anyhow::Error::from(err)
            );
            ExitCode::from(exit.code())
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
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
