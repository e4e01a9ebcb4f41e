//! The stager: one per site (or a few). It subscribes to the origin, pulls every announced
//! bundle across the WAN once (only the chunks the site lacks), and serves the site's edges,
//! even while a chunk is still arriving (cut-through).

pub mod node;
pub mod upstream;
