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
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)

if [ ${#need[@]} -gt 0 ]; then
  echo "stagecoach: installing ${need[*]} (needed to build rocksdb)" >&2
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

# The Debian root-tree test (proto/tests/bundle_debian.rs) builds its tree with mmdebstrap.
if ! command -v mmdebstrap >/dev/null 2>&1; then
  echo "stagecoach: installing mmdebstrap (builds the Debian tree of the exact-unpack test)" >&2
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "stagecoach: cargo is not on PATH; install Rust from https://rustup.rs and retry" >&2
  exit 1
fi
