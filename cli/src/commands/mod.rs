//! One module per group of subcommands, and the context they share: the
//! locked profile, its account and libsignal store, the inbox, the relay to
//! talk to, and the output.

mod account;
mod chat;
mod keys;
mod recv;
mod send;

use anyhow::Result;
use signal_relay::client::{Client, Events};

use crate::args::{Args, Command};
use crate::inbox::Inbox;
use crate::net::{self, Server};
use crate::output::Output;
use crate::profile::{self, Account, Profile};
use crate::store::SignalStore;

/// Runs the chosen subcommand.
pub async fn run(args: Args, out: &Output) -> Result<()> {
    let dir = match &args.profile {
        Some(dir) => dir.clone(),
        None => profile::default_dir()?,
    };
    let profile = Profile::open(&dir)?;
    let server = |account: Option<&Account>| {
        Server::choose(args.server.as_deref(), args.ca_cert.clone(), account)
    };
    match args.command {
        Command::Register { username } => {
            account::register(profile, server(None)?, &username, out).await
        }
        Command::Login { username } => {
            let existing = profile.read_json::<Account>(profile::ACCOUNT)?;
            let server = server(existing.as_ref())?;
            account::login(profile, server, &username, out).await
        }
        Command::Trust { user } => account::trust(&mut Ctx::open(profile, &server, out)?, &user),
        Command::SafetyNumber { user } => {
            account::safety_number(&Ctx::open(profile, &server, out)?, &user)
        }
        command => {
            let mut ctx = Ctx::open(profile, &server, out)?;
            match command {
                Command::Keys => keys::run(&mut ctx).await,
                Command::Send { user, text } => send::run(&mut ctx, &user, &text).await,
                Command::Recv { follow } => recv::run(&mut ctx, follow).await,
                Command::Chat { user } => chat::run(&mut ctx, &user).await,
                Command::Whoami => account::whoami(&mut ctx).await,
                Command::Logout => account::logout(&mut ctx).await,
                Command::DeleteAccount => account::delete(ctx).await,
                Command::Register { .. }
                | Command::Login { .. }
                | Command::Trust { .. }
                | Command::SafetyNumber { .. } => unreachable!("handled above"),
            }
        }
    }
}

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
    pub out: &'o Output,
}

impl<'o> Ctx<'o> {
    fn open(
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
            out,
        })
    }

    /// Connects, resumes the saved session, and makes sure the relay has
    /// our keys (publishing or topping them up as needed).
    pub async fn connect(&mut self) -> Result<(Client, Events)> {
        let (client, events) = net::resume(&self.server, &self.account).await?;
        if let Some(up) = crate::keys::ensure(&client, &mut self.store, &self.profile).await? {
            self.out.uploaded(&up);
        }
        Ok((client, events))
    }
}
