//! PEM text for DER blobs, and atomic file writes for identity material.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use data_encoding::BASE64;

/// Characters of base64 per PEM line (RFC 7468).
const PEM_LINE_CHARS: usize = 64;

/// File mode of private keys: owner read/write only.
pub(crate) const SECRET_FILE_MODE: u32 = 0o600;

/// File mode of certificates and other public material.
pub(crate) const PUBLIC_FILE_MODE: u32 = 0o644;

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

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one, never a
/// torn one: write a temporary sibling with `mode`, sync it, rename it over `path`, sync the
/// directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp_name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // `mode` applies only when the file is created; a stale temporary keeps its old mode.
        fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}
