#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build Stagecoach, then returns.
# Idempotent: prints nothing and exits quickly when everything is present.
set -euo pipefail

need=()
# rocksdb's build runs bindgen, which loads libclang at run time. (libclang-cpp is another
# library and does not count.)
have_libclang() {
  local f
  for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* \
           /usr/lib/*/libclang.so* /usr/lib/*/libclang-[0-9]*.so*; do
    [ -e "$f" ] && return 0
  done
  return 1
}
if ! have_libclang; then
  need+=(libclang-dev)
fi
# etcd-client's build compiles etcd's protobuf definitions with protoc.
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)

if [ ${#need[@]} -gt 0 ]; then
  echo "stagecoach: installing ${need[*]} (needed to build rocksdb and the etcd client)" >&2
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

# Tools the tests use on a real machine: the Linux swap test partitions a loop device and makes
# ext4 slots (fdisk, e2fsprogs, mount) and cross-checks its grubenv with grub-editenv
# (grub-common); the mDNS test makes a private network namespace (util-linux, iproute2). Without
# them those tests skip, and under STAGECOACH_REQUIRE_ALL=1 (.ci/run) they fail. The Debian
# root-tree test (proto/tests/bundle_debian.rs) builds its tree with mmdebstrap and marks files
# with setcap and setfacl. The console's browser tests (netsim/tests/console_browser.rs) drive a
# headless Chromium through chromedriver (Debian's chromium and chromium-driver). The VM test
# bed (netsim/src/vm.rs, netsim/tests/vm_boot.rs) builds a disk with mmdebstrap, mke2fs, debugfs
# and sfdisk, writes GRUB for BIOS from grub-pc-bin (never grub-pc, which installs GRUB on this
# machine's own disk) and boots it in qemu-system-x86_64. The origin's etcd tests
# (origin/tests/db.rs) start a 3-member cluster of Debian's etcd-server on loopback.
have_tool() {
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]
}
test_need=()
have_tool sfdisk || test_need+=(fdisk)
have_tool mkfs.ext4 || test_need+=(e2fsprogs)
have_tool mount || test_need+=(mount)
have_tool grub-editenv || test_need+=(grub-common)
{ have_tool losetup && have_tool unshare && have_tool partx; } || test_need+=(util-linux)
have_tool ip || test_need+=(iproute2)
have_tool mmdebstrap || test_need+=(mmdebstrap)
have_tool setcap || test_need+=(libcap2-bin)
have_tool setfacl || test_need+=(acl)
{ have_tool chromium || have_tool chromium-browser; } || test_need+=(chromium)
have_tool chromedriver || test_need+=(chromium-driver)
have_tool debugfs || test_need+=(e2fsprogs)
have_tool qemu-system-x86_64 || test_need+=(qemu-system-x86)
# The control-plane store's etcd tests start their own 3-member cluster on loopback.
have_tool etcd || test_need+=(etcd-server)
[ -f /usr/lib/grub/i386-pc/boot.img ] || test_need+=(grub-pc-bin)
if [ ${#test_need[@]} -gt 0 ]; then
  echo "stagecoach: installing ${test_need[*]} (used by the swap, discovery, exact-unpack, browser, VM and etcd tests)" >&2
  sudo_if_needed=()
  [ "$(id -u)" -eq 0 ] || sudo_if_needed=(sudo)
  # Quiet (apt's notes go nowhere) unless it fails, when everything it said is shown.
  if ! apt_log=$("${sudo_if_needed[@]}" apt-get update -qq 2>&1 &&
      "${sudo_if_needed[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${test_need[@]}" 2>&1); then
    echo "$apt_log" >&2
    echo "stagecoach: cannot install ${test_need[*]}" >&2
    exit 1
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "stagecoach: cargo is not on PATH; install Rust from https://rustup.rs and retry" >&2
  exit 1
fi
