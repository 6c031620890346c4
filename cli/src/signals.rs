//! Ctrl-C and SIGTERM, for the long-running commands (`recv --follow`,
//! `chat`): they end the loop between batches, so whatever was received is
//! stored and acked before the process exits.

use anyhow::{Context, Result};
use tokio::signal::unix::{Signal, SignalKind, signal};

pub struct Shutdown {
    /// Registered up front: a signal that arrives before anyone waits must
    /// not kill the process mid-batch.
    interrupt: Signal,
    terminate: Signal,
}

impl Shutdown {
    pub fn new() -> Result<Shutdown> {
        Ok(Shutdown {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    /// Resolves when either signal arrives.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
