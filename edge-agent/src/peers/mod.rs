//! Peer caching inside a site: downloads from many sources at once ([`download`]), and the
//! site's control plane that tells who is here and who holds what ([`discovery`]).

pub mod download;
