//! Live traffic alongside the `reconnect` and `login` storms: its latency
//! shows what a storm does to everyone else. On a cluster its pairs cross
//! nodes, as in `live --nodes`.

use std::time::Duration;

use signal_relay::client::Encoding;

use super::{Run, Servers, secs};
use crate::live::{self, Load, Pairs};
use crate::metrics::{Kind, Snapshot, Usage};
use crate::report::Row;
use crate::seed::Account;

/// Live traffic at a modest fixed rate, whose latency shows what a storm
/// does to everyone else.
#[derive(Debug, Clone, clap::Args)]
pub struct Background {
    /// Pairs carrying live traffic during the storm.
    #[arg(long, default_value_t = 16)]
    pub pairs: usize,
    /// Their offered rate, messages per second in total.
    #[arg(long, default_value_t = 2_000.0)]
    pub rate: f64,
    /// Seconds of live traffic alone, before the storm.
    #[arg(long, default_value_t = 3.0)]
    pub calm: f64,
    #[arg(long, default_value_t = 256)]
    pub size: usize,
}

/// Starts the traffic between `accounts` (seeded on `servers`) and lets it
/// warm up. On a cluster pair i's sender is on node i and its recipient on
/// node i+1, so the storm's hand-offs share the nodes with cross-node
/// delivery.
pub(super) async fn start_background(
    run: &Run,
    b: &Background,
    accounts: &[Account],
    servers: &Servers,
) -> anyhow::Result<live::Running> {
    let pairs = match servers.is_cluster() {
        true => Pairs::cluster(&servers.urls, accounts).await?,
        false => Pairs::relay(&servers.urls[0], accounts, Encoding::Proto).await?,
    };
    let load = Load::Open {
        rate: b.rate,
        tick: Duration::from_micros(100),
        max_in_flight: live::OPEN_MAX_IN_FLIGHT,
    };
    run.phase("warmup");
    let running = pairs.start(load, b.size, &run.metrics);
    tokio::time::sleep(Duration::from_secs(1)).await;
    run.metrics.take();
    Ok(running)
}

/// A phase of `--calm` seconds with only the live traffic, as its own row:
/// before the storm ("calm") it is the reference the storm is judged by.
pub(super) async fn live_alone(run: &mut Run, b: &Background, phase: &str, servers: &Servers) {
    run.phase(phase);
    let window = servers.procs.window();
    tokio::time::sleep(secs(b.calm)).await;
    let snap = run.metrics.take();
    let name = format!("live, {phase}");
    run.rows.push(Row::new(
        &name,
        servers.target(),
        Kind::Delivery,
        &snap,
        servers.procs.usage(&window),
    ));
}

/// The storm's two rows on `target` ("relay" or "cluster"), from one
/// window: the live traffic's latency during it, and the storm's own
/// operations (`done` in `seconds`).
pub(super) fn push_storm_rows(
    run: &mut Run,
    target: &str,
    storm: &str,
    snap: &Snapshot,
    usage: Usage,
    done: u64,
    seconds: f64,
) {
    run.rows.push(
        Row::new(
            "live, during storm",
            target,
            Kind::Delivery,
            snap,
            usage.clone(),
        )
        .only(&[Kind::Delivery, Kind::Answer]),
    );
    run.rows.push(
        Row::new(storm, target, Kind::Op, snap, usage)
            .only(&[Kind::Op])
            .with_rate(done, seconds),
    );
}
