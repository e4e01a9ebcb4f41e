//! Preconditions of tests that touch the machine. Each is `Ok(())` when it holds, or an `Err`
//! that says what is missing and how to get it; pass them to [`crate::can_run`].

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Directories searched for system tools besides `PATH` (a non-login root shell may lack the
/// `sbin` ones).
const SYSTEM_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// The path of tool `name`: on `PATH`, or in the usual system directories.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SYSTEM_DIRS.map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The test runs as root.
pub fn root() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        Ok(())
    } else {
        Err("needs root (run the tests as root, as .ci/run does)".into())
    }
}

/// Every tool of `names` is installed.
pub fn tools(names: &[&str]) -> Result<(), String> {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| find_tool(name).is_none())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} not installed (scripts/install-deps.sh installs it)",
            missing.join(", ")
        ))
    }
}

/// The kernel offers loop devices (`/dev/loop-control`).
pub fn loop_devices() -> Result<(), String> {
    if Path::new("/dev/loop-control").exists() {
        Ok(())
    } else {
        Err("no /dev/loop-control: this kernel or container has no loop devices".into())
    }
}

/// The test may make a private network namespace with its own interfaces (`unshare --net`,
/// `ip link add`): root (or CAP_NET_ADMIN) and util-linux's `unshare` and iproute2's `ip`.
pub fn network_namespaces() -> Result<(), String> {
    tools(&["unshare", "ip"])?;
    let probe = Command::new("unshare")
        .args(["--net", "ip", "link", "set", "lo", "up"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|error| format!("cannot run unshare: {error}"))?;
    if probe.status.success() {
        Ok(())
    } else {
        Err(format!(
            "cannot make a private network namespace (needs root or CAP_NET_ADMIN): {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_is_named_with_the_fix() {
        let error = tools(&["sh", "stagecoach-no-such-tool"]).unwrap_err();
        assert!(error.contains("stagecoach-no-such-tool"), "{error}");
        assert!(!error.contains("sh,"), "{error}");
        assert!(error.contains("install-deps.sh"), "{error}");
        assert_eq!(tools(&["sh"]), Ok(()));
    }

    #[test]
    fn find_tool_finds_the_shell() {
        assert!(find_tool("sh").is_some_and(|path| path.is_file()));
    }
}
