//! The inbox: every message and receipt received, one JSON object per line
//! in `inbox.jsonl`, appended and never rewritten.
//!
//! The inbox is the commit point of receiving. A batch of envelopes is
//! decrypted in memory, its lines are appended and fsynced, and only then
//! are the ratchet state saved and the envelopes acked. The set of seen
//! message ids, which drops redeliveries, is rebuilt from the inbox's tail
//! when the profile opens, so it cannot disagree with what was stored: an
//! envelope is either in the inbox (and then acked again without being
//! decrypted twice) or it was never received.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::profile::Profile;
use crate::store::B64;

const INBOX: &str = "inbox.jsonl";

/// Message ids remembered for dropping redeliveries. Redeliveries are of
/// envelopes that were stored but not acked: at most the last batch or two
/// of a connection, far fewer than this.
const SEEN_CAPACITY: usize = 4096;

/// How much of the inbox's end is read to rebuild the seen ids.
const TAIL_BYTES: u64 = 2 << 20;

/// One line of the inbox; also what `--json` prints for it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Entry {
    /// A decrypted message.
    Message {
        /// The relay's message id.
        id: Uuid,
        from_id: Uuid,
        from: String,
        text: String,
        /// The sender's clock (Unix ms), as the sender claimed it.
        sent_at_ms: u64,
        /// When the relay accepted it (Unix ms).
        server_at_ms: u64,
        /// "prekey_bundle" for the messages that start a session,
        /// "ciphertext" after.
        envelope: &'static str,
    },
    /// The relay says a stored message of ours reached its recipient.
    Receipt {
        /// The receipt envelope's own id.
        id: Uuid,
        /// The id of our message that was delivered.
        delivered: Uuid,
        by_id: Uuid,
        by: String,
        at_ms: u64,
    },
    /// An envelope that could not be decrypted (sent to a session or
    /// pre-key this profile does not have, say, because the account moved
    /// devices). Kept here whole, raw content included, so nothing is lost
    /// and it can be looked at or decrypted later; reported with its
    /// sender; then acked, so it does not block the queue.
    Undecryptable {
        id: Uuid,
        from_id: Uuid,
        from: String,
        /// What libsignal (or the envelope) said was wrong.
        error: String,
        sent_at_ms: u64,
        server_at_ms: u64,
        /// The relay's envelope type (1 CIPHERTEXT, 3 PREKEY_BUNDLE, …).
        envelope_type: i32,
        /// The envelope's content exactly as received, base64.
        content: B64,
    },
}

impl Entry {
    pub fn id(&self) -> Uuid {
        match self {
            Entry::Message { id, .. }
            | Entry::Receipt { id, .. }
            | Entry::Undecryptable { id, .. } => *id,
        }
    }
}

/// The inbox file and the ids already in it.
pub struct Inbox {
    path: PathBuf,
    /// Recently received ids, oldest first, for bounded eviction.
    order: VecDeque<Uuid>,
    /// The same ids, for lookup.
    seen: HashSet<Uuid>,
}

/// Reads only what the seen set needs from a line.
#[derive(Deserialize)]
struct IdOnly {
    id: Uuid,
}

impl Inbox {
    pub fn open(profile: &Profile) -> Result<Inbox> {
        let path = profile.path(INBOX);
        let mut inbox = Inbox {
            path,
            order: VecDeque::new(),
            seen: HashSet::new(),
        };
        let mut file = match File::open(&inbox.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(inbox),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", inbox.path.display()));
            }
        };
        let len = file.metadata()?.len();
        let start = len.saturating_sub(TAIL_BYTES);
        file.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail)
            .with_context(|| format!("cannot read {}", inbox.path.display()))?;
        let mut lines = tail.split(|b| *b == b'\n');
        if start > 0 {
            // Starts mid-line.
            lines.next();
        }
        for line in lines {
            // A torn last line (crash mid-append) or a foreign line is not
            // an id we stored; skip it.
            if let Ok(entry) = serde_json::from_slice::<IdOnly>(line) {
                inbox.remember(entry.id);
            }
        }
        if len > 0 && !tail.ends_with(b"\n") {
            // Finish the torn line so the next append starts a fresh one.
            inbox.append_raw(b"\n")?;
        }
        Ok(inbox)
    }

    pub fn seen(&self, id: Uuid) -> bool {
        self.seen.contains(&id)
    }

    fn remember(&mut self, id: Uuid) {
        if self.seen.insert(id) {
            self.order.push_back(id);
            if self.order.len() > SEEN_CAPACITY
                && let Some(old) = self.order.pop_front()
            {
                self.seen.remove(&old);
            }
        }
    }

    /// Appends `entries` durably, in one write.
    pub fn append(&mut self, entries: &[Entry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for entry in entries {
            serde_json::to_writer(&mut buf, entry).context("serializing an inbox entry")?;
            buf.push(b'\n');
        }
        self.append_raw(&buf)?;
        for entry in entries {
            self.remember(entry.id());
        }
        Ok(())
    }

    fn append_raw(&self, bytes: &[u8]) -> Result<()> {
        let result = (|| -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)?;
            file.write_all(bytes)?;
            file.sync_all()
        })();
        result.with_context(|| format!("cannot append to {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: Uuid) -> Entry {
        Entry::Message {
            id,
            from_id: Uuid::nil(),
            from: "bob".into(),
            text: "hi".into(),
            sent_at_ms: 1,
            server_at_ms: 2,
            envelope: "ciphertext",
        }
    }

    #[test]
    fn seen_ids_survive_reopening_and_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::open(dir.path()).unwrap();
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let mut inbox = Inbox::open(&profile).unwrap();
        inbox.append(&[message(a), message(b)]).unwrap();
        assert!(inbox.seen(a) && inbox.seen(b) && !inbox.seen(c));

        // A crash in the middle of an append leaves half a line.
        inbox
            .append_raw(b"{\"event\":\"message\",\"id\":\"")
            .unwrap();
        let mut inbox = Inbox::open(&profile).unwrap();
        assert!(inbox.seen(a) && inbox.seen(b));
        inbox.append(&[message(c)]).unwrap();
        let inbox = Inbox::open(&profile).unwrap();
        assert!(inbox.seen(c), "the line after the torn one is intact");
    }

    #[test]
    fn the_seen_set_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::open(dir.path()).unwrap();
        let mut inbox = Inbox::open(&profile).unwrap();
        let ids: Vec<Uuid> = (0..SEEN_CAPACITY + 10).map(|_| Uuid::new_v4()).collect();
        let entries: Vec<Entry> = ids.iter().map(|id| message(*id)).collect();
        inbox.append(&entries).unwrap();
        assert_eq!(inbox.seen.len(), SEEN_CAPACITY);
        assert!(!inbox.seen(ids[0]), "the oldest are forgotten");
        assert!(inbox.seen(*ids.last().unwrap()));
        let reopened = Inbox::open(&profile).unwrap();
        assert_eq!(reopened.seen.len(), SEEN_CAPACITY);
        assert!(reopened.seen(*ids.last().unwrap()));
    }
}
