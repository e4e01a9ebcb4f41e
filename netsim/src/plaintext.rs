//! What `netsim demo --encrypt` checks: known plaintext planted in the published tree must not
//! appear anywhere a stager, a peer or the WAN could see it, and what an edge unpacks must be
//! the tree, byte for byte.
//!
//! - [`plant_markers`] writes secret-looking files holding unique markers (and one marker as a
//!   file name, which only the encrypted manifest carries).
//! - [`search`] looks for the markers in every file under some directories, streaming, so
//!   gigabytes of stores cost one read.
//! - [`tree_differences`] compares an unpacked tree with its source, entry by entry.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use memchr::memmem::Finder;

/// Where [`plant_markers`] writes, under the tree.
const SECRETS_DIR: &str = "etc/stagecoach-demo-secrets";

/// Plants three markers unique to `seed` under `tree`: in a configuration file, in a private
/// key and as a file name. Returns the markers.
pub fn plant_markers(tree: &Path, seed: u64) -> Result<Vec<String>> {
    let tag = blake3::hash(&seed.to_le_bytes()).to_hex();
    let markers: Vec<String> = ["root-password", "ssh-host-key", "file-name"]
        .iter()
        .map(|what| format!("PLANTED-{what}-{}", &tag[..24]))
        .collect();
    let dir = tree.join(SECRETS_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    write(
        "shadow.conf",
        format!(
            "{}root_password = \"{}\"\n",
            "# demo configuration line\n".repeat(40),
            markers[0]
        ),
    )?;
    write(
        "ssh_host_ed25519_key",
        format!(
            "-----BEGIN OPENSSH PRIVATE KEY-----\n{}\n-----END OPENSSH PRIVATE KEY-----\n",
            markers[1]
        ),
    )?;
    write(
        &markers[2],
        "the name of this file is a secret too\n".to_owned(),
    )?;
    Ok(markers)
}

/// What [`search`] read and found.
#[derive(Clone, Debug, Default)]
pub struct Search {
    /// Files read.
    pub files: u64,
    /// Bytes read.
    pub bytes: u64,
    /// `marker in path` for every file (or file name) holding a marker.
    pub found: Vec<String>,
}

/// Reads every regular file under each of `roots` (missing roots count as empty) and reports
/// each one that holds any of `markers` in its bytes or its name.
pub fn search(roots: &[PathBuf], markers: &[String]) -> Result<Search> {
    let finders: Vec<Finder<'_>> = markers.iter().map(|m| Finder::new(m.as_bytes())).collect();
    let overlap = markers
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(1)
        .saturating_sub(1);
    let mut result = Search::default();
    let mut files = Vec::new();
    for root in roots {
        files_under(root, &mut files)?;
    }
    let mut buf = vec![0u8; 8 * 1024 * 1024];
    for path in files {
        let name = path.to_string_lossy();
        for marker in markers {
            if name.contains(marker.as_str()) {
                result
                    .found
                    .push(format!("{marker} in the name {}", path.display()));
            }
        }
        let mut file = match File::open(&path) {
            Ok(file) => file,
            // Daemons remove temporary files as they go.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => {
                return Err(error).with_context(|| format!("cannot read {}", path.display()))
            }
        };
        result.files += 1;
        // `kept` bytes at the front of `buf` are the tail of the previous block, so a marker
        // across two blocks is found.
        let mut kept = 0;
        let mut hits = vec![false; markers.len()];
        loop {
            let n = file
                .read(&mut buf[kept..])
                .with_context(|| format!("cannot read {}", path.display()))?;
            if n == 0 {
                break;
            }
            result.bytes += n as u64;
            let filled = kept + n;
            for (hit, finder) in hits.iter_mut().zip(&finders) {
                *hit |= finder.find(&buf[..filled]).is_some();
            }
            kept = overlap.min(filled);
            buf.copy_within(filled - kept..filled, 0);
        }
        for (hit, marker) in hits.iter().zip(markers) {
            if *hit {
                result.found.push(format!("{marker} in {}", path.display()));
            }
        }
    }
    Ok(result)
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error).with_context(|| format!("cannot list {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            files_under(&entry.path(), out)?;
        } else if kind.is_file() {
            out.push(entry.path());
        }
    }
    Ok(())
}

/// How `unpacked` differs from `source`: one line per entry that is missing, extra, of
/// another type, with other bytes, another symlink target or other permission bits. Empty
/// when they are the same tree.
pub fn tree_differences(source: &Path, unpacked: &Path) -> Result<Vec<String>> {
    let mut differences = Vec::new();
    compare_dirs(source, unpacked, Path::new(""), &mut differences)?;
    Ok(differences)
}

fn sorted_names(dir: &Path) -> Result<Vec<std::ffi::OsString>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        names.push(
            entry
                .with_context(|| format!("cannot list {}", dir.display()))?
                .file_name(),
        );
    }
    names.sort();
    Ok(names)
}

fn compare_dirs(a: &Path, b: &Path, rel: &Path, out: &mut Vec<String>) -> Result<()> {
    let (names_a, names_b) = (sorted_names(a)?, sorted_names(b)?);
    for name in names_b.iter().filter(|n| !names_a.contains(n)) {
        out.push(format!("{}: not in the source", rel.join(name).display()));
    }
    for name in &names_a {
        let entry = rel.join(name);
        if !names_b.contains(name) {
            out.push(format!("{}: missing", entry.display()));
            continue;
        }
        let (pa, pb) = (a.join(name), b.join(name));
        let (ma, mb) = (
            std::fs::symlink_metadata(&pa)
                .with_context(|| format!("cannot stat {}", pa.display()))?,
            std::fs::symlink_metadata(&pb)
                .with_context(|| format!("cannot stat {}", pb.display()))?,
        );
        let (ta, tb) = (ma.file_type(), mb.file_type());
        if ta.is_dir() != tb.is_dir()
            || ta.is_symlink() != tb.is_symlink()
            || ta.is_file() != tb.is_file()
        {
            out.push(format!("{}: another type of entry", entry.display()));
            continue;
        }
        if ma.permissions().mode() != mb.permissions().mode() {
            out.push(format!(
                "{}: mode {:o}, source {:o}",
                entry.display(),
                mb.permissions().mode(),
                ma.permissions().mode()
            ));
        }
        if ta.is_dir() {
            compare_dirs(&pa, &pb, &entry, out)?;
        } else if ta.is_symlink() {
            if std::fs::read_link(&pa)? != std::fs::read_link(&pb)? {
                out.push(format!("{}: another symlink target", entry.display()));
            }
        } else if ta.is_file() && !same_bytes(&pa, &pb)? {
            out.push(format!("{}: other bytes", entry.display()));
        }
    }
    Ok(())
}

fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    let hash = |path: &Path| -> Result<(u64, blake3::Hash)> {
        let mut hasher = blake3::Hasher::new();
        let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let len = std::io::copy(&mut std::io::BufReader::new(file), &mut hasher)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok((len, hasher.finalize()))
    };
    Ok(hash(a)? == hash(b)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_found_in_bytes_across_blocks_and_in_names_and_nowhere_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("tree");
        let markers = plant_markers(&tree, 7).expect("plant");
        assert_eq!(markers.len(), 3);
        assert_ne!(
            markers,
            plant_markers(&dir.path().join("other"), 8).expect("plant")
        );
        let found = search(std::slice::from_ref(&tree), &markers).expect("search");
        assert_eq!(found.files, 3);
        // The first two in file bytes, the third as a file name.
        assert_eq!(found.found.len(), 3, "{:?}", found.found);

        // A marker straddling the 8 MiB read boundary.
        let clean = dir.path().join("clean");
        std::fs::create_dir_all(&clean).expect("mkdir");
        let mut big = vec![b'x'; 8 * 1024 * 1024 - 5];
        std::fs::write(clean.join("none"), &big).expect("write");
        assert!(
            search(&[clean.clone(), dir.path().join("absent")], &markers)
                .expect("search")
                .found
                .is_empty()
        );
        big.extend_from_slice(markers[1].as_bytes());
        std::fs::write(clean.join("straddles"), &big).expect("write");
        let found = search(&[clean], &markers).expect("search");
        assert_eq!(found.found.len(), 1, "{:?}", found.found);
        assert!(found.found[0].contains("straddles"));
    }

    #[test]
    fn a_copy_is_the_same_tree_and_every_change_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        plant_markers(&a, 1).expect("plant");
        std::os::unix::fs::symlink("shadow.conf", a.join(SECRETS_DIR).join("link"))
            .expect("symlink");
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(&a)
            .arg(&b)
            .status()
            .expect("cp");
        assert!(copied.success());
        assert!(tree_differences(&a, &b).expect("compare").is_empty());

        let secrets = b.join(SECRETS_DIR);
        std::fs::write(secrets.join("shadow.conf"), "changed").expect("write");
        std::fs::set_permissions(
            secrets.join("ssh_host_ed25519_key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        std::fs::write(secrets.join("extra"), "x").expect("write");
        let differences = tree_differences(&a, &b).expect("compare");
        assert_eq!(differences.len(), 3, "{differences:?}");
        assert!(differences
            .iter()
            .any(|d| d.contains("shadow.conf: other bytes")));
        assert!(differences
            .iter()
            .any(|d| d.contains("ssh_host_ed25519_key: mode")));
        assert!(differences
            .iter()
            .any(|d| d.contains("extra: not in the source")));
    }
}
