//! `send USER TEXT`, and the two halves of sending that `chat` shares:
//! [`prepare`] (check the size, resolve the peer, start a session if
//! needed, encrypt; all libsignal, on this thread) and [`deliver`] (the relay round trip, which
//! chat runs alongside receiving).

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::Bytes;
use libsignal_protocol_syft::IdentityKey;
use signal_relay::client::{Client, Outgoing};
use signal_relay::proto::{EnvelopeType, SendOutcome, Status};
use uuid::Uuid;

use crate::ctx::Ctx;
use crate::error::{Failure, Kind};
use crate::net;
use crate::output::SentReport;
use crate::session::{self, Started};

/// An encrypted message, ready to go to the relay.
pub struct Prepared {
    /// The request; its client message id makes a retry after a lost
    /// connection idempotent (the relay maps it to the same message id).
    pub outgoing: Outgoing,
    /// The recipient's username, for the output.
    pub to: String,
    /// Whether this message started a session, for the output.
    pub session: Option<Started>,
}

pub async fn run(ctx: &mut Ctx<'_>, user: &str, text: &str) -> Result<()> {
    let (client, _events) = ctx.connect().await?;
    let prepared = prepare(ctx, &client, user, text).await?;
    let report = deliver(&client, &prepared).await?;
    client.close().await;
    ctx.out.sent(&report);
    Ok(())
}

/// Finds the peer (fetching their bundle and starting a session when there
/// is no usable one), encrypts, and saves the advanced ratchet *before* the
/// message leaves: a crash after sending must not reuse a message key.
pub async fn prepare(
    ctx: &mut Ctx<'_>,
    client: &Client,
    user: &str,
    text: &str,
) -> Result<Prepared> {
    check_size(ctx, text)?;
    let (peer, username, started) = resolve(ctx, client, user).await?;
    let encrypted = session::encrypt(&mut ctx.store, peer, text).await?;
    ctx.store.save(&ctx.profile)?;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Ok(Prepared {
        outgoing: Outgoing {
            recipient: peer,
            envelope_type: encrypted.envelope_type,
            content: Bytes::from(encrypted.content),
            client_timestamp_ms: now_ms,
            ephemeral: false,
            ttl_seconds: 0,
            client_message_id: Some(Bytes::copy_from_slice(Uuid::new_v4().as_bytes())),
        },
        to: username,
        session: started,
    })
}

/// Refuses a text the relay would refuse once encrypted, before anything
/// is spent on it.
fn check_size(ctx: &Ctx<'_>, text: &str) -> Result<()> {
    let longest = session::max_text_len(ctx.max_message_bytes);
    if text.len() > longest {
        return Err(Failure::new(
            Kind::Other,
            format!(
                "the message is too long: {} bytes, and this relay takes at most {longest} bytes \
                 of text (its limit is {} bytes once encrypted); not sent",
                text.len(),
                ctx.max_message_bytes
            ),
        )
        .into());
    }
    Ok(())
}

/// Sends a prepared message and says what became of it.
pub async fn deliver(client: &Client, prepared: &Prepared) -> Result<SentReport> {
    let to_id = prepared.outgoing.recipient;
    let sent = match net::within(client.send(prepared.outgoing.clone())).await {
        Ok(sent) => sent,
        Err(e) if net::status(&e) == Some(Status::NotFound) => {
            return Err(Failure::new(
                Kind::UnknownUser,
                format!(
                    "{} ({to_id}) no longer exists on this relay; the message was not sent",
                    prepared.to
                ),
            )
            .into());
        }
        Err(e) => return Err(e.context(format!("sending to {}", prepared.to))),
    };
    Ok(SentReport {
        id: sent.message_id,
        to: prepared.to.clone(),
        to_id,
        outcome: match sent.outcome {
            SendOutcome::Delivered => "delivered",
            SendOutcome::Queued => "queued",
            SendOutcome::Dropped => "dropped",
            SendOutcome::Unspecified => "unknown",
        },
        envelope: match prepared.outgoing.envelope_type {
            EnvelopeType::PrekeyBundle => "prekey_bundle",
            _ => "ciphertext",
        },
        session: prepared.session,
    })
}

/// The peer's user id and username, and how a new session started (if one
/// had to). The peer is looked up first, every time: that tells "no such
/// user" from "no keys" before anything is encrypted or any pre-key of
/// theirs used up, and shows when their identity changed (another device
/// of theirs took over their account) even while our session with their
/// old one still works: a message to that session would reach no one.
async fn resolve(
    ctx: &mut Ctx<'_>,
    client: &Client,
    user: &str,
) -> Result<(Uuid, String, Option<Started>)> {
    let known = ctx.store.identities.named(user);
    let found = net::lookup(client, user).await?;
    let username = found.username.clone();
    // The name now belongs to a different account than the one we know.
    if known.iter().any(|old| *old != found.user_id) {
        ctx.out.identity_changed(&username, found.user_id, 0, true);
        return Err(identity_changed(&username));
    }
    let Some(published) = &found.identity_key else {
        return Err(Failure::no_keys(&username).into());
    };
    let published = IdentityKey::decode(published)
        .context("the relay returned an invalid identity key for the user")?;
    if ctx
        .store
        .identities
        .identity_of(found.user_id)
        .is_some_and(|trusted| trusted != published)
    {
        ctx.out.identity_changed(&username, found.user_id, 0, false);
        return Err(identity_changed(&username));
    }
    if ctx.store.sessions.usable(found.user_id) {
        ctx.store.identities.set_username(found.user_id, &username);
        return Ok((found.user_id, username, None));
    }
    let bundle = match net::within(client.fetch_bundle(found.user_id)).await {
        Ok(bundle) => bundle,
        // Deleted, or their keys went, since the lookup a moment ago.
        Err(e) if net::status(&e) == Some(Status::NotFound) => {
            return Err(e.context(format!("{username} can no longer be written to")));
        }
        Err(e) if net::status(&e) == Some(Status::RateLimited) => {
            return Err(e.context(format!(
                "the relay limits how fast pre-key bundles may be fetched; \
                 try again shortly to write to {username}"
            )));
        }
        Err(e) => return Err(e.context(format!("fetching {username}'s pre-key bundle"))),
    };
    let peer = found.user_id;
    if bundle.user_id[..] != peer.as_bytes()[..] {
        anyhow::bail!("the relay returned a bundle of another user than {username} ({peer})");
    }
    // Their identity may have changed between the lookup and the fetch.
    let offered = IdentityKey::decode(&bundle.identity_key)
        .context("the relay returned a bundle with an invalid identity key")?;
    if ctx
        .store
        .identities
        .identity_of(peer)
        .is_some_and(|trusted| trusted != offered)
    {
        ctx.out.identity_changed(&username, peer, 0, false);
        return Err(identity_changed(&username));
    }
    let started = session::start(&mut ctx.store, peer, &bundle).await?;
    ctx.store.identities.set_username(peer, &username);
    Ok((peer, username, Some(started)))
}

fn identity_changed(user: &str) -> anyhow::Error {
    Failure::new(
        Kind::IdentityChanged,
        format!(
            "not sending to {user}: their identity changed (see the warning above); \
             verify it with them, then run `relay-cli trust {user}`"
        ),
    )
    .into()
}
