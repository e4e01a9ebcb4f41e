//! `origin publish`: pack a tree or image, upload its chunks to the running origin, publish.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use proto::net::{call, client_endpoint, connect, NetError};
use proto::pack::{pack_path, ChunkSink, PackOptions};
use proto::wire::{BundleInfo, Request, Response, MAX_FRAME_BYTES};
use proto::BlobHash;
use tokio::sync::mpsc;

use crate::home::OriginHome;

/// Chunks packed ahead of the upload: bounds memory to a few chunk sizes.
const UPLOAD_QUEUE_CHUNKS: usize = 8;

/// Uploads in flight at once.
const UPLOAD_CONCURRENCY: usize = 4;

struct ChannelSink(mpsc::Sender<(BlobHash, Vec<u8>)>);

#[derive(Debug, thiserror::Error)]
#[error("the upload stopped; see the error above")]
struct UploadStopped;

impl ChunkSink for ChannelSink {
    type Error = UploadStopped;

    fn put_chunk(&mut self, hash: BlobHash, stored: &[u8]) -> Result<(), UploadStopped> {
        self.0
            .blocking_send((hash, stored.to_vec()))
            .map_err(|_| UploadStopped)
    }
}

/// Packs `path` and publishes it on the origin at `home`; returns the catalog entry.
pub async fn publish(
    home: &OriginHome,
    path: &Path,
    options: PackOptions,
    show_progress: bool,
) -> Result<BundleInfo> {
    let identity = home.publisher_identity()?;
    let key = home.signing_key()?;
    let addr = home.mesh_addr()?;
    let endpoint = client_endpoint(&identity)?;
    let conn = connect(&endpoint, addr)
        .await
        .with_context(|| format!("cannot reach the origin at {addr}"))?;

    let bar = if show_progress {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message("packing");
        bar
    } else {
        ProgressBar::hidden()
    };

    let (tx, mut rx) = mpsc::channel::<(BlobHash, Vec<u8>)>(UPLOAD_QUEUE_CHUNKS);
    let path = path.to_owned();
    let pack_bar = bar.clone();
    let packer = tokio::task::spawn_blocking(move || {
        let mut sink = ChannelSink(tx);
        pack_path(&path, &options, &key, &mut sink, &mut |p| {
            pack_bar.set_length(p.total_bytes);
            pack_bar.set_position(p.bytes_read);
        })
    });

    let uploader = {
        let conn = conn.clone();
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(UPLOAD_CONCURRENCY));
            let mut tasks = tokio::task::JoinSet::new();
            let mut seen = std::collections::HashSet::new();
            while let Some((hash, data)) = rx.recv().await {
                if !seen.insert(hash) {
                    continue;
                }
                let permit = slots.clone().acquire_owned().await?;
                let conn = conn.clone();
                tasks.spawn(async move {
                    let _permit = permit;
                    let answer =
                        call(&conn, &Request::PutBlob { hash, data }, MAX_FRAME_BYTES).await?;
                    match answer {
                        Response::Ok => Ok(()),
                        Response::Error { code, message } => {
                            bail!("origin refused chunk {hash}: {code:?}: {message}")
                        }
                        other => bail!("unexpected answer to an upload: {other:?}"),
                    }
                });
                while let Some(done) = tasks.try_join_next() {
                    done??;
                }
            }
            while let Some(done) = tasks.join_next().await {
                done??;
            }
            anyhow::Ok(())
        })
    };

    let packed = packer.await.context("packing task failed")?;
    let upload_result = uploader.await.context("upload task failed")?;
    let packed = match (packed, upload_result) {
        (Ok(packed), Ok(())) => packed,
        (_, Err(error)) => return Err(error.context("upload failed")),
        (Err(error), Ok(())) => return Err(anyhow::Error::new(error).context("packing failed")),
    };
    bar.set_message("publishing");
    let answer = call(
        &conn,
        &Request::Publish {
            manifest: packed.signed.clone(),
        },
        MAX_FRAME_BYTES,
    )
    .await
    .map_err(|e: NetError| anyhow::Error::new(e).context("publish request failed"))?;
    bar.finish_and_clear();
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    match answer {
        Response::Resolved(info) => Ok(info),
        Response::Error { code, message } => {
            bail!("origin refused the bundle: {code:?}: {message}")
        }
        other => bail!("unexpected answer to publish: {other:?}"),
    }
}
