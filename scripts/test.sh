#!/usr/bin/env bash
# Runs the whole test suite: unit tests of every crate and the integration
# tests that boot tiny guests on /dev/kvm (they skip, saying why, without it).
set -euo pipefail
cd "$(dirname "$0")/.."
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
    # nextest does not run doctests.
    cargo test --workspace --doc --quiet
else
    cargo test --workspace --no-fail-fast "$@"
fi
