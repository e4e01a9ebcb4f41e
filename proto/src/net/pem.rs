//! PEM text for DER blobs, and atomic file writes for identity material.

use std::path::Path;

use data_encoding::BASE64;

use super::NetError;

/// Characters of base64 per PEM line (RFC 7468).
const PEM_LINE_CHARS: usize = 64;

/// File mode of private keys: owner read/write only.
pub(crate) const SECRET_FILE_MODE: u32 = crate::durable::MODE_PRIVATE;

/// File mode of certificates and other public material.
pub(crate) const PUBLIC_FILE_MODE: u32 = crate::durable::MODE_READABLE;

/// Encodes `der` as a PEM block labelled `label` (e.g. `CERTIFICATE`).
pub(crate) fn encode(label: &str, der: &[u8]) -> String {
    let body = BASE64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(PEM_LINE_CHARS) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes identity material to `path` with [`crate::durable::write_atomic`]: a crash leaves
/// either the old file or the new one, and the new one is on disk when this returns.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), NetError> {
    crate::durable::write_atomic(path, bytes, mode).map_err(NetError::from)
}
