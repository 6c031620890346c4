//! `send USER TEXT`, and the two halves of sending that `chat` shares:
//! [`prepare`] (resolve the peer, start a session if needed, encrypt; all
//! libsignal, on this thread) and [`deliver`] (the relay round trip, which
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
/// had to).
async fn resolve(
    ctx: &mut Ctx<'_>,
    client: &Client,
    user: &str,
) -> Result<(Uuid, String, Option<Started>)> {
    let known = ctx.store.identities.named(user);
    if let [peer] = known[..]
        && ctx.store.sessions.usable(peer)
    {
        let name = ctx
            .store
            .identities
            .username(peer)
            .unwrap_or(user)
            .to_owned();
        return Ok((peer, name, None));
    }
    let bundle = match net::within(client.fetch_bundle_by_username(user)).await {
        Ok(bundle) => bundle,
        Err(e) if net::status(&e) == Some(Status::NotFound) => {
            return Err(Failure::unknown_user(user).into());
        }
        Err(e) if net::status(&e) == Some(Status::RateLimited) => {
            return Err(e.context(format!(
                "the relay limits how fast pre-key bundles may be fetched; \
                 try again shortly to write to {user}"
            )));
        }
        Err(e) => return Err(e.context(format!("fetching {user}'s pre-key bundle"))),
    };
    let peer = Uuid::from_slice(&bundle.user_id)
        .context("the relay returned a bundle with an invalid user id")?;
    let username = if bundle.username.is_empty() {
        user.to_owned()
    } else {
        bundle.username.clone()
    };
    // The name now belongs to a different account than the one we know.
    if known.iter().any(|old| *old != peer) {
        ctx.out.identity_changed(&username, peer, 0, true);
        return Err(identity_changed(&username));
    }
    let offered = IdentityKey::decode(&bundle.identity_key)
        .context("the relay returned a bundle with an invalid identity key")?;
    if let Some(trusted) = ctx.store.identities.identity_of(peer)
        && trusted != offered
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
