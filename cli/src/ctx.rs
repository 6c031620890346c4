//! The context a signed-in command works with: the locked profile, its
//! account and libsignal store, the inbox, the relay to talk to, and the
//! output. Its own module because both the commands and `receive` use it.

use anyhow::Result;
use signal_relay::client::{Client, Events};

use crate::inbox::Inbox;
use crate::net::{self, Server};
use crate::output::Output;
use crate::profile::{Account, Profile};
use crate::store::SignalStore;

/// Everything a signed-in command works with.
pub struct Ctx<'o> {
    /// The locked profile directory.
    pub profile: Profile,
    /// Who we are, and the saved session token.
    pub account: Account,
    /// The relay to connect to.
    pub server: Server,
    /// libsignal's state (identity, pre-keys, sessions, peers).
    pub store: SignalStore,
    /// Received messages, and the ids already seen.
    pub inbox: Inbox,
    /// The largest message content the relay accepts, as it said when we
    /// connected: a text is checked against it before it is encrypted.
    pub max_message_bytes: usize,
    pub out: &'o Output,
}

impl<'o> Ctx<'o> {
    pub fn open(
        profile: Profile,
        server: &dyn Fn(Option<&Account>) -> Result<Server>,
        out: &'o Output,
    ) -> Result<Ctx<'o>> {
        let account = profile.account()?;
        let server = server(Some(&account))?;
        let store = SignalStore::load_or_create(&profile)?;
        let inbox = Inbox::open(&profile)?;
        Ok(Ctx {
            profile,
            account,
            server,
            store,
            inbox,
            max_message_bytes: net::DEFAULT_MAX_MESSAGE_BYTES,
            out,
        })
    }

    /// Connects, resumes the saved session, and makes sure the relay has
    /// our keys (publishing or topping them up as needed) and that no other
    /// device has taken the account over.
    pub async fn connect(&mut self) -> Result<(Client, Events)> {
        let (client, events, auth) = net::resume(&self.server, &self.account).await?;
        if auth.max_message_bytes > 0 {
            self.max_message_bytes = auth.max_message_bytes as usize;
        }
        let uploaded =
            crate::keys::ensure(&client, &mut self.store, &self.profile, &self.account).await;
        match uploaded {
            Ok(Some(up)) => self.out.uploaded(&up),
            Ok(None) => {}
            Err(e) => {
                client.close().await;
                return Err(e);
            }
        }
        Ok((client, events))
    }
}
