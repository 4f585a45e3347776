#!/usr/bin/env bash
# Installs the host tools the test suite uses, from Debian's packages:
# iasl (acpica-tools) checks our ACPI tables; gcc/binutils build the test guests;
# the Linux guest (tests/linux_guest.rs) needs linux-source-6.12, busybox-static
# and the kernel's build tools (scripts/linux-guest/build.sh installs them);
# the virtio-fs tests need virtiofsd (scripts/virtiofsd.sh installs it from
# crates.io, with libseccomp-dev and libcap-ng-dev, only when it is missing).
#
#   scripts/install-deps.sh          # everything the test suite uses
#   scripts/install-deps.sh base     # only what the demo needs (gcc, binutils, python3)
set -euo pipefail
need=()
command -v python3 >/dev/null || need+=(python3)
command -v iasl >/dev/null || need+=(acpica-tools)
command -v gcc >/dev/null || need+=(gcc)
command -v objcopy >/dev/null || need+=(binutils)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ "${1:-}" = base ] && exit 0
"$(dirname "$0")/linux-guest/build.sh" deps
"$(dirname "$0")/virtiofsd.sh" >/dev/null
