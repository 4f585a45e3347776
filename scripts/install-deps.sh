#!/usr/bin/env bash
# Installs the host tools the test suite uses, from Debian's packages:
# iasl (acpica-tools) checks our ACPI tables; gcc/binutils build the test guests.
set -euo pipefail
need=()
command -v iasl >/dev/null || need+=(acpica-tools)
command -v gcc >/dev/null || need+=(gcc)
command -v objcopy >/dev/null || need+=(binutils)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
