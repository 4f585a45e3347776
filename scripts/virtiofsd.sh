#!/usr/bin/env bash
# Finds virtiofsd (the virtio-fs vhost-user backend the virtio-fs tests
# start, as Kata does), installing it from crates.io when it is missing.
# Prints its path as the last line on stdout; everything else goes to stderr.
#
#   scripts/virtiofsd.sh
#
# Looked for, in order: $HEKIVISOR_VIRTIOFSD, virtiofsd on PATH,
# /usr/libexec/virtiofsd, then $root/bin/virtiofsd, where root is
#   ${HEKIVISOR_VIRTIOFSD_ROOT:-${XDG_CACHE_HOME:-~/.cache}/hekivisor/virtiofsd}
# If none exists: installs Debian's libseccomp-dev and libcap-ng-dev (which
# virtiofsd links against) and runs `cargo install virtiofsd --root $root`
# (a few minutes, once).
set -euo pipefail
log() { echo "virtiofsd: $*" >&2; }
root=${HEKIVISOR_VIRTIOFSD_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/hekivisor/virtiofsd}
for candidate in "${HEKIVISOR_VIRTIOFSD:-}" "$(command -v virtiofsd || true)" /usr/libexec/virtiofsd "$root/bin/virtiofsd"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
        echo "$candidate"
        exit 0
    fi
done
missing=()
for p in libseccomp-dev libcap-ng-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    log "installing ${missing[*]} (apt-get)"
    $sudo apt-get update -qq >&2 || true
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
fi
command -v cargo >/dev/null || { log "cargo is needed to install virtiofsd"; exit 1; }
log "cargo install virtiofsd --root $root (a few minutes, once)"
nice -n 10 cargo install --quiet virtiofsd --root "$root" >&2
echo "$root/bin/virtiofsd"
