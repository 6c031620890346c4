//! One module per group of subcommands, and the dispatch from the parsed
//! command line to them.

mod account;
mod chat;
mod keys;
mod recv;
mod send;

use anyhow::Result;

use crate::args::{Args, Command};
use crate::ctx::Ctx;
use crate::net::Server;
use crate::output::Output;
use crate::profile::{self, Account, Profile};

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
        Command::Login {
            username,
            replace_device,
        } => {
            let existing = profile.read_json::<Account>(profile::ACCOUNT)?;
            let server = server(existing.as_ref())?;
            account::login(profile, server, &username, replace_device, out).await
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
