//! Bounded deserializers for variable-length fields of untrusted messages: the decoder refuses
//! a field longer than its bound (the frame bound alone would let one field take 16 MiB).
//!
//! A leaf: it knows serde and its own limits, nothing of the messages that use it, so both
//! [`crate::wire`] and [`crate::inventory`] depend on it and not on each other. Use it as
//! `#[serde(deserialize_with = "bounds::name")]` on every text or list field that crosses a
//! process boundary.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};

/// Most bundles a node reports installed (or held), and most bundles one plan lists.
pub const MAX_NODE_BUNDLES: usize = 256;

/// Longest name, version, node id, address or fact, in bytes.
pub const MAX_NAME_BYTES: usize = 1024;

/// Longest free-text field (an error message, a list of facts), in bytes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Longest document in a control command or its answer (a policy file, a table), in bytes.
pub const MAX_DOCUMENT_BYTES: usize = 4 * 1024 * 1024;

/// Most facts a "no image" answer lists.
pub const MAX_FACTS: usize = 64;

fn text<'de, D: Deserializer<'de>>(d: D, max: usize) -> Result<String, D::Error> {
    let value = String::deserialize(d)?;
    if value.len() > max {
        return Err(D::Error::custom(format!(
            "a text field of {} bytes exceeds its bound of {max} bytes",
            value.len()
        )));
    }
    Ok(value)
}

struct Bounded<T> {
    max: usize,
    item: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Bounded<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list of at most {} items", self.max)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        if seq.size_hint().is_some_and(|n| n > self.max) {
            return Err(A::Error::custom(format!(
                "a list of {} items exceeds its bound of {}",
                seq.size_hint().unwrap_or_default(),
                self.max
            )));
        }
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            if items.len() == self.max {
                return Err(A::Error::custom(format!(
                    "a list exceeds its bound of {} items",
                    self.max
                )));
            }
            items.push(item);
        }
        Ok(items)
    }
}

/// A list of at most `max` items.
pub fn list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
    max: usize,
) -> Result<Vec<T>, D::Error> {
    d.deserialize_seq(Bounded {
        max,
        item: PhantomData,
    })
}

/// At most [`MAX_NAME_BYTES`].
pub fn name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    text(d, MAX_NAME_BYTES)
}

/// `None` or at most [`MAX_NAME_BYTES`].
pub fn optional_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = Option::<String>::deserialize(d)?;
    match value {
        Some(v) if v.len() > MAX_NAME_BYTES => Err(D::Error::custom(format!(
            "a text field of {} bytes exceeds its bound of {MAX_NAME_BYTES} bytes",
            v.len()
        ))),
        other => Ok(other),
    }
}

/// At most [`MAX_MESSAGE_BYTES`].
pub fn message<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    text(d, MAX_MESSAGE_BYTES)
}

/// At most [`MAX_DOCUMENT_BYTES`].
pub fn document<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    text(d, MAX_DOCUMENT_BYTES)
}

/// Names of at most [`MAX_NAME_BYTES`] each, at most `max` of them.
pub fn names<'de, D: Deserializer<'de>>(d: D, max: usize) -> Result<Vec<String>, D::Error> {
    let values: Vec<String> = list(d, max)?;
    if let Some(long) = values.iter().find(|v| v.len() > MAX_NAME_BYTES) {
        return Err(D::Error::custom(format!(
            "a text field of {} bytes exceeds its bound of {MAX_NAME_BYTES} bytes",
            long.len()
        )));
    }
    Ok(values)
}

/// At most [`MAX_FACTS`] facts.
pub fn facts<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    names(d, MAX_FACTS)
}

/// Most stagers an enrollment answer names ([`crate::wire::Response::SiteStagers`]).
pub const MAX_SITE_STAGERS: usize = 64;

/// At most [`MAX_SITE_STAGERS`] addresses.
pub fn site_stagers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    names(d, MAX_SITE_STAGERS)
}

/// A list of bundles (installed, held or planned) of at most [`MAX_NODE_BUNDLES`].
pub fn node_bundles<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    list(d, MAX_NODE_BUNDLES)
}

/// At most [`MAX_NODE_BUNDLES`] planned bundles.
pub fn planned_bundles<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    list(d, MAX_NODE_BUNDLES)
}

/// At most [`MAX_NODE_BUNDLES`] fetch summaries.
pub fn fetch_summaries<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    list(d, MAX_NODE_BUNDLES)
}
