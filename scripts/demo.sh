#!/usr/bin/env bash
# The Hekivisor demo: boots a tiny guest whose "kernel" locks its own text
# through the heki ABI; a simulated rootkit then tries to patch it. Shows the
# guest's view, the heki events the VMM reported, and that memory is untouched.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /dev/kvm ]; then
    echo "demo: /dev/kvm is missing; Hekivisor needs KVM." >&2
    exit 1
fi
echo "== installing what the build needs (a no-op when present)"
scripts/install-deps.sh base
echo "== building hekivisor and the demo guest"
cargo build --release --quiet
guest=$(cargo run --release --quiet --example build-guest -- demo)
events=$(mktemp /tmp/hekivisor-demo-events.XXXXXX)
trap 'rm -f "$events"' EXIT

echo "== booting: hekivisor --kernel $(basename "$guest") --heki enabled=on,policy=deny"
target/release/hekivisor --kernel "$guest" --memory size=64M --heki enabled=on,policy=deny \
    --serial tty --event-monitor "path=$events" </dev/null

echo
echo "== heki events reported by the VMM"
python3 - "$events" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
decoder, pos, events = json.JSONDecoder(), 0, []
while pos < len(text):
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos >= len(text):
        break
    event, pos = decoder.raw_decode(text, pos)
    events.append(event)
for e in events:
    if e["source"] in ("heki", "guest"):
        t = e["timestamp"]["secs"] + e["timestamp"]["nanos"] / 1e9
        props = ", ".join(f"{k}={v}" for k, v in (e["properties"] or {}).items())
        print(f"  {t:8.4f}s  {e['source']}/{e['event']}  {props}")
PY
