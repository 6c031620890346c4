//! libsignal's stores, kept in memory and persisted in the profile.
//!
//! libsignal asks for five stores (identities, sessions, one-time pre-keys,
//! signed pre-keys, Kyber pre-keys) and takes each as a separate `&mut`, so
//! each is its own struct here. They change in memory while a batch of
//! messages is encrypted or decrypted; [`SignalStore::save`] then writes the
//! files that changed. The caller decides *when* (see `receive`: the inbox
//! line is written first, then this state, then the ack).
//!
//! Peers are addressed as libsignal `ProtocolAddress(user id, device 1)`:
//! the relay is single-device, one user is one device.
//!
//! Identities are trusted on first use, as in Signal: the first key seen for
//! a peer is saved; a different key later is refused until the user runs
//! `relay-cli trust USER`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::SystemTime;

use anyhow::{Context, Result};
use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libsignal_protocol_syft::{
    DeviceId, Direction, GenericSignedPreKey, IdentityChange, IdentityKey, IdentityKeyPair,
    IdentityKeyStore, KyberPreKeyId, KyberPreKeyRecord, KyberPreKeyStore, PreKeyId, PreKeyRecord,
    PreKeyStore, ProtocolAddress, PublicKey, SessionRecord, SessionStore,
    SessionUsabilityRequirements, SignalProtocolError, SignedPreKeyId, SignedPreKeyRecord,
    SignedPreKeyStore,
};
use rand::Rng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::profile::Profile;

const IDENTITY: &str = "identity.json";
const PREKEYS: &str = "prekeys.json";
const PEERS: &str = "peers.json";
const SESSIONS: &str = "sessions";

type SignalResult<T> = Result<T, SignalProtocolError>;

/// The one device of a single-device user.
pub fn device() -> DeviceId {
    DeviceId::new(1).expect("1 is a valid device id")
}

/// The libsignal address of a peer.
pub fn address(peer: Uuid) -> ProtocolAddress {
    ProtocolAddress::new(peer.to_string(), device())
}

fn peer_of(address: &ProtocolAddress) -> SignalResult<Uuid> {
    Uuid::parse_str(address.name()).map_err(|_| {
        SignalProtocolError::InvalidArgument(format!("address {address} is not a user id"))
    })
}

/// Bytes, written as base64 in the profile's JSON files.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct B64(pub Vec<u8>);

impl Serialize for B64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for B64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(text)
            .map(B64)
            .map_err(serde::de::Error::custom)
    }
}

/// All of libsignal's state for this user.
pub struct SignalStore {
    pub identities: Identities,
    pub sessions: Sessions,
    pub pre_keys: OneTimePreKeys,
    pub signed: SignedPreKeys,
    pub kyber: KyberPreKeys,
    /// Whether the relay has accepted our identity key, signed pre-key and
    /// last-resort key; until then, commands upload them first.
    uploaded: bool,
    /// `uploaded` changed and `prekeys.json` must be written.
    uploaded_dirty: bool,
}

#[derive(Serialize, Deserialize)]
struct IdentityFile {
    registration_id: u32,
    identity_key_pair: B64,
}

/// `prekeys.json`, read.
#[derive(Deserialize)]
struct PreKeysFile {
    uploaded: bool,
    one_time: OneTimePreKeys,
    signed: SignedPreKeys,
    kyber: KyberPreKeys,
}

/// `prekeys.json`, written (borrowing, so saving copies nothing).
#[derive(Serialize)]
struct PreKeysFileRef<'a> {
    uploaded: bool,
    one_time: &'a OneTimePreKeys,
    signed: &'a SignedPreKeys,
    kyber: &'a KyberPreKeys,
}

impl SignalStore {
    /// Loads the store, or `None` if this profile has no identity yet.
    pub fn load(profile: &Profile) -> Result<Option<SignalStore>> {
        let Some(identity) = profile.read_json::<IdentityFile>(IDENTITY)? else {
            return Ok(None);
        };
        let pair = IdentityKeyPair::try_from(&identity.identity_key_pair.0[..])
            .context("identity.json holds an invalid identity key pair")?;
        let keys = profile.read_json::<PreKeysFile>(PREKEYS)?;
        let peers = profile.read_json(PEERS)?.unwrap_or_default();
        let mut sessions = HashMap::new();
        let dir = profile.path(SESSIONS);
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
                    let name = entry.file_name();
                    // Skips leftovers such as `*.tmp` from an interrupted write.
                    let Some(peer) = name.to_str().and_then(|n| Uuid::parse_str(n).ok()) else {
                        continue;
                    };
                    let bytes = std::fs::read(entry.path())
                        .with_context(|| format!("cannot read {}", entry.path().display()))?;
                    sessions.insert(peer, bytes);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
        }
        let (uploaded, pre_keys, signed, kyber) = match keys {
            Some(k) => (k.uploaded, k.one_time, k.signed, k.kyber),
            None => Default::default(),
        };
        Ok(Some(SignalStore {
            identities: Identities {
                pair,
                registration_id: identity.registration_id,
                peers,
                dirty: false,
            },
            sessions: Sessions {
                records: sessions,
                dirty: BTreeSet::new(),
            },
            pre_keys,
            signed,
            kyber,
            uploaded,
            uploaded_dirty: false,
        }))
    }

    /// Loads the store, generating a new identity if the profile has none.
    pub fn load_or_create(profile: &Profile) -> Result<SignalStore> {
        if let Some(store) = Self::load(profile)? {
            return Ok(store);
        }
        let mut rng = rand::rng();
        let pair = IdentityKeyPair::generate(&mut rng);
        // libsignal's range for registration ids (14 bits, not 0).
        let registration_id = rng.random_range(1..=16380);
        profile.write_json(
            IDENTITY,
            &IdentityFile {
                registration_id,
                identity_key_pair: B64(pair.serialize().to_vec()),
            },
        )?;
        Self::load(profile)?.context("identity.json vanished right after it was written")
    }

    /// Writes every file whose contents changed since the last save.
    pub fn save(&mut self, profile: &Profile) -> Result<()> {
        if self.identities.dirty {
            profile.write_json(PEERS, &self.identities.peers)?;
            self.identities.dirty = false;
        }
        if self.pre_keys.dirty || self.signed.dirty || self.kyber.dirty || self.uploaded_dirty {
            profile.write_json(
                PREKEYS,
                &PreKeysFileRef {
                    uploaded: self.uploaded,
                    one_time: &self.pre_keys,
                    signed: &self.signed,
                    kyber: &self.kyber,
                },
            )?;
            self.pre_keys.dirty = false;
            self.signed.dirty = false;
            self.kyber.dirty = false;
            self.uploaded_dirty = false;
        }
        for peer in std::mem::take(&mut self.sessions.dirty) {
            let name = format!("{SESSIONS}/{peer}");
            match self.sessions.records.get(&peer) {
                Some(bytes) => profile.write(&name, bytes)?,
                None => profile.remove(&name)?,
            }
        }
        Ok(())
    }

    /// Removes every file of this store (account deletion).
    pub fn erase(profile: &Profile) -> Result<()> {
        profile.remove(IDENTITY)?;
        profile.remove(PREKEYS)?;
        profile.remove(PEERS)?;
        profile.remove_dir(SESSIONS)
    }

    pub fn uploaded(&self) -> bool {
        self.uploaded
    }

    pub fn set_uploaded(&mut self) {
        if !self.uploaded {
            self.uploaded = true;
            self.uploaded_dirty = true;
        }
    }

    /// Forgets everything about a peer: identity, username and session, so
    /// the next contact is trusted on first use again.
    pub fn forget_peer(&mut self, peer: Uuid) {
        self.identities.forget(peer);
        self.sessions.forget(peer);
    }
}

/// Our identity and what we know of our peers.
pub struct Identities {
    /// Our long-term identity key pair.
    pair: IdentityKeyPair,
    /// Our registration id, published with the identity key; a new one
    /// tells peers this is a new installation.
    registration_id: u32,
    /// Peers by user id (`peers.json`).
    peers: BTreeMap<Uuid, Peer>,
    /// `peers` changed since the last save.
    dirty: bool,
}

/// What we know of one peer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Peer {
    /// The username the relay last gave for this user id (from a bundle or
    /// an envelope): what the user types and reads.
    #[serde(default)]
    pub username: Option<String>,
    /// Their identity key, trusted on first use. A different key later means
    /// a reinstall or an impersonation, and is refused until `trust`.
    #[serde(default)]
    pub identity_key: Option<B64>,
}

impl Identities {
    pub fn pair(&self) -> &IdentityKeyPair {
        &self.pair
    }

    pub fn registration_id(&self) -> u32 {
        self.registration_id
    }

    /// The user ids whose last known username is `username` (case-blind, as
    /// the relay's usernames are). More than one means the name changed
    /// hands.
    pub fn named(&self, username: &str) -> Vec<Uuid> {
        self.peers
            .iter()
            .filter(|(_, p)| {
                p.username
                    .as_deref()
                    .is_some_and(|n| n.eq_ignore_ascii_case(username))
            })
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn peer(&self, id: Uuid) -> Option<&Peer> {
        self.peers.get(&id)
    }

    /// Records the username the relay gave for `id`.
    pub fn set_username(&mut self, id: Uuid, username: &str) {
        let peer = self.peers.entry(id).or_default();
        if peer.username.as_deref() != Some(username) {
            peer.username = Some(username.to_owned());
            self.dirty = true;
        }
    }

    /// The identity key trusted for `id`, if any.
    pub fn identity_of(&self, id: Uuid) -> Option<IdentityKey> {
        let bytes = self.peers.get(&id)?.identity_key.as_ref()?;
        IdentityKey::decode(&bytes.0).ok()
    }

    fn forget(&mut self, id: Uuid) {
        if self.peers.remove(&id).is_some() {
            self.dirty = true;
        }
    }
}

#[async_trait(?Send)]
impl IdentityKeyStore for Identities {
    async fn get_identity_key_pair(&self) -> SignalResult<IdentityKeyPair> {
        Ok(self.pair)
    }

    async fn get_local_registration_id(&self) -> SignalResult<u32> {
        Ok(self.registration_id)
    }

    async fn save_identity(
        &mut self,
        address: &ProtocolAddress,
        identity: &IdentityKey,
    ) -> SignalResult<IdentityChange> {
        let id = peer_of(address)?;
        let peer = self.peers.entry(id).or_default();
        let new = B64(identity.serialize().to_vec());
        let changed = peer.identity_key.as_ref().is_some_and(|old| *old != new);
        if peer.identity_key.as_ref() != Some(&new) {
            peer.identity_key = Some(new);
            self.dirty = true;
        }
        Ok(IdentityChange::from_changed(changed))
    }

    async fn is_trusted_identity(
        &self,
        address: &ProtocolAddress,
        identity: &IdentityKey,
        _direction: Direction,
    ) -> SignalResult<bool> {
        // Trust on first use; afterwards only the same key, in both
        // directions, until the user runs `trust`.
        Ok(match self.identity_of(peer_of(address)?) {
            None => true,
            Some(known) => known == *identity,
        })
    }

    async fn get_identity(&self, address: &ProtocolAddress) -> SignalResult<Option<IdentityKey>> {
        Ok(self.identity_of(peer_of(address)?))
    }
}

/// Double Ratchet sessions, one per peer (`sessions/<user id>`).
pub struct Sessions {
    /// Serialized `SessionRecord`s by peer.
    records: HashMap<Uuid, Vec<u8>>,
    /// Peers whose record changed (or was removed) since the last save.
    dirty: BTreeSet<Uuid>,
}

impl Sessions {
    /// Whether we can encrypt to `peer` without fetching a new bundle: a
    /// current PQXDH session that is not stale (an unanswered pre-key
    /// session expires after 30 days, as in Signal).
    pub fn usable(&self, peer: Uuid) -> bool {
        let Some(bytes) = self.records.get(&peer) else {
            return false;
        };
        SessionRecord::deserialize(bytes)
            .and_then(|record| {
                record.has_usable_sender_chain(
                    SystemTime::now(),
                    SessionUsabilityRequirements::NotStale
                        | SessionUsabilityRequirements::EstablishedWithPqxdh,
                )
            })
            .unwrap_or(false)
    }

    fn forget(&mut self, peer: Uuid) {
        if self.records.remove(&peer).is_some() {
            self.dirty.insert(peer);
        }
    }
}

#[async_trait(?Send)]
impl SessionStore for Sessions {
    async fn load_session(&self, address: &ProtocolAddress) -> SignalResult<Option<SessionRecord>> {
        self.records
            .get(&peer_of(address)?)
            .map(|bytes| SessionRecord::deserialize(bytes))
            .transpose()
    }

    async fn store_session(
        &mut self,
        address: &ProtocolAddress,
        record: &SessionRecord,
    ) -> SignalResult<()> {
        let peer = peer_of(address)?;
        self.records.insert(peer, record.serialize()?);
        self.dirty.insert(peer);
        Ok(())
    }
}

/// Largest key id the relay accepts (`0..=2^31-1`).
const MAX_KEY_ID: u32 = (1 << 31) - 1;

/// Hands out key ids 1, 2, …, wrapping before the relay's limit.
fn take_id(next: &mut u32) -> u32 {
    let id = (*next).clamp(1, MAX_KEY_ID);
    *next = if id == MAX_KEY_ID { 1 } else { id + 1 };
    id
}

/// Private halves of the one-time EC pre-keys we published.
#[derive(Default, Serialize, Deserialize)]
pub struct OneTimePreKeys {
    /// The next id to give a new key.
    next_id: u32,
    /// Serialized `PreKeyRecord`s by id.
    records: BTreeMap<u32, B64>,
    #[serde(skip)]
    dirty: bool,
}

impl OneTimePreKeys {
    pub fn take_id(&mut self) -> u32 {
        self.dirty = true;
        take_id(&mut self.next_id)
    }

    pub fn insert(&mut self, id: u32, record: &PreKeyRecord) -> Result<()> {
        self.records.insert(id, B64(record.serialize()?));
        self.dirty = true;
        Ok(())
    }

    /// Drops the oldest (lowest-id) keys beyond `keep`. The relay hands keys
    /// out lowest id first, so these were fetched long ago by someone who
    /// never wrote; keeping them forever would only grow the profile.
    pub fn prune(&mut self, keep: usize) {
        while self.records.len() > keep {
            self.records.pop_first();
            self.dirty = true;
        }
    }
}

#[async_trait(?Send)]
impl PreKeyStore for OneTimePreKeys {
    async fn get_pre_key(&self, id: PreKeyId) -> SignalResult<PreKeyRecord> {
        let bytes = self
            .records
            .get(&u32::from(id))
            .ok_or(SignalProtocolError::InvalidPreKeyId)?;
        PreKeyRecord::deserialize(&bytes.0)
    }

    async fn save_pre_key(&mut self, id: PreKeyId, record: &PreKeyRecord) -> SignalResult<()> {
        self.records.insert(id.into(), B64(record.serialize()?));
        self.dirty = true;
        Ok(())
    }

    async fn remove_pre_key(&mut self, id: PreKeyId) -> SignalResult<()> {
        if self.records.remove(&u32::from(id)).is_some() {
            self.dirty = true;
        }
        Ok(())
    }
}

/// Private halves of our signed EC pre-keys: the current one and a few
/// predecessors, for pre-key messages still in flight when it rotated.
#[derive(Default, Serialize, Deserialize)]
pub struct SignedPreKeys {
    next_id: u32,
    /// The id published now.
    current: Option<u32>,
    /// Serialized `SignedPreKeyRecord`s by id.
    records: BTreeMap<u32, B64>,
    #[serde(skip)]
    dirty: bool,
}

impl SignedPreKeys {
    pub fn current(&self) -> Option<(u32, SignedPreKeyRecord)> {
        let id = self.current?;
        let record = SignedPreKeyRecord::deserialize(&self.records.get(&id)?.0).ok()?;
        Some((id, record))
    }

    pub fn take_id(&mut self) -> u32 {
        self.dirty = true;
        take_id(&mut self.next_id)
    }

    /// Makes `record` the current signed pre-key, keeping the last `keep`
    /// older ones.
    pub fn set_current(&mut self, id: u32, record: &SignedPreKeyRecord, keep: usize) -> Result<()> {
        self.records.insert(id, B64(record.serialize()?));
        self.current = Some(id);
        let mut older: Vec<u32> = self.records.keys().copied().filter(|k| *k != id).collect();
        while older.len() > keep {
            self.records.remove(&older.remove(0));
        }
        self.dirty = true;
        Ok(())
    }
}

#[async_trait(?Send)]
impl SignedPreKeyStore for SignedPreKeys {
    async fn get_signed_pre_key(&self, id: SignedPreKeyId) -> SignalResult<SignedPreKeyRecord> {
        let bytes = self
            .records
            .get(&u32::from(id))
            .ok_or(SignalProtocolError::InvalidSignedPreKeyId)?;
        SignedPreKeyRecord::deserialize(&bytes.0)
    }

    async fn save_signed_pre_key(
        &mut self,
        id: SignedPreKeyId,
        record: &SignedPreKeyRecord,
    ) -> SignalResult<()> {
        self.records.insert(id.into(), B64(record.serialize()?));
        self.dirty = true;
        Ok(())
    }
}

/// Private halves of our Kyber pre-keys: one-time keys, deleted on use, and
/// the last-resort key, which is reused and therefore remembers which base
/// keys it has already seen (a replayed pre-key message must fail).
#[derive(Default, Serialize, Deserialize)]
pub struct KyberPreKeys {
    /// Shared by one-time and last-resort keys: libsignal looks both up by
    /// the same id.
    next_id: u32,
    /// Serialized one-time `KyberPreKeyRecord`s by id.
    one_time: BTreeMap<u32, B64>,
    /// The last-resort key published now.
    last_resort: Option<u32>,
    /// Serialized last-resort records by id (the current one and its
    /// predecessor, for messages in flight across a rotation).
    last_resort_records: BTreeMap<u32, B64>,
    /// (Kyber id, signed pre-key id, sender's base key) already used with a
    /// last-resort key.
    used_base_keys: BTreeSet<(u32, u32, B64)>,
    #[serde(skip)]
    dirty: bool,
}

impl KyberPreKeys {
    pub fn take_id(&mut self) -> u32 {
        self.dirty = true;
        take_id(&mut self.next_id)
    }

    pub fn insert_one_time(&mut self, id: u32, record: &KyberPreKeyRecord) -> Result<()> {
        self.one_time.insert(id, B64(record.serialize()?));
        self.dirty = true;
        Ok(())
    }

    /// See [`OneTimePreKeys::prune`].
    pub fn prune(&mut self, keep: usize) {
        while self.one_time.len() > keep {
            self.one_time.pop_first();
            self.dirty = true;
        }
    }

    pub fn last_resort(&self) -> Option<(u32, KyberPreKeyRecord)> {
        let id = self.last_resort?;
        let record = KyberPreKeyRecord::deserialize(&self.last_resort_records.get(&id)?.0).ok()?;
        Some((id, record))
    }

    pub fn set_last_resort(&mut self, id: u32, record: &KyberPreKeyRecord) -> Result<()> {
        self.last_resort_records
            .insert(id, B64(record.serialize()?));
        self.last_resort = Some(id);
        // Keep the predecessor for messages already on their way.
        while self.last_resort_records.len() > 2 {
            let oldest = *self.last_resort_records.keys().next().expect("non-empty");
            self.last_resort_records.remove(&oldest);
            self.used_base_keys.retain(|(k, _, _)| *k != oldest);
        }
        self.dirty = true;
        Ok(())
    }
}

#[async_trait(?Send)]
impl KyberPreKeyStore for KyberPreKeys {
    async fn get_kyber_pre_key(&self, id: KyberPreKeyId) -> SignalResult<KyberPreKeyRecord> {
        let id = u32::from(id);
        let bytes = self
            .one_time
            .get(&id)
            .or_else(|| self.last_resort_records.get(&id))
            .ok_or(SignalProtocolError::InvalidKyberPreKeyId)?;
        KyberPreKeyRecord::deserialize(&bytes.0)
    }

    async fn save_kyber_pre_key(
        &mut self,
        id: KyberPreKeyId,
        record: &KyberPreKeyRecord,
    ) -> SignalResult<()> {
        // libsignal itself never saves Kyber keys; our own code uses
        // `insert_one_time` / `set_last_resort`, which say which kind.
        self.one_time.insert(id.into(), B64(record.serialize()?));
        self.dirty = true;
        Ok(())
    }

    async fn mark_kyber_pre_key_used(
        &mut self,
        id: KyberPreKeyId,
        signed_id: SignedPreKeyId,
        base_key: &PublicKey,
    ) -> SignalResult<()> {
        let id = u32::from(id);
        if self.one_time.remove(&id).is_some() {
            self.dirty = true;
            return Ok(());
        }
        if self.last_resort_records.contains_key(&id) {
            let used = (id, u32::from(signed_id), B64(base_key.serialize().to_vec()));
            if !self.used_base_keys.insert(used) {
                return Err(SignalProtocolError::InvalidMessage(
                    libsignal_protocol_syft::CiphertextMessageType::PreKey,
                    "reused base key with the last-resort Kyber pre-key",
                ));
            }
            self.dirty = true;
            return Ok(());
        }
        Err(SignalProtocolError::InvalidKyberPreKeyId)
    }
}
