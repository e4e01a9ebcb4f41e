//! Debian root trees built with mmdebstrap, once, and cached under
//! `$HOME/.cache/stagecoach/rootfs/<blake3 of their inputs>/`: what the exact-unpack test and the
//! patch-release bench pack.

use std::fs;
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Overrides the Debian mirror (default: [`DEFAULT_MIRROR`]).
pub const MIRROR_VAR: &str = "STAGECOACH_DEBIAN_MIRROR";

/// The mirror used unless [`MIRROR_VAR`] names another.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// How long [`mirror_reachable`] waits for the mirror to accept a connection.
pub const MIRROR_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The mirror to build from: [`MIRROR_VAR`], else [`DEFAULT_MIRROR`].
pub fn mirror() -> String {
    std::env::var(MIRROR_VAR).unwrap_or_else(|_| DEFAULT_MIRROR.to_owned())
}

/// What a tree is built from; every field is part of its cache key.
#[derive(Clone, Debug)]
pub struct TreeSpec<'a> {
    /// The Debian suite (`bookworm`).
    pub suite: &'a str,
    /// mmdebstrap's variant (`minbase`).
    pub variant: &'a str,
    /// Packages added to the variant's.
    pub packages: &'a [&'a str],
    /// The mirror.
    pub mirror: &'a str,
}

impl TreeSpec<'_> {
    /// Where the tree for these inputs and this mmdebstrap (`version`, its first line of
    /// `--version`) is cached.
    fn path(&self, version: &str) -> io::Result<PathBuf> {
        let key = blake3::hash(
            format!(
                "suite={}\nvariant={}\npackages={}\nmirror={}\nmmdebstrap={version}\n",
                self.suite,
                self.variant,
                self.packages.join(","),
                self.mirror
            )
            .as_bytes(),
        )
        .to_hex();
        Ok(cache_dir()?.join(key.as_str()))
    }

    /// The cached tree, if it was built.
    pub fn cached(&self) -> io::Result<Option<PathBuf>> {
        let tree = self.path(&mmdebstrap_version()?)?;
        Ok(tree.is_dir().then_some(tree))
    }

    /// The cached tree, built first if missing (which needs root and the mirror). Built beside
    /// its final place and renamed, so a tree in the cache is always complete.
    pub fn build(&self) -> io::Result<PathBuf> {
        let tree = self.path(&mmdebstrap_version()?)?;
        if tree.is_dir() {
            return Ok(tree);
        }
        let cache = cache_dir()?;
        fs::create_dir_all(&cache)?;
        let name = tree
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("tree")
            .to_owned();
        let building = cache.join(format!(".building-{name}-{}", std::process::id()));
        if building.exists() {
            fs::remove_dir_all(&building)?;
        }
        eprintln!(
            "building Debian {} {} +[{}] into {} with mmdebstrap (about a minute)",
            self.suite,
            self.variant,
            self.packages.join(","),
            building.display()
        );
        let mut command = Command::new("mmdebstrap");
        command
            .arg("--quiet")
            .arg(format!("--variant={}", self.variant))
            .stdin(Stdio::null());
        if !self.packages.is_empty() {
            command.arg(format!("--include={}", self.packages.join(",")));
        }
        let output = command
            .arg(self.suite)
            .arg(&building)
            .arg(self.mirror)
            .output()?;
        if !output.status.success() {
            let _ = fs::remove_dir_all(&building);
            return Err(io::Error::other(format!(
                "mmdebstrap failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        // The cache is root's; the trees inside keep their own modes.
        fs::set_permissions(&cache, fs::Permissions::from_mode(0o700))?;
        match fs::rename(&building, &tree) {
            Ok(()) => Ok(tree),
            // Another run finished first: use its tree.
            Err(_) if tree.is_dir() => {
                fs::remove_dir_all(&building)?;
                Ok(tree)
            }
            Err(e) => Err(e),
        }
    }
}

fn cache_dir() -> io::Result<PathBuf> {
    let home = std::env::var_os("HOME").ok_or_else(|| io::Error::other("HOME is not set"))?;
    Ok(Path::new(&home).join(".cache/stagecoach/rootfs"))
}

/// The first line of `mmdebstrap --version`; an error when it is not installed.
pub fn mmdebstrap_version() -> io::Result<String> {
    let output = Command::new("mmdebstrap").arg("--version").output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "mmdebstrap --version failed ({})",
            output.status
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_owned())
}

/// Whether a TCP connection to the host of the `http://` or `https://` URL `mirror` opens
/// within [`MIRROR_CONNECT_TIMEOUT`]; `Err` says why not.
pub fn mirror_reachable(mirror: &str) -> Result<(), String> {
    let (rest, default_port) = if let Some(rest) = mirror.strip_prefix("http://") {
        (rest, 80)
    } else if let Some(rest) = mirror.strip_prefix("https://") {
        (rest, 443)
    } else {
        return Err(format!("{mirror} is not an http(s) URL"));
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|_| format!("{mirror}: bad port {port:?}"))?,
        ),
        None => (authority, default_port),
    };
    let addresses = (host, port)
        .to_socket_addrs()
        .map_err(|error| format!("cannot resolve {host}: {error}"))?;
    let mut last = format!("{host} has no address");
    for address in addresses {
        match TcpStream::connect_timeout(&address, MIRROR_CONNECT_TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(error) => last = format!("cannot connect to {address}: {error}"),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mirror_is_reachable_when_its_host_and_port_accept_a_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("address").port();
        assert_eq!(
            mirror_reachable(&format!("http://127.0.0.1:{port}/debian")),
            Ok(())
        );
        drop(listener);
        let refused = mirror_reachable(&format!("http://127.0.0.1:{port}/debian"));
        assert!(refused.is_err_and(|e| e.contains("cannot connect to 127.0.0.1")));
        let ftp = mirror_reachable("ftp://deb.debian.org/debian");
        assert!(ftp.is_err_and(|e| e.contains("is not an http(s) URL")));
        let port = mirror_reachable("http://127.0.0.1:eighty/debian");
        assert!(port.is_err_and(|e| e.contains("bad port")));
    }
}
