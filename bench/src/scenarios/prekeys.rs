//! The `prekeys` scenario: bundle fetches per second, each consuming a
//! one-time pre-key.
//!
//! Key material: the identity key, signed pre-key and Kyber keys of each
//! target come from the libsignal-generated upload vectors
//! (`shared/vectors/libsignal-prekeys.json`), which are valid as they are;
//! the server checks signatures against the identity key in the same
//! upload, so one vector may serve many fresh accounts. One-time EC pre-keys
//! carry no signature, so the bench makes as many fresh X25519 public keys
//! as it needs.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde_json::{Value, json};
use signal_relay::proto::{self, EcPreKey, SignedEcPreKey, SignedKyberPreKey, UploadKeys};
use uuid::Uuid;

use super::Run;
use crate::live;
use crate::metrics::{Kind, ProcWindow};
use crate::report::Row;

/// Most one-time keys of one kind per upload (the protocol's limit).
const PER_UPLOAD: u32 = 100;

#[derive(Debug, Clone, clap::Args)]
pub struct PrekeysArgs {
    /// Users whose bundles are fetched.
    #[arg(long, default_value_t = 100)]
    pub targets: usize,
    /// One-time EC pre-keys uploaded per target.
    #[arg(long, default_value_t = 1_000)]
    pub keys: u32,
    /// Connected clients fetching bundles.
    #[arg(long, default_value_t = 16)]
    pub fetchers: usize,
    /// Fetches in flight per fetcher.
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// Seconds of fetching measured.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// The libsignal pre-key upload vectors.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/vectors/libsignal-prekeys.json"))]
    pub vectors: PathBuf,
}

fn hex_bytes(v: &Value, field: &str) -> anyhow::Result<Bytes> {
    let text = v
        .get(field)
        .and_then(Value::as_str)
        .with_context(|| format!("vector field {field} missing"))?;
    Ok(Bytes::from(hex::decode(text)?))
}

fn id(v: &Value) -> anyhow::Result<u32> {
    Ok(v.get("id")
        .and_then(Value::as_u64)
        .context("vector key id missing")? as u32)
}

fn signed_ec(v: &Value) -> anyhow::Result<SignedEcPreKey> {
    Ok(SignedEcPreKey {
        id: id(v)?,
        public_key: hex_bytes(v, "public_key")?,
        signature: hex_bytes(v, "signature")?,
    })
}

fn signed_kyber(v: &Value) -> anyhow::Result<SignedKyberPreKey> {
    Ok(SignedKyberPreKey {
        id: id(v)?,
        public_key: hex_bytes(v, "public_key")?,
        signature: hex_bytes(v, "signature")?,
    })
}

/// The first upload of each valid vector, without its one-time EC keys.
fn load_vectors(path: &PathBuf) -> anyhow::Result<Vec<UploadKeys>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the pre-key vectors at {}", path.display()))?;
    let doc: Value = serde_json::from_str(&text)?;
    let valid = doc
        .get("valid")
        .and_then(Value::as_array)
        .context("vectors have no `valid` list")?;
    valid
        .iter()
        .map(|v| {
            Ok(UploadKeys {
                identity_key: Some(hex_bytes(v, "identity_key")?),
                registration_id: Some(
                    v.get("registration_id")
                        .and_then(Value::as_u64)
                        .context("registration_id missing")? as u32,
                ),
                signed_pre_key: Some(signed_ec(
                    v.get("signed_pre_key").context("signed_pre_key")?,
                )?),
                one_time_pre_keys: Vec::new(),
                kyber_pre_keys: v
                    .get("kyber_pre_keys")
                    .and_then(Value::as_array)
                    .map(|ks| {
                        ks.iter()
                            .map(signed_kyber)
                            .collect::<anyhow::Result<Vec<_>>>()
                    })
                    .transpose()?
                    .unwrap_or_default(),
                last_resort_kyber_pre_key: Some(signed_kyber(
                    v.get("kyber_last_resort").context("kyber_last_resort")?,
                )?),
            })
        })
        .collect()
}

/// A fresh X25519 public key in libsignal's serialization (0x05 || u).
fn one_time_key(id: u32) -> EcPreKey {
    let secret: [u8; 32] = rand::random();
    let public = curve25519_dalek::MontgomeryPoint::mul_base_clamped(secret);
    let mut key = Vec::with_capacity(33);
    key.push(0x05);
    key.extend_from_slice(public.as_bytes());
    EcPreKey {
        id,
        public_key: Bytes::from(key),
    }
}

/// Uploads the target's keys: the vector's identity, signed and Kyber keys
/// with the first batch of one-time keys, then the rest 100 at a time.
async fn upload(
    url: &str,
    account: &crate::seed::Account,
    first: UploadKeys,
    keys: u32,
) -> anyhow::Result<()> {
    let (client, _events) = live::connect_relay(url, account).await?;
    let mut next_id = 1;
    let mut request = first;
    loop {
        let end = (next_id + PER_UPLOAD).min(keys + 1);
        request.one_time_pre_keys = (next_id..end).map(one_time_key).collect();
        next_id = end;
        client
            .upload_keys(request)
            .await
            .map_err(|e| anyhow::anyhow!("upload: {e}"))?;
        if next_id > keys {
            break;
        }
        request = UploadKeys::default();
    }
    client.close().await;
    Ok(())
}

async fn count_one_time_keys(db: &sqlx::PgPool, users: &[Uuid]) -> Option<i64> {
    // Read from the database, not from the server's word. Tolerant: the key
    // directory's schema is its owner's to change.
    sqlx::query_scalar("SELECT count(*) FROM one_time_pre_keys WHERE user_id = ANY($1)")
        .bind(users)
        .fetch_one(db)
        .await
        .ok()
}

pub(super) async fn scenario(run: &mut Run, a: PrekeysArgs) -> anyhow::Result<Value> {
    let params = json!({
        "targets": a.targets, "keys": a.keys, "fetchers": a.fetchers,
        "window": a.window, "duration_s": a.duration,
    });
    let vectors = load_vectors(&a.vectors)?;
    anyhow::ensure!(
        !vectors.is_empty(),
        "no valid vectors in {}",
        a.vectors.display()
    );
    let targets = run.seed("pk", a.targets.max(1)).await?;
    let fetchers = run.seed("pkf", a.fetchers.max(1)).await?;
    let url = run.relay.url.clone();

    run.phase("upload");
    let start = Instant::now();
    let uploads: Vec<anyhow::Result<()>> = futures::stream::iter(targets.iter().enumerate())
        .map(|(i, account)| upload(&url, account, vectors[i % vectors.len()].clone(), a.keys))
        .buffer_unordered(16)
        .collect()
        .await;
    let mut uploaded = 0;
    for result in uploads {
        match result {
            Ok(()) => uploaded += 1,
            Err(e) => run.metrics.error(format!("{e:#}")),
        }
    }
    run.summary("targets_uploaded", uploaded);
    run.summary(
        "upload_seconds",
        (start.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
    );
    let upload_snap = run.metrics.take();
    if upload_snap.error_total() > 0 {
        run.rows.push(Row::new(
            "upload",
            "relay",
            Kind::Op,
            &upload_snap,
            Default::default(),
        ));
    }
    let target_ids: Vec<Uuid> = targets.iter().map(|t| t.user_id).collect();
    let keys_before = count_one_time_keys(&run.relay.db, &target_ids).await;

    run.phase("fetch");
    let mut clients = Vec::new();
    for account in &fetchers {
        let (client, events) = live::connect_relay(&url, account).await?;
        drop(events);
        clients.push(client);
    }
    let window = ProcWindow::start(run.relay.pid);
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs_f64(a.duration);
    let next = Arc::new(AtomicUsize::new(0));
    let work = clients.iter().map(|client| {
        let (next, metrics, targets) = (next.clone(), run.metrics.clone(), &target_ids);
        async move {
            let mut inflight = FuturesUnordered::new();
            loop {
                while inflight.len() < a.window.max(1) && tokio::time::Instant::now() < deadline {
                    let target = targets[next.fetch_add(1, Ordering::Relaxed) % targets.len()];
                    let client = client.clone();
                    inflight.push(async move {
                        let t = Instant::now();
                        (t, client.fetch_bundle(target).await)
                    });
                }
                let Some((t, result)) = inflight.next().await else {
                    break;
                };
                match result {
                    Ok(bundle) => {
                        metrics.record(Kind::Op, t.elapsed());
                        record_bundle(&metrics, &bundle);
                    }
                    Err(e) => metrics.error(format!("fetch: {e}")),
                }
            }
        }
    });
    futures::future::join_all(work).await;
    let seconds = start.elapsed().as_secs_f64();
    let snap = run.metrics.take();
    let usage = window.finish();
    for client in &clients {
        client.close().await;
    }
    let fetched = snap.count(Kind::Op);
    let consumed = snap.counts.get("one_time_key").copied().unwrap_or(0);
    run.rows.push(
        Row::new("fetch bundles", "relay", Kind::Op, &snap, usage).with_rate(fetched, seconds),
    );
    run.summary("fetches_per_s", (fetched as f64 / seconds).round());
    run.summary(
        "one_time_keys_consumed_per_s",
        (consumed as f64 / seconds).round(),
    );
    if let (Some(before), Some(after)) = (
        keys_before,
        count_one_time_keys(&run.relay.db, &target_ids).await,
    ) {
        run.summary("one_time_keys_deleted_in_db", before - after);
    }
    Ok(params)
}

fn record_bundle(metrics: &crate::metrics::Metrics, bundle: &proto::PreKeyBundle) {
    if bundle.one_time_pre_key.is_some() {
        metrics.count("one_time_key", 1);
    } else {
        metrics.count("no_one_time_key_left", 1);
    }
    if bundle.kyber_is_last_resort {
        metrics.count("kyber_last_resort", 1);
    } else {
        metrics.count("kyber_one_time", 1);
    }
}
