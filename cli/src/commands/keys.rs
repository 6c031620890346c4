//! `keys`: publish (or re-publish) every key.

use anyhow::Result;

use crate::ctx::Ctx;
use crate::net;

pub async fn run(ctx: &mut Ctx<'_>) -> Result<()> {
    let (client, _events) = net::resume(&ctx.server, &ctx.account).await?;
    let uploaded = crate::keys::publish_all(&client, &mut ctx.store, &ctx.profile, "keys").await?;
    client.close().await;
    ctx.out.uploaded(&uploaded);
    Ok(())
}
