//! `origin publish`: pack a tree or image, upload its chunks to the running origin, publish.
//! The work is [`proto::publish::publish_path`], shared with edges that capture an image.

use std::path::Path;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use proto::pack::PackOptions;
use proto::wire::BundleInfo;

use crate::home::OriginHome;

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
    let pack_bar = bar.clone();
    let publish_bar = bar.clone();
    let info = proto::publish::publish_path(
        &identity,
        &key,
        addr,
        path,
        options,
        move |p| {
            pack_bar.set_length(p.total_bytes);
            pack_bar.set_position(p.bytes_read);
        },
        move || publish_bar.set_message("publishing"),
    )
    .await;
    bar.finish_and_clear();
    Ok(info?)
}
