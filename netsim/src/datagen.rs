//! Deterministic test trees: what the demo publishes and the tests mutate.

use std::path::Path;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Largest generated file, in bytes.
const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;

/// Smallest generated file, in bytes.
const MIN_FILE_BYTES: u64 = 1024;

/// Files per generated directory.
const FILES_PER_DIR: usize = 32;

/// Writes a tree of about `total_bytes` under `dir`, seeded by `seed`. Files have mixed sizes and
/// mixed content (random and text-like), like an OS image: about half of it compresses.
/// Returns the relative paths of the files written.
pub fn generate_tree(dir: &Path, total_bytes: u64, seed: u64) -> Result<Vec<String>> {
    write_tree(dir, total_bytes, seed, Content::Mixed)
}

/// Like [`generate_tree`], but every byte is random: nothing compresses and no chunk repeats, so
/// the bundle stores (and every copy of it moves) about `total_bytes`. The emulator uses it to
/// make a topology's `size_mib` the bytes on the wire, as the simulator assumes.
pub fn generate_incompressible_tree(
    dir: &Path,
    total_bytes: u64,
    seed: u64,
) -> Result<Vec<String>> {
    write_tree(dir, total_bytes, seed, Content::Random)
}

/// What generated files hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Content {
    /// Half the files random, half text-like.
    Mixed,
    /// Every file random.
    Random,
}

fn write_tree(dir: &Path, total_bytes: u64, seed: u64, content: Content) -> Result<Vec<String>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut written = 0u64;
    let mut files = Vec::new();
    while written < total_bytes {
        let index = files.len();
        let rel = format!("d{:03}/f{:05}.bin", index / FILES_PER_DIR, index);
        let path = dir.join(&rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        // Log-uniform sizes: many small files, a few large ones.
        let exp = rng.gen_range((MIN_FILE_BYTES as f64).ln()..(MAX_FILE_BYTES as f64).ln());
        let size = (exp.exp() as u64).min(total_bytes - written).max(1);
        let data = match content {
            Content::Mixed => file_content(&mut rng, size as usize),
            Content::Random => random_content(&mut rng, size as usize),
        };
        std::fs::write(&path, &data).with_context(|| format!("cannot write {}", path.display()))?;
        written += size;
        files.push(rel);
    }
    Ok(files)
}

/// Changes `fraction` of `files` under `dir` (a small edit in each) and adds `added` new files.
/// Returns the number of files changed.
pub fn mutate_tree(
    dir: &Path,
    files: &[String],
    fraction: f64,
    added: usize,
    seed: u64,
) -> Result<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    let count = ((files.len() as f64 * fraction).ceil() as usize).max(1);
    let mut changed = 0;
    for _ in 0..count {
        let rel = &files[rng.gen_range(0..files.len())];
        let path = dir.join(rel);
        let mut data =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let at = rng.gen_range(0..data.len().max(1));
        let patch = format!("patched by version 2, seed {seed}");
        for (i, byte) in patch.bytes().enumerate() {
            if let Some(slot) = data.get_mut(at + i) {
                *slot = byte;
            }
        }
        std::fs::write(&path, &data).with_context(|| format!("cannot write {}", path.display()))?;
        changed += 1;
    }
    for i in 0..added {
        let path = dir.join(format!("added/n{i:04}.bin"));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let size = rng.gen_range(MIN_FILE_BYTES..64 * 1024) as usize;
        std::fs::write(&path, file_content(&mut rng, size))?;
    }
    Ok(changed)
}

fn random_content(rng: &mut StdRng, size: usize) -> Vec<u8> {
    let mut data = vec![0u8; size];
    rng.fill_bytes(&mut data);
    data
}

fn file_content(rng: &mut StdRng, size: usize) -> Vec<u8> {
    let mut data = vec![0u8; size];
    if rng.gen_bool(0.5) {
        rng.fill_bytes(&mut data);
    } else {
        const WORDS: [&str; 8] = [
            "kernel ", "module ", "config ", "stager ", "bundle ", "origin ", "=1\n", "chunk ",
        ];
        let mut pos = 0;
        while pos < size {
            let word = WORDS[rng.gen_range(0..WORDS.len())].as_bytes();
            let n = word.len().min(size - pos);
            data[pos..pos + n].copy_from_slice(&word[..n]);
            pos += n;
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_sized() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let files_a = generate_tree(a.path(), 3 << 20, 7).expect("gen");
        let files_b = generate_tree(b.path(), 3 << 20, 7).expect("gen");
        assert_eq!(files_a, files_b);
        let total: u64 = files_a
            .iter()
            .map(|f| std::fs::metadata(a.path().join(f)).expect("meta").len())
            .sum();
        assert_eq!(total, 3 << 20);
        for f in &files_a {
            assert_eq!(
                std::fs::read(a.path().join(f)).expect("read"),
                std::fs::read(b.path().join(f)).expect("read")
            );
        }
    }
}
