//! `keys`: publish (or re-publish) every key.

use anyhow::Result;

use crate::ctx::Ctx;
use crate::keys::{self, Replace};
use crate::net;

pub async fn run(ctx: &mut Ctx<'_>) -> Result<()> {
    let (client, _events, _) = net::resume(&ctx.server, &ctx.account).await?;
    let uploaded = keys::publish_all(
        &client,
        &mut ctx.store,
        &ctx.profile,
        &ctx.account,
        "keys",
        Replace::Refuse,
    )
    .await;
    client.close().await;
    ctx.out.uploaded(&uploaded?);
    Ok(())
}
