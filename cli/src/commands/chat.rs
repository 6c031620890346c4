//! `chat USER`: an interactive conversation.
//!
//! One loop waits on three things at once: pushes from the relay (received,
//! stored and acked as in `recv`), lines typed by the user, and the send in
//! flight. Sends go out one at a time, in the order typed, but a send never
//! blocks receiving: the relay answers a send only when the recipient has
//! acked it, and if both sides blocked on their own send neither would ack
//! the other's.
//!
//! If the connection drops, chat reconnects and resends the message that was
//! in flight with the same client message id, which the relay deduplicates.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;

use anyhow::Result;
use serde_json::json;
use signal_relay::client::{Client, UserInfo};
use uuid::Uuid;

use super::send::{self, Prepared};
use crate::ctx::Ctx;
use crate::error::{self, Failure, Kind};
use crate::net;
use crate::output::SentReport;
use crate::receive;
use crate::signals::Shutdown;
use crate::terminal::{self, Input, Line};

/// A send on its way: the message (kept for a retry), the text (to quote in
/// the receipt) and the relay's answer.
type InFlight = Pin<Box<dyn Future<Output = (Prepared, String, Result<SentReport>)>>>;

/// Texts of sent messages remembered for quoting receipts.
const QUOTES: usize = 1000;

pub async fn run(ctx: &mut Ctx<'_>, user: &str) -> Result<()> {
    let mut shutdown = Shutdown::new()?;
    let (mut client, mut events) = ctx.connect().await?;
    // No bundle is fetched until the first line is sent, as in Signal:
    // opening a chat costs the peer no pre-key, and if the peer writes
    // first, their pre-key message sets up the session both ways. But a
    // chat nobody can be reached in ends before it starts, with its own
    // exit code, rather than refusing every line.
    let found = match reachable(ctx, &client, user).await {
        Ok(found) => found,
        Err(e) => {
            client.close().await;
            return Err(e);
        }
    };
    let username = found.username;
    ctx.out.report(
        "chat",
        json!({ "with": username, "with_id": found.user_id }),
        &format!(
            "Chatting with {username}. Type a message and press Enter; Ctrl-D or /quit leaves."
        ),
    );
    let mut input = Input::start(ctx.out, !ctx.out.json() && terminal::interactive(), "> ")?;
    let result = converse(
        ctx,
        &mut client,
        &mut events,
        &mut input,
        &mut shutdown,
        user,
    )
    .await;
    input.stop(ctx.out);
    client.close().await;
    result
}

/// The user to chat with, if they can be written to: they exist, have
/// published keys, and are not us.
async fn reachable(ctx: &Ctx<'_>, client: &Client, user: &str) -> Result<UserInfo> {
    let found = net::lookup(client, user).await?;
    if found.user_id == ctx.account.user_id {
        anyhow::bail!("{} is you; chat with someone else", found.username);
    }
    if found.identity_key.is_none() {
        return Err(Failure::no_keys(&found.username).into());
    }
    Ok(found)
}

async fn converse(
    ctx: &mut Ctx<'_>,
    client: &mut Client,
    events: &mut signal_relay::client::Events,
    input: &mut Input,
    shutdown: &mut Shutdown,
    user: &str,
) -> Result<()> {
    let mut typed: VecDeque<String> = VecDeque::new();
    let mut in_flight: Option<InFlight> = None;
    // A message whose send failed with the connection; resent once the
    // connection is back.
    let mut retry: Option<(Prepared, String)> = None;
    let mut quotes: HashMap<Uuid, String> = HashMap::new();
    let mut quote_order: VecDeque<Uuid> = VecDeque::new();
    let mut leaving = false;
    loop {
        // While the connection is down, everything waits for the reconnect.
        if in_flight.is_none() && client.close_info().is_none() {
            let next = match retry.take() {
                Some(retry) => Some(retry),
                None => match typed.pop_front() {
                    Some(text) => match send::prepare(ctx, client, user, &text).await {
                        Ok(prepared) => Some((prepared, text)),
                        // Nothing was encrypted yet: try again after the
                        // reconnect.
                        Err(e) if error::classify(&e) == Kind::Unreachable => {
                            typed.push_front(text);
                            None
                        }
                        Err(e) => {
                            not_sent(ctx, &e);
                            None
                        }
                    },
                    None => None,
                },
            };
            if let Some((prepared, text)) = next {
                let client = client.clone();
                in_flight = Some(Box::pin(async move {
                    let result = send::deliver(&client, &prepared).await;
                    (prepared, text, result)
                }));
            }
        }
        if leaving && in_flight.is_none() && typed.is_empty() && retry.is_none() {
            return Ok(());
        }
        tokio::select! {
            event = events.next() => match event {
                Some(event) => {
                    let quote = |id: Uuid| quotes.get(&id).cloned();
                    match receive::batch(ctx, client, events, event, &quote).await {
                        Ok(_) => {}
                        // What was received is stored; the acks are redone
                        // after the reconnect, which the closed connection
                        // is about to trigger.
                        Err(e) if error::classify(&e) == Kind::Unreachable => {}
                        Err(e) => return Err(e),
                    }
                }
                None => {
                    let info = receive::connection_lost(events).await?;
                    match receive::reconnect(ctx, shutdown, &info).await? {
                        Some((c, e)) => (*client, *events) = (c, e),
                        None => return Ok(()),
                    }
                }
            },
            line = input.next(), if !leaving => match line {
                Line::Text(text) if text.trim() == "/quit" => leaving = true,
                Line::Text(text) if text.trim().is_empty() => {}
                Line::Text(text) => typed.push_back(text),
                Line::End => leaving = true,
            },
            done = async { in_flight.as_mut().expect("guarded by the condition").await },
                if in_flight.is_some() =>
            {
                in_flight = None;
                let (prepared, text, result) = done;
                match result {
                    Ok(report) => {
                        quotes.insert(report.id, text);
                        quote_order.push_back(report.id);
                        if quote_order.len() > QUOTES
                            && let Some(old) = quote_order.pop_front()
                        {
                            quotes.remove(&old);
                        }
                        ctx.out.sent(&report);
                    }
                    // Already encrypted (the ratchet moved on): resend the
                    // same bytes with the same client message id.
                    Err(e) if error::classify(&e) == Kind::Unreachable => {
                        retry = Some((prepared, text));
                    }
                    Err(e) => not_sent(ctx, &e),
                }
            }
            _ = shutdown.recv() => return Ok(()),
        }
    }
}

fn not_sent(ctx: &Ctx<'_>, err: &anyhow::Error) {
    ctx.out.warn(&format!("not sent: {err:#}"));
}
