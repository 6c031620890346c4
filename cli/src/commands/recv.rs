//! `recv [--follow]`: receive what is waiting on the relay (the relay says
//! when its queue is drained), and with `--follow` keep receiving, through
//! reconnections, until Ctrl-C.

use std::collections::BTreeMap;

use anyhow::Result;
use serde_json::json;
use uuid::Uuid;

use crate::ctx::Ctx;
use crate::error::{Failure, Kind};
use crate::inbox::Entry;
use crate::receive::{self, Held};
use crate::signals::Shutdown;

pub async fn run(ctx: &mut Ctx<'_>, follow: bool) -> Result<()> {
    let mut shutdown = Shutdown::new()?;
    let (mut client, mut events) = ctx.connect().await?;
    let mut received = 0usize;
    let mut undecryptable = 0usize;
    let mut held: BTreeMap<Uuid, Held> = BTreeMap::new();
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = shutdown.recv() => break,
        };
        let Some(event) = event else {
            let info = receive::connection_lost(&mut events).await?;
            if !follow {
                return Err(Failure::new(
                    Kind::Unreachable,
                    "the relay closed the connection before every waiting message arrived; \
                     what did arrive is stored — run recv again",
                )
                .into());
            }
            match receive::reconnect(ctx, &mut shutdown, &info).await? {
                Some((c, e)) => (client, events) = (c, e),
                None => break,
            }
            continue;
        };
        let batch = match receive::batch(ctx, &client, &mut events, event, &|_| None).await {
            Ok(batch) => batch,
            // What was received is stored; with --follow the closed
            // connection leads to a reconnect, and the relay redelivers what
            // was not acked, which is then acked without a second decrypt.
            Err(e) if follow && crate::error::classify(&e) == Kind::Unreachable => continue,
            Err(e) => return Err(e),
        };
        for entry in &batch.entries {
            match entry {
                Entry::Message { .. } => received += 1,
                Entry::Undecryptable { .. } => undecryptable += 1,
                Entry::Receipt { .. } => {}
            }
        }
        held.extend(batch.held);
        if batch.queue_empty {
            if ctx.out.json() {
                ctx.out.report(
                    "drained",
                    json!({ "received": received, "undecryptable": undecryptable }),
                    "",
                );
            } else if undecryptable > 0 {
                ctx.out.say(&format!(
                    "{received} message(s) received; {undecryptable} could not be decrypted \
                     and are kept in the inbox (see above){}",
                    if follow {
                        "; waiting for new messages"
                    } else {
                        ""
                    }
                ));
            } else if follow {
                ctx.out
                    .say("(caught up; waiting for new messages, Ctrl-C to stop)");
            } else if received == 0 {
                ctx.out.say("No new messages.");
            }
            if !follow {
                break;
            }
        }
    }
    client.close().await;
    if !held.is_empty() {
        let names: Vec<&str> = held.values().map(|h| h.username.as_str()).collect();
        return Err(Failure::new(
            Kind::IdentityChanged,
            format!(
                "messages from {} were not accepted because their identity changed",
                names.join(", ")
            ),
        )
        .into());
    }
    Ok(())
}
