#!/usr/bin/env bash
# Builds Cloud Hypervisor's `ch-remote`, unmodified, from a local checkout, so
# that the ch-remote matrix test (tests/ch_remote.rs) can drive a real client:
#
#   scripts/build-ch-remote.sh /path/to/cloud-hypervisor [/path/to/micro-http]
#   CH_REMOTE=/path/to/cloud-hypervisor/target/release/ch-remote \
#       cargo test --test ch_remote
#
# Nothing is fetched from the network here except crates.io through cargo's
# ordinary registry access. CH depends on micro-http as a git dependency; give
# a local micro-http checkout (at the commit in CH's Cargo.lock) as the second
# argument, or put it next to the CH checkout as `micro-http`. The override is
# passed on cargo's command line; cargo rewrites CH's Cargo.lock for it, and the
# script puts the original back afterwards, so the checkout is left as it was
# (the binary still calls itself `v53.0-dirty`: CH's build.rs ran `git describe`
# while the lock file was changed).
# QUICK=1 builds without LTO and with 16 codegen units (the client behaves
# the same; the default release build took 2m14s here on two shared cores).
# Prints the path of the built binary on stdout.
set -euo pipefail
ch=${1:?usage: $0 CH_CHECKOUT [MICRO_HTTP_CHECKOUT]}
ch=$(cd "$ch" && pwd)
micro_http=${2:-$(dirname "$ch")/micro-http}
[ -f "$ch/Cargo.toml" ] && [ -f "$ch/cloud-hypervisor/src/bin/ch-remote.rs" ] \
    || { echo "$ch is not a cloud-hypervisor checkout" >&2; exit 1; }
[ -f "$micro_http/Cargo.toml" ] \
    || { echo "no micro-http checkout at $micro_http (give it as the second argument)" >&2; exit 1; }
micro_http=$(cd "$micro_http" && pwd)
want=$(sed -n 's|^source = "git+https://github.com/firecracker-microvm/micro-http?branch=main#\(.*\)"|\1|p' "$ch/Cargo.lock" | head -1)
have=$(git -C "$micro_http" rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$want" ] && [ "$want" != "$have" ]; then
    echo "warning: micro-http checkout is at $have; CH's Cargo.lock wants $want" >&2
fi
quick=()
if [ "${QUICK:-0}" = 1 ]; then
    quick=(--config profile.release.lto=false --config profile.release.codegen-units=16)
fi
cd "$ch"
lock=$(mktemp)
cp Cargo.lock "$lock"
trap 'cp "$lock" "$ch/Cargo.lock"; rm -f "$lock"' EXIT
nice -n 10 cargo build --release --bin ch-remote \
    --config "patch.'https://github.com/firecracker-microvm/micro-http'.micro_http.path='$micro_http'" "${quick[@]}" >&2
echo "${CARGO_TARGET_DIR:-$ch/target}/release/ch-remote"
