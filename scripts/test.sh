#!/usr/bin/env bash
# Runs the whole test suite: unit tests of every crate and the integration
# tests that boot tiny guests on /dev/kvm (they skip, saying why, without it).
set -euo pipefail
cd "$(dirname "$0")/.."
# A new machine needs nothing installed by hand: the Debian packages the tests
# use are installed here (a no-op when they are present).
scripts/install-deps.sh
# The Linux guests (tests/linux_guest.rs) are built, or found in the cache
# (~/.cache/hekivisor/linux), before the tests start, so a kernel build does
# not compete for the CPU with tests that boot VMs against a deadline. A build
# that fails here fails those tests, with the reason.
if [ -e /dev/kvm ]; then
    for flavour in heki drivers; do
        scripts/linux-guest/build.sh "$flavour" >/dev/null ||
            echo "test.sh: building the $flavour Linux guest failed; tests/linux_guest.rs will fail" >&2
    done
fi
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
    # nextest does not run doctests.
    cargo test --workspace --doc --quiet
else
    cargo test --workspace --no-fail-fast "$@"
fi
