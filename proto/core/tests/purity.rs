//! The pure core stays pure: no module of `proto-core` names the filesystem, sockets or an
//! async runtime, and its manifest depends on none of the crates that do I/O. Cargo keeps the
//! I/O crates out of the build only while nobody adds them; this test says who did, and where.

use std::fs;
use std::path::{Path, PathBuf};

/// What a pure module must never name in code (comments are not checked).
const FORBIDDEN_IN_SOURCE: &[&str] = &["std::fs", "std::net", "tokio", "File::"];

/// Crates that do I/O, which the pure core must never depend on.
const FORBIDDEN_DEPENDENCIES: &[&str] = &[
    "tokio", "quinn", "rustls", "rocksdb", "libc", "libp2p", "rcgen", "proto",
];

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// The code of a line, without a trailing `//` comment.
fn code_of(line: &str) -> &str {
    line.find("//").map_or(line, |at| &line[..at])
}

#[test]
fn sources_name_no_filesystem_socket_or_runtime() {
    let mut files = Vec::new();
    rust_files(&crate_dir().join("src"), &mut files);
    assert!(files.len() >= 8, "found only {} source files", files.len());
    let mut offences = Vec::new();
    for file in &files {
        let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for (number, line) in text.lines().enumerate() {
            let code = code_of(line);
            for word in FORBIDDEN_IN_SOURCE {
                if code.contains(word) {
                    offences.push(format!(
                        "{}:{}: names `{word}`: {}",
                        file.strip_prefix(crate_dir()).unwrap_or(file).display(),
                        number + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        offences.is_empty(),
        "proto-core must do no I/O; move this code to `proto`:\n{}",
        offences.join("\n")
    );
}

#[test]
fn manifest_depends_on_no_io_crate() {
    let manifest = fs::read_to_string(crate_dir().join("Cargo.toml")).expect("Cargo.toml");
    let mut section = String::new();
    let mut offences = Vec::new();
    for line in manifest.lines() {
        let line = code_of_toml(line).trim();
        if line.starts_with('[') {
            section = line.to_owned();
            continue;
        }
        if !section.ends_with("dependencies]") || section.contains("dev-dependencies") {
            continue;
        }
        let Some((name, _)) = line.split_once('=') else {
            continue;
        };
        let name = name.trim().trim_end_matches(".workspace").trim();
        if FORBIDDEN_DEPENDENCIES.contains(&name) {
            offences.push(format!("{section} {name}"));
        }
    }
    assert!(
        offences.is_empty(),
        "proto/core/Cargo.toml depends on I/O crates: {}",
        offences.join(", ")
    );
}

fn code_of_toml(line: &str) -> &str {
    line.find('#').map_or(line, |at| &line[..at])
}

#[test]
fn the_scanner_finds_what_it_looks_for() {
    // Guards the guard: a forbidden name in code is seen, the same name in a comment is not.
    let code = "    let f = std::fs::read(path); // reads";
    assert!(FORBIDDEN_IN_SOURCE
        .iter()
        .any(|w| code_of(code).contains(w)));
    let comment = "    // no std::fs here";
    assert!(!FORBIDDEN_IN_SOURCE
        .iter()
        .any(|w| code_of(comment).contains(w)));
}
