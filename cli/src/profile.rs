//! The profile directory: everything that makes this client *this* user.
//!
//! ```text
//! account.json        server, user id, username, session token
//! identity.json       identity key pair and registration id
//! prekeys.json        private halves of the signed, one-time and Kyber pre-keys
//! peers.json          peers' usernames and (trusted-on-first-use) identity keys
//! sessions/<user-id>  one libsignal SessionRecord per peer
//! inbox.jsonl         every received message and receipt, and (raw) every
//!                     envelope that could not be decrypted; append-only
//! lock                held (flock) while a relay-cli process uses the profile
//! ```
//!
//! The directory is mode 0700 and every file 0600: the files hold private
//! keys, ratchet state and plaintext. Files other than the inbox are replaced
//! atomically (write a temporary file, fsync, rename, fsync the directory),
//! so a crash leaves either the old or the new version, never a torn one.
//!
//! One process at a time: two processes sharing a profile would each load
//! the ratchet state, advance it differently and overwrite each other's
//! sessions. The relay also allows one connection per user.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::Failure;

/// File names inside the profile.
pub const ACCOUNT: &str = "account.json";
pub const LOCK: &str = "lock";

/// An open, locked profile directory.
pub struct Profile {
    /// The directory itself.
    dir: PathBuf,
    /// The exclusive lock on `dir/lock`, released when the profile is dropped
    /// (or the process dies, which is why flock and not a pid file).
    _lock: Flock<File>,
}

/// The platform's per-user data directory, e.g. `$XDG_DATA_HOME/relay-cli`
/// or `~/.local/share/relay-cli` on Linux.
pub fn default_dir() -> Result<PathBuf> {
    dirs::data_dir()
        .map(|d| d.join("relay-cli"))
        .ok_or_else(|| {
            Failure::profile("cannot find a user data directory; pass --profile DIR").into()
        })
}

impl Profile {
    /// Opens (creating if needed) and locks the profile at `dir`.
    pub fn open(dir: &Path) -> Result<Profile> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create the profile directory {}", dir.display()))?;
        // An existing directory keeps its mode on create; tighten it anyway.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
        let lock_path = dir.join(LOCK);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|_| {
            Failure::profile(format!(
                "the profile {} is in use by another relay-cli process; \
                 close it (or use another --profile)",
                dir.display()
            ))
        })?;
        Ok(Profile {
            dir: dir.to_owned(),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Reads a JSON file; `None` if it does not exist.
    pub fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        let Some(bytes) = self.read(name)? else {
            return Ok(None);
        };
        let value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is corrupt", self.path(name).display()))?;
        Ok(Some(value))
    }

    /// Reads a file; `None` if it does not exist.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(name);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Replaces a JSON file atomically.
    pub fn write_json<T: Serialize + ?Sized>(&self, name: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(value).context("serializing profile data")?;
        self.write(name, &bytes)
    }

    /// Replaces a file atomically and durably, mode 0600. `name` may name a
    /// file in a subdirectory, which is created (0700) if needed.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path(name);
        let parent = path.parent().unwrap_or(&self.dir).to_owned();
        if parent != self.dir {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let tmp = path.with_extension("tmp");
        let result = (|| -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            fs::rename(&tmp, &path)?;
            // The rename is durable only once the directory entry is.
            File::open(&parent)?.sync_all()
        })();
        result.with_context(|| format!("cannot write {}", path.display()))
    }

    /// Removes a file if it exists.
    pub fn remove(&self, name: &str) -> Result<()> {
        let path = self.path(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }

    /// Removes a subdirectory and everything in it, if it exists.
    pub fn remove_dir(&self, name: &str) -> Result<()> {
        let path = self.path(name);
        match fs::remove_dir_all(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }

    /// The account, or a clear error if this profile has none.
    pub fn account(&self) -> Result<Account> {
        self.read_json::<Account>(ACCOUNT)?.ok_or_else(|| {
            Failure::profile(format!(
                "no account in the profile {}; run `relay-cli register USERNAME` \
                 or `relay-cli login USERNAME` first",
                self.dir.display()
            ))
            .into()
        })
    }

    pub fn save_account(&self, account: &Account) -> Result<()> {
        self.write_json(ACCOUNT, account)
    }
}

/// Who this profile is on which relay.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Account {
    /// The relay this account lives on; later commands connect here unless
    /// `--server` says otherwise.
    pub server: String,
    /// A CA certificate to trust for that relay's TLS (local `wss://`), so
    /// it need not be repeated on every command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// Our user id: the libsignal address peers know us by.
    pub user_id: Uuid,
    /// Our username, for display and to refuse logging a profile into a
    /// different account.
    pub username: String,
    /// The session token from register/login (base64), presented with
    /// `Resume` so commands need no password. `None` after logout.
    #[serde(default)]
    pub token: Option<String>,
    /// When the token stops working (Unix ms), to say "log in again" rather
    /// than "bad credentials" when it has simply expired.
    #[serde(default)]
    pub token_expires_at_ms: i64,
}
