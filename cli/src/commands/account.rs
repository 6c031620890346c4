//! register, login, logout, delete-account, whoami, trust, safety-number.

use anyhow::{Context, Result};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libsignal_protocol_syft::Fingerprint;
use serde_json::json;
use signal_relay::client::AuthInfo;
use signal_relay::proto::Status;

use crate::ctx::Ctx;
use crate::error::{Failure, Kind};
use crate::keys::{self, Replace};
use crate::net::{self, Server};
use crate::output::Output;
use crate::profile::{self, Account, Profile};
use crate::store::SignalStore;
use crate::terminal;

/// A profile is one account; keys left from another one must not be reused.
fn refuse_foreign_keys(profile: &Profile) -> Result<()> {
    if SignalStore::load(profile)?.is_some() {
        return Err(Failure::profile(format!(
            "the profile {} holds keys but no account; use an empty --profile directory",
            profile.dir().display()
        ))
        .into());
    }
    Ok(())
}

fn save_session(profile: &Profile, server: &Server, auth: &AuthInfo) -> Result<()> {
    let account = Account {
        server: server.url.clone(),
        // Absolute, so later commands find it from any directory.
        ca_cert: server
            .ca_cert
            .clone()
            .map(|path| std::fs::canonicalize(&path).unwrap_or(path)),
        user_id: auth.user_id,
        username: auth.username.clone(),
        token: Some(net::encode_token(auth)),
        token_expires_at_ms: auth.token_expires_at_ms,
    };
    profile.save_account(&account)
}

pub async fn register(
    profile: Profile,
    server: Server,
    username: &str,
    out: &Output,
) -> Result<()> {
    if let Some(existing) = profile.read_json::<Account>(profile::ACCOUNT)? {
        return Err(Failure::profile(format!(
            "the profile {} already belongs to {} ({}); use --profile DIR for another account",
            profile.dir().display(),
            existing.username,
            existing.user_id
        ))
        .into());
    }
    refuse_foreign_keys(&profile)?;
    let password = terminal::read_password(&format!("Password for the new account {username}: "))?;
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let again = terminal::read_password("Repeat the password: ")?;
        anyhow::ensure!(again == password, "the passwords differ");
    }
    let (client, _events) = net::connect(&server).await?;
    let auth = match net::within(client.register(username, &password)).await {
        Ok(auth) => auth,
        Err(e) => {
            return Err(match net::status(&e) {
                Some(Status::Conflict) => Failure::new(
                    Kind::Other,
                    format!("the username {username:?} is taken; choose another"),
                )
                .into(),
                _ => e.context("registering"),
            });
        }
    };
    save_session(&profile, &server, &auth)?;
    client.close().await;
    out.registered("registered", auth.user_id, &auth.username, &server.url);
    out.say("Next: `relay-cli keys` publishes your keys so others can message you.");
    Ok(())
}

pub async fn login(
    profile: Profile,
    server: Server,
    username: &str,
    replace_device: bool,
    out: &Output,
) -> Result<()> {
    let existing = profile.read_json::<Account>(profile::ACCOUNT)?;
    match &existing {
        Some(account) if !account.username.eq_ignore_ascii_case(username) => {
            return Err(Failure::profile(format!(
                "the profile {} belongs to {}; use --profile DIR to sign in as {username}",
                profile.dir().display(),
                account.username
            ))
            .into());
        }
        Some(_) => {}
        None => refuse_foreign_keys(&profile)?,
    }
    let password = terminal::read_password(&format!("Password for {username}: "))?;
    let (client, _events) = net::connect(&server).await?;
    let auth = match net::within(client.login(username, &password)).await {
        Ok(auth) => auth,
        Err(e) if net::status(&e) == Some(Status::Unauthorized) => {
            return Err(Failure::new(Kind::BadCredentials, "wrong username or password").into());
        }
        Err(e) => return Err(e.context("signing in")),
    };
    if let Some(account) = &existing
        && account.user_id != auth.user_id
    {
        client.close().await;
        return Err(Failure::profile(format!(
            "{username} is now a different account ({}) from the one in this profile ({}), \
             which was deleted; use an empty --profile DIR",
            auth.user_id, account.user_id
        ))
        .into());
    }
    // One account is one device (see `keys`): does the relay hold this
    // profile's identity for the account, or another device's?
    let store = SignalStore::load(&profile)?;
    let on_relay = match net::lookup(&client, &auth.username).await {
        Ok(me) => me.identity_key,
        Err(e) => {
            client.close().await;
            return Err(e.context("asking the relay which identity key it holds for the account"));
        }
    };
    let ours = store
        .as_ref()
        .map(|s| s.identities.pair().identity_key().serialize());
    let elsewhere = on_relay.is_some_and(|key| ours.as_deref() != Some(&key[..]));
    if elsewhere && !replace_device {
        // This profile will not use the session: leave none behind.
        let _ = net::within(client.logout()).await;
        client.close().await;
        return Err(in_use_elsewhere(&auth.username).into());
    }
    save_session(&profile, &server, &auth)?;
    let replaced = if elsewhere {
        let published = async {
            let account = profile.account()?;
            let mut store = match store {
                Some(store) => store,
                None => SignalStore::load_or_create(&profile)?,
            };
            keys::publish_all(
                &client,
                &mut store,
                &profile,
                &account,
                "replace device",
                Replace::Allow,
            )
            .await
        };
        let published = published.await;
        client.close().await;
        Some(published.context("publishing this profile's keys in place of the other device's")?)
    } else {
        client.close().await;
        None
    };
    if let Some(previous) = existing.filter(|a| a.token.is_some() && a.server == server.url) {
        revoke_previous(&server, &previous, out).await;
    }
    out.registered("logged_in", auth.user_id, &auth.username, &server.url);
    if let Some(uploaded) = replaced {
        out.report(
            "device_replaced",
            json!({ "username": auth.username, "user_id": auth.user_id }),
            &format!(
                "This profile is now {0}'s device. The other device stops working, and \
                 everyone who talks to {0} will see a safety-number change: ask them to \
                 compare `relay-cli safety-number {0}` with you.",
                auth.username
            ),
        );
        out.uploaded(&uploaded);
    }
    Ok(())
}

/// Why a login into a profile without the account's identity stops.
fn in_use_elsewhere(user: &str) -> Failure {
    Failure::new(
        Kind::OtherDevice,
        format!(
            "{user} is in use on another device: the relay holds an identity key for {user} \
             that this profile does not have. One account is one device, so signing in here \
             would take the account over: the other device would stop working (it could no \
             longer decrypt messages to {user}), and everyone who talks to {user} would see a \
             safety-number change. Not signed in. If that is what you want (a new computer, \
             a lost profile), run `relay-cli login {user} --replace-device`"
        ),
    )
}

/// Revokes the session token the profile held before this login, so that
/// logging in again does not leave live tokens behind on the relay. The
/// new session is already saved: a failure here only warns.
async fn revoke_previous(server: &Server, previous: &Account, out: &Output) {
    let revoked = async {
        let (client, _events, _) = net::resume(server, previous).await?;
        net::within(client.logout()).await
    };
    match revoked.await {
        Ok(()) => {}
        // Expired, logged out, or revoked by the relay already: nothing left.
        Err(e) if crate::error::classify(&e) == Kind::BadCredentials => {}
        Err(e) => out.warn(&format!(
            "could not revoke the previous session on the relay ({e:#}); it expires on its own"
        )),
    }
}

pub async fn logout(ctx: &mut Ctx<'_>) -> Result<()> {
    match net::resume(&ctx.server, &ctx.account).await {
        Ok((client, _events, _)) => {
            net::within(client.logout()).await.context("logging out")?;
        }
        // Already invalid on the relay: forgetting it here is all that is left.
        Err(e) if crate::error::classify(&e) == Kind::BadCredentials => {}
        Err(e) => return Err(e),
    }
    ctx.account.token = None;
    ctx.profile.save_account(&ctx.account)?;
    ctx.out.report(
        "logged_out",
        json!({ "username": ctx.account.username }),
        &format!(
            "Logged out {}. Keys and conversations stay in {}; `relay-cli login {}` resumes them.",
            ctx.account.username,
            ctx.profile.dir().display(),
            ctx.account.username
        ),
    );
    Ok(())
}

pub async fn delete(ctx: Ctx<'_>) -> Result<()> {
    let password = terminal::read_password(&format!(
        "Password to confirm deleting {} for good: ",
        ctx.account.username
    ))?;
    // No key top-up on the way out.
    let (client, _events, _) = net::resume(&ctx.server, &ctx.account).await?;
    match net::within(client.delete_account(&password)).await {
        Ok(()) => {}
        Err(e) if net::status(&e) == Some(Status::Unauthorized) => {
            return Err(Failure::new(Kind::BadCredentials, "wrong password").into());
        }
        Err(e) => return Err(e.context("deleting the account")),
    }
    // The private keys and sessions belong to an account that is gone.
    SignalStore::erase(&ctx.profile)?;
    ctx.profile.remove(profile::ACCOUNT)?;
    ctx.out.report(
        "account_deleted",
        json!({ "username": ctx.account.username, "user_id": ctx.account.user_id }),
        &format!(
            "Deleted {} on the relay, and its keys and sessions here. \
             Received messages remain in {}.",
            ctx.account.username,
            ctx.profile.path("inbox.jsonl").display()
        ),
    );
    Ok(())
}

pub async fn whoami(ctx: &mut Ctx<'_>) -> Result<()> {
    let (client, _events, _) = net::resume(&ctx.server, &ctx.account).await?;
    let me = net::within(client.who_am_i())
        .await
        .context("asking who we are")?;
    let counts = match net::within(client.pre_key_count()).await {
        Ok(c) => Some((c.one_time_pre_keys, c.kyber_pre_keys)),
        Err(e) if net::status(&e) == Some(Status::NotFound) => None,
        Err(e) => return Err(e.context("asking for the pre-key count")),
    };
    let on_relay = net::lookup(&client, &me.username)
        .await
        .context("asking the relay which identity key it holds for this account")?
        .identity_key;
    client.close().await;
    let user_id = uuid::Uuid::from_slice(&me.user_id).unwrap_or(ctx.account.user_id);
    let identity = ctx.store.identities.pair().identity_key().serialize();
    let published = on_relay.as_deref() == Some(&identity[..]);
    let other_device = on_relay.is_some() && !published;
    let (ec, kyber) = counts.unwrap_or((0, 0));
    ctx.out.report(
        "whoami",
        json!({
            "user_id": user_id, "username": me.username, "server": ctx.server.url,
            "profile": ctx.profile.dir(), "identity_key": STANDARD.encode(&identity),
            "keys_published": published, "other_device": other_device,
            "one_time_pre_keys": ec, "kyber_pre_keys": kyber,
        }),
        &format!(
            "{} ({user_id})\nrelay:        {}\nprofile:      {}\nidentity key: {}\n\
             pre-keys on the relay: {ec} one-time EC, {kyber} one-time Kyber{}",
            me.username,
            ctx.server.url,
            ctx.profile.dir().display(),
            hex_groups(&identity),
            if published {
                ""
            } else if other_device {
                " (of ANOTHER DEVICE: the relay holds another identity key for this account; \
                 see `relay-cli login --help`)"
            } else {
                " (not published yet: run `relay-cli keys`)"
            }
        ),
    );
    Ok(())
}

pub fn trust(ctx: &mut Ctx<'_>, user: &str) -> Result<()> {
    let ids = ctx.store.identities.named(user);
    if ids.is_empty() {
        return Err(Failure::new(
            Kind::UnknownUser,
            format!("this profile has never talked to {user:?}"),
        )
        .into());
    }
    for id in &ids {
        ctx.store.forget_peer(*id);
    }
    ctx.store.save(&ctx.profile)?;
    ctx.out.report(
        "trusted",
        json!({ "user": user, "forgotten": ids }),
        &format!(
            "Forgot {user}'s previous identity. The next message to or from {user} is \
             trusted and starts a new session; compare `relay-cli safety-number {user}` \
             with them afterwards."
        ),
    );
    Ok(())
}

pub fn safety_number(ctx: &Ctx<'_>, user: &str) -> Result<()> {
    let unknown = || {
        Failure::new(
            Kind::UnknownUser,
            format!("no identity known for {user:?} yet; exchange a message first"),
        )
    };
    let peer = *ctx
        .store
        .identities
        .named(user)
        .last()
        .ok_or_else(unknown)?;
    let theirs = ctx.store.identities.identity_of(peer).ok_or_else(unknown)?;
    let ours = ctx.store.identities.pair().identity_key();
    // Signal's parameters: version 2, 5200 iterations, the ACI's 16 bytes.
    let fingerprint = Fingerprint::new(
        2,
        5200,
        ctx.account.user_id.as_bytes(),
        ours,
        peer.as_bytes(),
        &theirs,
    )
    .and_then(|f| f.display_string())
    .map_err(|e| anyhow::anyhow!("computing the safety number: {e:?}"))?;
    let digits = fingerprint;
    let grouped: Vec<&str> = digits
        .as_bytes()
        .chunks(5)
        .map(|c| std::str::from_utf8(c).unwrap_or(""))
        .collect();
    ctx.out.report(
        "safety_number",
        json!({ "user": user, "user_id": peer, "safety_number": digits }),
        &format!(
            "Safety number with {user} (the same on both sides when nobody is in between):\n{}\n{}",
            grouped[..grouped.len() / 2].join(" "),
            grouped[grouped.len() / 2..].join(" ")
        ),
    );
    Ok(())
}

fn hex_groups(bytes: &[u8]) -> String {
    bytes
        .chunks(4)
        .map(|c| c.iter().map(|b| format!("{b:02x}")).collect::<String>())
        .collect::<Vec<_>>()
        .join(" ")
}
