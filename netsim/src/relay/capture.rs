//! A capture of what a relay carried: every datagram it forwarded, in both directions, as a
//! pcap file (link type `USER0`: each record is one UDP payload, without IP or UDP headers).
//! `netsim demo --encrypt` searches it for plaintext; pcap readers open it.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use super::lock;

/// pcap's magic number, microsecond timestamps, written in the machine's byte order.
const PCAP_MAGIC: u32 = 0xa1b2_c3d4;
/// `LINKTYPE_USER0`: records carry what the writer chose, here one UDP payload each.
const LINKTYPE_USER0: u32 = 147;
/// Largest record: a UDP payload never exceeds it.
const SNAPLEN: u32 = 65_535;

/// An open capture file; records are buffered until [`Capture::flush`] or drop.
#[derive(Debug)]
pub(super) struct Capture {
    path: PathBuf,
    file: Mutex<BufWriter<File>>,
    /// Set after the first write error: the capture stops, the relay goes on.
    failed: AtomicBool,
}

impl Capture {
    /// Creates `path` (replacing it) and writes the pcap header.
    pub(super) fn create(path: &Path) -> io::Result<Self> {
        let mut file = BufWriter::with_capacity(1024 * 1024, File::create(path)?);
        let mut header = Vec::with_capacity(24);
        header.extend_from_slice(&PCAP_MAGIC.to_ne_bytes());
        header.extend_from_slice(&2u16.to_ne_bytes());
        header.extend_from_slice(&4u16.to_ne_bytes());
        header.extend_from_slice(&0i32.to_ne_bytes()); // GMT offset
        header.extend_from_slice(&0u32.to_ne_bytes()); // timestamp accuracy
        header.extend_from_slice(&SNAPLEN.to_ne_bytes());
        header.extend_from_slice(&LINKTYPE_USER0.to_ne_bytes());
        file.write_all(&header)?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            failed: AtomicBool::new(false),
        })
    }

    /// Appends one forwarded datagram.
    pub(super) fn record(&self, payload: &[u8]) {
        if self.failed.load(Relaxed) {
            return;
        }
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let len = u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .min(SNAPLEN);
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&(since_epoch.as_secs() as u32).to_ne_bytes());
        header[4..8].copy_from_slice(&since_epoch.subsec_micros().to_ne_bytes());
        header[8..12].copy_from_slice(&len.to_ne_bytes());
        header[12..16].copy_from_slice(&len.to_ne_bytes());
        let mut file = lock(&self.file);
        let written = file
            .write_all(&header)
            .and_then(|()| file.write_all(&payload[..len as usize]));
        if let Err(error) = written {
            self.fail(&error);
        }
    }

    /// Writes out what is buffered.
    pub(super) fn flush(&self) {
        if self.failed.load(Relaxed) {
            return;
        }
        if let Err(error) = lock(&self.file).flush() {
            self.fail(&error);
        }
    }

    fn fail(&self, error: &io::Error) {
        if !self.failed.swap(true, Relaxed) {
            tracing::error!(path = %self.path.display(), %error, "relay capture stopped: cannot write");
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.flush();
    }
}
