# The two commands of the README. Both install what a fresh machine lacks, then run cargo.
#
# One build serves the demo and the tests: rocksdb (the longest compile by far) is compiled
# once. That holds only while every command asks cargo for the same thing: the
# release profile, the whole workspace, and every target. Cargo resolves the dependencies'
# features over the packages and targets it is asked to build (dev-dependencies count only when
# a test, bench or example target is among them), and a dependency whose features differ is
# compiled again, with everything that depends on it: `cargo run -p netsim` after
# `cargo build --bins` compiled rocksdb a second time. So the demo runs the built binary
# rather than `cargo run`.

CARGO ?= cargo
DEMO_ARGS ?=

# The build every target below starts with.
BUILD = $(CARGO) build --release --workspace --all-targets

# Prints where cargo puts what it builds, as cargo resolves it (CARGO_TARGET_DIR, build.target-dir
# of a .cargo/config.toml, or target/ of the workspace).
PRINT_TARGET_DIR = $(CARGO) metadata --format-version 1 --no-deps | \
	python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'

.PHONY: demo test deps bench clippy fmt

deps:
	@./scripts/install-deps.sh

## Run the local demo of the whole mesh (origin, two sites, stagers and edges on loopback).
demo: deps
	$(BUILD)
	@netsim="$$($(PRINT_TARGET_DIR))/release/netsim" && echo "$$netsim demo $(DEMO_ARGS)" && \
		"$$netsim" demo $(DEMO_ARGS)

## Run every test of the workspace. The binaries are built first: netsim's tests start them.
## Both steps enable the test switches (`test-hooks`), which a normal build leaves out; the same
## features in both steps mean the test step reuses the binaries' compile.
TEST_FEATURES := origin/test-hooks,stager/test-hooks,edge-agent/test-hooks
test: deps
	$(BUILD) --features $(TEST_FEATURES)
	$(CARGO) test --release --workspace --features $(TEST_FEATURES)

## Run the criterion benchmarks (slow; not part of `make test`).
bench: deps
	$(CARGO) bench -p benches

clippy:
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all
