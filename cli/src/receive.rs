//! Receiving: turning the relay's pushes into inbox entries, in batches.
//!
//! For each batch (the push that woke us plus whatever else is already
//! queued): decrypt in memory, append to the inbox (the commit point, see
//! `inbox`), save the ratchet state, print, and only then ack. A crash at
//! any point loses nothing: the relay redelivers what was not acked, and
//! what already reached the inbox is recognised by id and acked without
//! being decrypted again.
//!
//! Envelopes from a peer whose identity changed are *held*: not decrypted,
//! not acked, so they wait on the relay until the user has verified the
//! peer and run `trust`. Envelopes that cannot be decrypted are never
//! dropped: they go into the inbox raw, are reported with their sender and
//! counted, and only then acked.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::FutureExt;
use signal_relay::client::{Client, CloseInfo, Event, Events};
use signal_relay::proto::{self, EnvelopeType};
use uuid::Uuid;

use crate::ctx::Ctx;
use crate::error::{Failure, Kind};
use crate::inbox::Entry;
use crate::keys;
use crate::net;
use crate::session::{self, DecryptError};
use crate::signals::Shutdown;
use crate::store::B64;

/// Pushes handled per batch; bounds memory and the size of one ack.
const MAX_BATCH: usize = 500;

/// The relay closes a connection with this code when the same user
/// connects again (one connection per user).
const DISPLACED: u16 = 4409;

/// Messages held back from one sender.
#[derive(Debug, Clone)]
pub struct Held {
    pub username: String,
    pub count: usize,
    /// The username now belongs to another account (rather than the same
    /// account having a new key).
    pub new_account: bool,
}

/// What one batch contained.
#[derive(Debug, Default)]
pub struct Batch {
    /// What was stored in the inbox, in order.
    pub entries: Vec<Entry>,
    /// The relay said every stored message has now been delivered.
    pub queue_empty: bool,
    /// Held envelopes by sender.
    pub held: BTreeMap<Uuid, Held>,
}

/// Handles `first` and every push already queued behind it.
/// `quote` gives the text of our own message a receipt refers to, if known.
pub async fn batch(
    ctx: &mut Ctx<'_>,
    client: &Client,
    events: &mut Events,
    first: Event,
    quote: &dyn Fn(Uuid) -> Option<String>,
) -> Result<Batch> {
    let mut pushes = vec![first];
    while pushes.len() < MAX_BATCH {
        match events.next().now_or_never() {
            Some(Some(event)) => pushes.push(event),
            _ => break,
        }
    }
    let mut batch = Batch::default();
    let mut acks = Vec::new();
    let mut in_batch = HashSet::new();
    let mut low = None;
    for push in pushes {
        match push {
            Event::Deliver(envelope) => {
                let Ok(id) = Uuid::from_slice(&envelope.message_id) else {
                    ctx.out
                        .warn("the relay delivered an envelope without a valid id; ignored");
                    continue;
                };
                if ctx.inbox.seen(id) || !in_batch.insert(id) {
                    // Stored before (a redelivery): just ack it again.
                    acks.push(id);
                    continue;
                }
                match envelope_entry(ctx, id, &envelope).await {
                    Outcome::Stored(entry) => {
                        acks.push(id);
                        batch.entries.push(entry);
                    }
                    Outcome::Duplicate => acks.push(id),
                    Outcome::Held(sender, username, new_account) => {
                        batch
                            .held
                            .entry(sender)
                            .or_insert(Held {
                                username,
                                count: 0,
                                new_account,
                            })
                            .count += 1;
                    }
                }
            }
            Event::QueueEmpty => batch.queue_empty = true,
            Event::PreKeysLow(l) => low = Some(l),
        }
    }
    // The commit order that makes a crash harmless; see the module comment.
    ctx.inbox.append(&batch.entries)?;
    ctx.store.save(&ctx.profile)?;
    for entry in &batch.entries {
        let quoted = match entry {
            Entry::Receipt { delivered, .. } => quote(*delivered),
            _ => None,
        };
        ctx.out.entry(entry, quoted.as_deref());
    }
    for (sender, held) in &batch.held {
        ctx.out
            .identity_changed(&held.username, *sender, held.count, held.new_account);
    }
    for chunk in acks.chunks(1000) {
        net::within(client.ack(chunk))
            .await
            .context("acknowledging received messages")?;
    }
    if let Some(low) = low
        && let Some(up) =
            keys::on_low(client, &mut ctx.store, &ctx.profile, &ctx.account, &low).await?
    {
        ctx.out.uploaded(&up);
    }
    Ok(batch)
}

enum Outcome {
    /// Goes into the inbox and is acked.
    Stored(Entry),
    /// Already decrypted once: ack only.
    Duplicate,
    /// Not decrypted, not acked: (sender, username, new account?).
    Held(Uuid, String, bool),
}

async fn envelope_entry(ctx: &mut Ctx<'_>, id: Uuid, envelope: &proto::Envelope) -> Outcome {
    let sender = Uuid::from_slice(&envelope.sender_id).unwrap_or_default();
    let from = envelope.sender_username.clone();
    let server_at_ms = envelope.server_timestamp_ms;
    let undecryptable = |error: String| {
        Outcome::Stored(Entry::Undecryptable {
            id,
            from_id: sender,
            from: from.clone(),
            error,
            sent_at_ms: envelope.client_timestamp_ms,
            server_at_ms,
            envelope_type: envelope.r#type,
            content: B64(envelope.content.to_vec()),
        })
    };
    if envelope.r#type == EnvelopeType::Receipt as i32 {
        return match Uuid::from_slice(&envelope.content) {
            Ok(delivered) => Outcome::Stored(Entry::Receipt {
                id,
                delivered,
                by_id: sender,
                by: from,
                at_ms: server_at_ms,
            }),
            Err(_) => undecryptable("malformed delivery receipt".into()),
        };
    }
    let known = ctx.store.identities.peer(sender).is_some();
    if !known {
        // A user id we have never seen using a name we know: the name
        // changed hands (the old account was deleted and re-registered).
        let others = ctx.store.identities.named(&from);
        if others.iter().any(|other| *other != sender) {
            return Outcome::Held(sender, from, true);
        }
    }
    match session::decrypt(&mut ctx.store, sender, envelope.r#type, &envelope.content).await {
        Ok(text) => {
            ctx.store.identities.set_username(sender, &from);
            Outcome::Stored(Entry::Message {
                id,
                from_id: sender,
                from,
                text,
                sent_at_ms: envelope.client_timestamp_ms,
                server_at_ms,
                envelope: if envelope.r#type == EnvelopeType::PrekeyBundle as i32 {
                    "prekey_bundle"
                } else {
                    "ciphertext"
                },
            })
        }
        Err(DecryptError::UntrustedIdentity) => Outcome::Held(sender, from, false),
        Err(DecryptError::Duplicate) => Outcome::Duplicate,
        Err(DecryptError::Failed(error)) => undecryptable(error),
    }
}

/// Waits for the connection's end and decides whether to reconnect: after a
/// displacement (the same user connected elsewhere) reconnecting would just
/// displace the other session in turn, so that is an error.
pub async fn connection_lost(events: &mut Events) -> Result<CloseInfo> {
    let info = events.closed().await;
    if info.code == Some(DISPLACED) {
        return Err(Failure::new(
            Kind::Unreachable,
            "another relay-cli session signed in as this user, and the relay allows one \
             connection per user; this one stops",
        )
        .into());
    }
    Ok(info)
}

/// Reconnects with backoff until it works, the saved session is rejected,
/// or the user interrupts (`None`).
pub async fn reconnect(
    ctx: &mut Ctx<'_>,
    shutdown: &mut Shutdown,
    info: &CloseInfo,
) -> Result<Option<(Client, Events)>> {
    let why = match info.code {
        Some(code) => format!("{code} {}", info.reason),
        None => "no close frame".into(),
    };
    ctx.out.warn(&format!(
        "connection to the relay lost ({why}); reconnecting"
    ));
    let mut delay = Duration::from_millis(500);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.recv() => return Ok(None),
        }
        match ctx.connect().await {
            Ok(pair) => {
                ctx.out
                    .report("reconnected", serde_json::json!({}), "reconnected");
                return Ok(Some(pair));
            }
            Err(e) if crate::error::classify(&e) == Kind::Unreachable => {
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(e),
        }
    }
}
