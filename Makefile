# The two commands of the README. Both install what a fresh machine lacks, then run cargo.
# Everything builds in the release profile: one compile of rocksdb serves the demo, the tests
# and the benchmarks.

CARGO ?= cargo
DEMO_ARGS ?=

.PHONY: demo test deps bench clippy fmt

deps:
	@./scripts/install-deps.sh

## Run the local demo of the whole mesh (origin, two sites, stagers and edges on loopback).
demo: deps
	$(CARGO) build --release --bins
	$(CARGO) run --release -p netsim --bin netsim -- demo $(DEMO_ARGS)

## Run every test of the workspace. The binaries are built first: netsim's tests start them.
## Both steps enable the test switches (`test-hooks`), which a normal build leaves out; the same
## features in both steps mean the test step reuses the binaries' compile.
TEST_FEATURES := stager/test-hooks,edge-agent/test-hooks
test: deps
	$(CARGO) build --release --bins --features $(TEST_FEATURES)
	$(CARGO) test --release --workspace --features $(TEST_FEATURES)

## Run the criterion benchmarks (slow; not part of `make test`).
bench: deps
	$(CARGO) bench -p benches

clippy:
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all
