//! Publishing a bundle to a running origin with publisher rights: pack a tree or image in a
//! blocking task, upload its chunks (`PutBlob`), then `Publish` the signed manifest.
//!
//! Used by `origin publish` (with the origin home's publisher identity) and by an edge that
//! captures an image (with a publisher identity it was given explicitly, [`Publisher::load`]).
//! The origin refuses both uploads and publishing from any certificate but a publisher's.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use tokio::sync::mpsc;

use crate::hash::BlobHash;
use crate::keyring::{self, KeyringError};
use crate::keys::{ContentKey, KeyGeneration};
use crate::net::{call, client_endpoint, connect, NetError, NodeIdentity, Role};
use crate::pack::{pack_path, ChunkSink, PackError, PackOptions, PackProgress, PackedBundle};
use crate::wire::{BundleInfo, ErrorCode, Request, Response, MAX_FRAME_BYTES};

/// Chunks packed ahead of the upload: bounds memory to a few chunk sizes.
pub const UPLOAD_QUEUE_CHUNKS: usize = 8;

/// Uploads in flight at once.
pub const UPLOAD_CONCURRENCY: usize = 4;

/// The file of a publisher directory that holds the manifest-signing key (64 hex digits).
pub const SIGNING_KEY_FILE: &str = "manifest-signing.key";

/// Why publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The publisher directory is missing or malformed.
    #[error("publisher identity in {dir}: {why}")]
    Identity {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The origin cannot be reached.
    #[error("cannot reach the origin at {addr}: {source}")]
    Connect {
        /// Its address.
        addr: SocketAddr,
        /// Why.
        source: NetError,
    },
    /// Packing failed.
    #[error("packing failed: {0}")]
    Pack(#[from] PackError),
    /// A request failed on the network.
    #[error("{what} failed: {source}")]
    Net {
        /// Which request.
        what: &'static str,
        /// Why.
        source: NetError,
    },
    /// The origin refused (for example: this certificate has no publisher rights).
    #[error("the origin refused {what}: {code:?}: {message}")]
    Refused {
        /// What was refused.
        what: String,
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The origin answered something else.
    #[error("unexpected answer to {what}: {answer}")]
    Unexpected {
        /// The request.
        what: &'static str,
        /// The answer, debug-printed.
        answer: String,
    },
    /// An encrypted publish was asked for, but the origin holds no content key.
    #[error("cannot publish encrypted: the key ring {path} holds no content key; run `origin keys rotate` first")]
    NoContentKey {
        /// The key ring file.
        path: PathBuf,
    },
    /// The origin's key ring cannot be read.
    #[error("cannot publish encrypted: {0}")]
    Keyring(#[from] KeyringError),
    /// A task of the upload died.
    #[error("the {0} task failed")]
    Task(&'static str),
}

/// A publisher's client identity and manifest-signing key.
pub struct Publisher {
    /// The client certificate (role publisher).
    pub identity: NodeIdentity,
    /// The manifest-signing key.
    pub key: SigningKey,
}

impl Publisher {
    /// Loads a publisher directory: the identity files and [`SIGNING_KEY_FILE`] (the layout of
    /// `ORIGIN_HOME/publisher`, which an operator copies to a node allowed to publish). Refuses
    /// an identity whose role is not publisher, and a key that does not match the identity's
    /// trusted publisher key.
    pub fn load(dir: &Path) -> Result<Self, PublishError> {
        let bad = |why: String| PublishError::Identity {
            dir: dir.to_path_buf(),
            why,
        };
        let identity = NodeIdentity::load(dir).map_err(|e| bad(e.to_string()))?;
        if identity.role() != Role::Publisher {
            return Err(bad(format!(
                "the certificate's role is {}, not publisher: publishing needs publisher rights",
                identity.role()
            )));
        }
        let path = dir.join(SIGNING_KEY_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            bad(format!(
                "cannot read the signing key {}: {e}",
                path.display()
            ))
        })?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes)
            .map_err(|_| bad(format!("{} is not a hex ed25519 key", path.display())))?;
        let key = SigningKey::from_bytes(&bytes);
        if key.verifying_key() != *identity.publisher_key() {
            return Err(bad(
                "the signing key is not the mesh's publisher key; nodes would not trust it".into(),
            ));
        }
        Ok(Self { identity, key })
    }
}

/// The newest content-key generation of the key ring at `path` (the origin's
/// `content-keys.bin`): the one an encrypted publish seals with. An empty or missing ring is
/// [`PublishError::NoContentKey`].
pub fn newest_content_key(path: &Path) -> Result<(KeyGeneration, ContentKey), PublishError> {
    let ring = keyring::load(path)?;
    ring.newest()
        .map(|(generation, key)| (generation, key.clone()))
        .ok_or_else(|| PublishError::NoContentKey {
            path: path.to_path_buf(),
        })
}

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

/// Packs `path` with `options`, signs it with `key`, uploads its chunks to the origin at
/// `addr` with `identity` (a publisher's certificate) and publishes it; returns the catalog
/// entry. `progress` sees the packing; `publishing` is called once the chunks are uploaded.
pub async fn publish_path(
    identity: &NodeIdentity,
    key: &SigningKey,
    addr: SocketAddr,
    path: &Path,
    options: PackOptions,
    mut progress: impl FnMut(PackProgress) + Send + 'static,
    publishing: impl FnOnce(),
) -> Result<BundleInfo, PublishError> {
    let endpoint =
        client_endpoint(identity).map_err(|source| PublishError::Connect { addr, source })?;
    let conn = connect(&endpoint, addr)
        .await
        .map_err(|source| PublishError::Connect { addr, source })?;

    let (tx, mut rx) = mpsc::channel::<(BlobHash, Vec<u8>)>(UPLOAD_QUEUE_CHUNKS);
    let path = path.to_owned();
    let key = key.clone();
    let packer = tokio::task::spawn_blocking(move || -> Result<PackedBundle, PackError> {
        let mut sink = ChannelSink(tx);
        pack_path(&path, &options, &key, &mut sink, &mut progress)
    });

    let uploader = {
        let conn = conn.clone();
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(UPLOAD_CONCURRENCY));
            let mut tasks = tokio::task::JoinSet::new();
            let mut seen = HashSet::new();
            while let Some((hash, data)) = rx.recv().await {
                if !seen.insert(hash) {
                    continue;
                }
                let permit = slots
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| PublishError::Task("upload"))?;
                let conn = conn.clone();
                tasks.spawn(async move {
                    let _permit = permit;
                    let answer = call(&conn, &Request::PutBlob { hash, data }, MAX_FRAME_BYTES)
                        .await
                        .map_err(|source| PublishError::Net {
                            what: "an upload",
                            source,
                        })?;
                    match answer {
                        Response::Ok => Ok(()),
                        Response::Error { code, message } => Err(PublishError::Refused {
                            what: format!("chunk {hash}"),
                            code,
                            message,
                        }),
                        other => Err(PublishError::Unexpected {
                            what: "an upload",
                            answer: format!("{other:?}"),
                        }),
                    }
                });
                while let Some(done) = tasks.try_join_next() {
                    done.map_err(|_| PublishError::Task("upload"))??;
                }
            }
            while let Some(done) = tasks.join_next().await {
                done.map_err(|_| PublishError::Task("upload"))??;
            }
            Ok::<(), PublishError>(())
        })
    };

    let packed = packer.await.map_err(|_| PublishError::Task("packing"));
    let uploaded = uploader.await.map_err(|_| PublishError::Task("upload"));
    let packed = match (packed, uploaded) {
        (Ok(Ok(packed)), Ok(Ok(()))) => packed,
        // An upload error explains a packer stopped by the closed channel: report it first.
        (_, Err(error)) | (_, Ok(Err(error))) => return Err(error),
        (Err(error), Ok(Ok(()))) => return Err(error),
        (Ok(Err(error)), Ok(Ok(()))) => return Err(PublishError::Pack(error)),
    };
    publishing();
    let answer = call(
        &conn,
        &Request::Publish {
            manifest: packed.signed.clone(),
        },
        MAX_FRAME_BYTES,
    )
    .await
    .map_err(|source| PublishError::Net {
        what: "the publish request",
        source,
    })?;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    match answer {
        Response::Resolved(info) => Ok(info),
        Response::Error { code, message } => Err(PublishError::Refused {
            what: "the bundle".into(),
            code,
            message,
        }),
        other => Err(PublishError::Unexpected {
            what: "publish",
            answer: format!("{other:?}"),
        }),
    }
}
