//! Generating, publishing and replenishing our pre-keys.
//!
//! The private half of every key is saved in the profile *before* the public
//! half is uploaded: a key the relay hands out must never be one we cannot
//! decrypt with. A failed upload only leaves unused private keys behind.
//!
//! Replenishment has two triggers, as the issue asks: the relay's
//! `PreKeysLow` push (while we are online), and a count check each time a
//! command connects (for everything fetched while we were offline).
//!
//! One account is one device. Each time a command connects, the identity
//! key the relay holds for the account is compared with ours; if it is
//! another one, another device published keys for this account, and
//! nothing is uploaded: uploading ours would silently take the account back,
//! and two profiles would flip it between them, each flip deleting the
//! other's pre-keys and showing every peer a safety-number change. Only
//! `login --replace-device` replaces another device's identity, on purpose.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use libsignal_protocol_syft::{
    GenericSignedPreKey, IdentityKeyPair, KeyPair, KyberPreKeyRecord, PreKeyRecord,
    SignedPreKeyRecord, Timestamp, kem,
};
use serde::Serialize;
use signal_relay::client::Client;
use signal_relay::proto::{self, EcPreKey, SignedEcPreKey, SignedKyberPreKey, Status};

use crate::error::{Failure, Kind};
use crate::net;
use crate::profile::{Account, Profile};
use crate::store::SignalStore;

/// One-time keys of each kind kept on the relay: the relay's per-upload
/// maximum, so a top-up is one request.
pub const TARGET: u32 = 100;

/// Top up when the relay holds fewer than this of either kind. The relay's
/// own default "low" threshold, so the count check and the push agree.
pub const LOW_WATER: u32 = 10;

/// One-time private keys kept locally at most, per kind: the ~100 on the
/// relay plus a few generations handed out but not (yet) used.
const KEEP_LOCAL: usize = 4 * TARGET as usize;

/// Signal rotates its signed pre-key every few days; a month is plenty for a
/// CLI that may not run for weeks, and bounds how long a stolen signed
/// pre-key stays useful.
const SIGNED_PRE_KEY_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Older signed pre-keys kept for pre-key messages sent before a rotation.
const KEEP_OLD_SIGNED: usize = 2;

/// Whether publishing may replace the identity the relay holds for the
/// account with this profile's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// If the relay holds another identity, another device has the
    /// account: upload nothing and say so.
    Refuse,
    /// The user said `login --replace-device`.
    Allow,
}

/// What the relay holds for our account, when it is not another device's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnRelay {
    /// No keys: a first upload, or a relay that lost its data.
    Nothing,
    /// Our identity key.
    Ours,
}

/// What an upload did, for the output.
#[derive(Debug, Clone, Serialize)]
pub struct Uploaded {
    /// Why keys were uploaded: "keys" (the command), "first use",
    /// "republish" (the relay no longer had them), "replace device", "low"
    /// (the relay's push) or "count" (the check at connect).
    pub reason: &'static str,
    /// One-time EC / Kyber pre-keys uploaded in this request.
    pub new_one_time_pre_keys: u32,
    pub new_kyber_pre_keys: u32,
    /// What the relay holds afterwards.
    pub one_time_pre_keys: u32,
    pub kyber_pre_keys: u32,
    /// Whether a new signed pre-key was published.
    pub rotated_signed_pre_key: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Publishes everything (the `keys` command, and `login
/// --replace-device` with [`Replace::Allow`]); see [`upload_all`]. Unless
/// replacing, refuses when another device's identity is on the relay.
pub async fn publish_all(
    client: &Client,
    store: &mut SignalStore,
    profile: &Profile,
    account: &Account,
    reason: &'static str,
    replace: Replace,
) -> Result<Uploaded> {
    if replace == Replace::Refuse {
        on_relay(client, store, account).await?;
    }
    upload_all(client, store, profile, reason).await
}

/// Makes sure the relay has our keys, each time a command connects: first
/// that the identity it holds for us is ours (see the module comment);
/// then everything if it holds nothing, else one-time keys whenever it
/// holds fewer than [`LOW_WATER`] of either kind, and a new signed pre-key
/// when the current one is old. Returns what was uploaded, if anything.
pub async fn ensure(
    client: &Client,
    store: &mut SignalStore,
    profile: &Profile,
    account: &Account,
) -> Result<Option<Uploaded>> {
    if on_relay(client, store, account).await? == OnRelay::Nothing {
        let reason = if store.uploaded() {
            "republish"
        } else {
            "first use"
        };
        return upload_all(client, store, profile, reason).await.map(Some);
    }
    // Ours is there, whatever the profile recorded (a crash can come
    // between an upload and saving that it happened).
    store.set_uploaded();
    let count = net::within(client.pre_key_count())
        .await
        .context("asking the relay how many pre-keys it holds")?;
    top_up(
        client,
        store,
        profile,
        account,
        count.one_time_pre_keys,
        count.kyber_pre_keys,
        "count",
    )
    .await
}

/// Compares the identity key the relay holds for our account with ours;
/// another one is [`Kind::OtherDevice`], explained.
async fn on_relay(client: &Client, store: &SignalStore, account: &Account) -> Result<OnRelay> {
    let me = net::lookup(client, &account.username)
        .await
        .context("asking the relay which identity key it holds for this account")?;
    if me.user_id != account.user_id {
        bail!(
            "the relay says {} is the account {}, not {} as this profile records",
            account.username,
            me.user_id,
            account.user_id
        );
    }
    let ours = store.identities.pair().identity_key().serialize();
    match me.identity_key {
        None => Ok(OnRelay::Nothing),
        Some(key) if key[..] == ours[..] => Ok(OnRelay::Ours),
        Some(_) => Err(other_device(&account.username, store.uploaded()).into()),
    }
}

/// Why this profile does not publish: another device's identity is on the
/// relay, and what to do about it.
fn other_device(user: &str, was_ours: bool) -> Failure {
    let what = if was_ours {
        format!(
            "another device signed in as {user} and replaced this profile's identity key on \
             the relay: messages to {user} are now encrypted for that device, and this profile \
             can no longer read them"
        )
    } else {
        format!(
            "{user}'s keys were published from another device, and one account is one device, \
             so this profile does not publish its own"
        )
    };
    Failure::new(
        Kind::OtherDevice,
        format!(
            "{what}. Nothing was uploaded. To make this profile {user}'s device (the other \
             device then stops working, and everyone who talks to {user} sees a safety-number \
             change), run `relay-cli login {user} --replace-device`"
        ),
    )
}

/// Publishes everything: identity, current signed pre-key, last-resort
/// Kyber key (creating what is missing), then one-time keys up to
/// [`TARGET`]. The one-time keys are counted from the relay's answer to the
/// first upload, i.e. *after* it: a new identity deletes every older
/// pre-key, so a count taken before would be of keys about to vanish. Safe
/// to repeat: ids that already exist are replaced with the same keys.
async fn upload_all(
    client: &Client,
    store: &mut SignalStore,
    profile: &Profile,
    reason: &'static str,
) -> Result<Uploaded> {
    let identity = *store.identities.pair();
    let mut rotated = false;
    let signed = match store.signed.current() {
        Some((id, record)) => public_signed(id, &record)?,
        None => {
            rotated = true;
            new_signed(store, &identity)?
        }
    };
    let last_resort = match store.kyber.last_resort() {
        Some((id, record)) => public_kyber(id, &record)?,
        None => {
            let id = store.kyber.take_id();
            let record = new_kyber(id, &identity)?;
            store.kyber.set_last_resort(id, &record)?;
            public_kyber(id, &record)?
        }
    };
    // Private halves first; see the module comment.
    store.save(profile)?;
    let base = proto::UploadKeys {
        identity_key: Some(Bytes::from(identity.identity_key().serialize().to_vec())),
        registration_id: Some(store.identities.registration_id()),
        signed_pre_key: Some(signed),
        last_resort_kyber_pre_key: Some(last_resort),
        ..Default::default()
    };
    let held = net::within(client.upload_keys(base))
        .await
        .context("publishing the identity key")?;
    store.set_uploaded();
    let (one_time, kyber) = new_one_time(
        store,
        &identity,
        held.one_time_pre_keys,
        held.kyber_pre_keys,
    )?;
    store.save(profile)?;
    if one_time.is_empty() && kyber.is_empty() {
        return Ok(Uploaded {
            reason,
            new_one_time_pre_keys: 0,
            new_kyber_pre_keys: 0,
            one_time_pre_keys: held.one_time_pre_keys,
            kyber_pre_keys: held.kyber_pre_keys,
            rotated_signed_pre_key: rotated,
        });
    }
    let upload = proto::UploadKeys {
        one_time_pre_keys: one_time,
        kyber_pre_keys: kyber,
        ..Default::default()
    };
    upload_and_report(client, upload, reason, rotated).await
}

/// Handles the relay's `PreKeysLow` push.
pub async fn on_low(
    client: &Client,
    store: &mut SignalStore,
    profile: &Profile,
    account: &Account,
    low: &proto::PreKeysLow,
) -> Result<Option<Uploaded>> {
    top_up(
        client,
        store,
        profile,
        account,
        low.one_time_pre_keys,
        low.kyber_pre_keys,
        "low",
    )
    .await
}

async fn top_up(
    client: &Client,
    store: &mut SignalStore,
    profile: &Profile,
    account: &Account,
    ec_have: u32,
    kyber_have: u32,
    reason: &'static str,
) -> Result<Option<Uploaded>> {
    let identity = *store.identities.pair();
    let stale = store.signed.current().is_none_or(|(_, record)| {
        let made = record.timestamp().map_or(0, |t| t.epoch_millis());
        now_ms().saturating_sub(made) > SIGNED_PRE_KEY_MAX_AGE.as_millis() as u64
    });
    let low = ec_have < LOW_WATER || kyber_have < LOW_WATER;
    if !low && !stale {
        return Ok(None);
    }
    let signed = if stale {
        Some(new_signed(store, &identity)?)
    } else {
        None
    };
    let (one_time, kyber) = if low {
        new_one_time(store, &identity, ec_have, kyber_have)?
    } else {
        (Vec::new(), Vec::new())
    };
    store.save(profile)?;
    let upload = proto::UploadKeys {
        signed_pre_key: signed,
        one_time_pre_keys: one_time,
        kyber_pre_keys: kyber,
        ..Default::default()
    };
    match upload_and_report(client, upload, reason, stale).await {
        Ok(uploaded) => Ok(Some(uploaded)),
        // The relay lost our keys (e.g. its database was reset) and wants a
        // first upload again, or another device replaced our identity since
        // we checked: publish everything, if the account is still ours.
        Err(e) if net::status(&e) == Some(Status::BadRequest) => {
            publish_all(client, store, profile, account, reason, Replace::Refuse)
                .await
                .map(Some)
        }
        Err(e) => Err(e),
    }
}

async fn upload_and_report(
    client: &Client,
    upload: proto::UploadKeys,
    reason: &'static str,
    rotated: bool,
) -> Result<Uploaded> {
    let new_ec = upload.one_time_pre_keys.len() as u32;
    let new_kyber = upload.kyber_pre_keys.len() as u32;
    let result = net::within(client.upload_keys(upload))
        .await
        .context("uploading pre-keys")?;
    Ok(Uploaded {
        reason,
        new_one_time_pre_keys: new_ec,
        new_kyber_pre_keys: new_kyber,
        one_time_pre_keys: result.one_time_pre_keys,
        kyber_pre_keys: result.kyber_pre_keys,
        rotated_signed_pre_key: rotated,
    })
}

/// A new signed pre-key, made current (keeping a couple of predecessors).
fn new_signed(store: &mut SignalStore, identity: &IdentityKeyPair) -> Result<SignedEcPreKey> {
    let mut rng = rand::rng();
    let id = store.signed.take_id();
    let pair = KeyPair::generate(&mut rng);
    let signature = identity
        .private_key()
        .calculate_signature(&pair.public_key.serialize(), &mut rng)
        .context("signing the signed pre-key")?;
    let record = SignedPreKeyRecord::new(
        id.into(),
        Timestamp::from_epoch_millis(now_ms()),
        &pair,
        &signature,
    );
    store.signed.set_current(id, &record, KEEP_OLD_SIGNED)?;
    public_signed(id, &record)
}

fn public_signed(id: u32, record: &SignedPreKeyRecord) -> Result<SignedEcPreKey> {
    Ok(SignedEcPreKey {
        id,
        public_key: Bytes::from(record.public_key()?.serialize().to_vec()),
        signature: Bytes::from(record.signature()?),
    })
}

/// A Kyber-1024 pre-key signed by the identity key (over the serialized
/// public key, type byte included, as libsignal verifies it).
fn new_kyber(id: u32, identity: &IdentityKeyPair) -> Result<KyberPreKeyRecord> {
    let mut rng = rand::rng();
    let pair = kem::KeyPair::generate(kem::KeyType::Kyber1024, &mut rng);
    let signature = identity
        .private_key()
        .calculate_signature(&pair.public_key.serialize(), &mut rng)
        .context("signing a Kyber pre-key")?;
    Ok(KyberPreKeyRecord::new(
        id.into(),
        Timestamp::from_epoch_millis(now_ms()),
        &pair,
        &signature,
    ))
}

fn public_kyber(id: u32, record: &KyberPreKeyRecord) -> Result<SignedKyberPreKey> {
    Ok(SignedKyberPreKey {
        id,
        public_key: Bytes::from(record.public_key()?.serialize().to_vec()),
        signature: Bytes::from(record.signature()?),
    })
}

/// New one-time EC and Kyber keys, enough to bring the relay's counts up to
/// [`TARGET`]; the private halves go into the store.
fn new_one_time(
    store: &mut SignalStore,
    identity: &IdentityKeyPair,
    ec_have: u32,
    kyber_have: u32,
) -> Result<(Vec<EcPreKey>, Vec<SignedKyberPreKey>)> {
    let mut rng = rand::rng();
    let mut ec = Vec::new();
    for _ in ec_have..TARGET {
        let id = store.pre_keys.take_id();
        let pair = KeyPair::generate(&mut rng);
        store
            .pre_keys
            .insert(id, &PreKeyRecord::new(id.into(), &pair))?;
        ec.push(EcPreKey {
            id,
            public_key: Bytes::from(pair.public_key.serialize().to_vec()),
        });
    }
    let mut kyber = Vec::new();
    for _ in kyber_have..TARGET {
        let id = store.kyber.take_id();
        let record = new_kyber(id, identity)?;
        store.kyber.insert_one_time(id, &record)?;
        kyber.push(public_kyber(id, &record)?);
    }
    store
        .pre_keys
        .prune(KEEP_LOCAL.max(ec_have as usize + ec.len()));
    store
        .kyber
        .prune(KEEP_LOCAL.max(kyber_have as usize + kyber.len()));
    Ok((ec, kyber))
}
