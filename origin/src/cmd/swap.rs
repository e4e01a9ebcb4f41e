//! `origin swap`: edges swap their OS remotely; one line per edge.

use std::net::SocketAddr;

use anyhow::Result;
use origin::home::OriginHome;

/// Asks each of `edges` to swap to `target`, keeping `rescue`; fails unless every edge ended
/// on the new OS.
pub async fn swap(
    home: &OriginHome,
    target: &str,
    rescue: &str,
    edges: &[SocketAddr],
    progress: bool,
) -> Result<()> {
    let target = origin::remote::resolve_bundle(home, target).await?;
    let rescue = origin::remote::resolve_bundle(home, rescue).await?;
    let identity = home.origin_identity()?;
    let results = origin::remote::swap_edges(&identity, edges, target, rescue, progress).await?;
    let mut failed = 0;
    for r in &results {
        match &r.result {
            Ok((outcome, None)) => println!("{}  {outcome}", r.edge),
            Ok((outcome, Some(why))) => println!("{}  {outcome}: {why}", r.edge),
            Err(e) => println!("{}  error: {e}", r.edge),
        }
        if !r.succeeded() {
            failed += 1;
        }
    }
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} edges did not end on the new OS",
            results.len()
        );
    }
    Ok(())
}
