#!/usr/bin/env bash
# Replays Kata's Cloud Hypervisor driver sequence (clh.go: ping, vm.create
# with Kata's default body, vm.info, vm.add-net with the TAP as SCM_RIGHTS,
# vm.boot, vm.add-disk, vm.resize, vm.remove-device, vmm.shutdown) against
# Hekivisor, printing one line per call with its status. Fails when an
# answer is not one Kata accepts. The replay is the nextest test
# tests/kata_replay.rs, so the test suite runs it too; this prints its lines.
# Needs /dev/kvm, CAP_NET_ADMIN (a TAP) and virtiofsd (scripts/virtiofsd.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp)
status=0
cargo nextest run --test kata_replay --no-capture >"$out" 2>&1 || status=$?
grep -E '^kata-replay:' "$out" || true
[ "$status" -eq 0 ] || tail -40 "$out" >&2
rm -f "$out"
exit "$status"
