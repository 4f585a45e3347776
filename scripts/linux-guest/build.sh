#!/usr/bin/env bash
# Builds a Linux guest kernel (vmlinux, booted through PVH) and an uncompressed
# busybox initramfs from Debian's packages, with our patch series and config
# fragments, and caches them outside the repository.
#
#   scripts/linux-guest/build.sh [heki|drivers]
#   scripts/linux-guest/build.sh deps     # only install the Debian packages
#
# Prints the directory holding vmlinux and initramfs.cpio as the last line on
# stdout; everything else goes to stderr. The result is cached under
#   ${HEKIVISOR_LINUX_CACHE:-~/.cache/hekivisor/linux}/<flavour>-<hash>
# where the hash covers this script, the patches, the config fragments, the
# init script and the Debian package versions: a rebuild happens only when one
# of them changes.
#
# HEKIVISOR_LINUX_PVM_WORKAROUNDS=0 leaves out the patches named *pvm-host*,
# which only a software KVM (kvm_pvm) needs. See docs/linux-guest.md.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
flavour=${1:-heki}
case "$flavour" in
heki | drivers | deps) ;;
*)
    echo "usage: $0 [heki|drivers|deps]" >&2
    exit 2
    ;;
esac
cache=${HEKIVISOR_LINUX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hekivisor/linux}
pvm=${HEKIVISOR_LINUX_PVM_WORKAROUNDS:-1}
log() { echo "linux-guest: $*" >&2; }

# --- Debian packages --------------------------------------------------------
# linux-source-6.12 is in bookworm-backports (and bookworm-security); the rest
# is in bookworm main.
packages=(linux-source-6.12 busybox-static make gcc libc6-dev flex bison bc libelf-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    log "installing ${missing[*]}"
    $sudo apt-get update -qq >&2 || true
    if ! apt-cache show linux-source-6.12 >/dev/null 2>&1; then
        log "adding bookworm-backports for linux-source-6.12"
        $sudo tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        $sudo apt-get update -qq >&2
    fi
    if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2; then
        log "cannot install ${missing[*]} (no network to the Debian mirror?)"
        exit 1
    fi
fi
[ "$flavour" != deps ] || exit 0
tarball=/usr/src/linux-source-6.12.tar.xz
busybox=/bin/busybox
[ -f "$tarball" ] || { log "missing $tarball"; exit 1; }
[ -x "$busybox" ] || { log "missing $busybox (busybox-static)"; exit 1; }

# --- Inputs and their hash ---------------------------------------------------
patches=()
for p in "$here"/patches/*.patch; do
    case "$(basename "$p")" in
    *pvm-host*) [ "$pvm" = 1 ] && patches+=("$p") ;;
    *) patches+=("$p") ;;
    esac
done
configs=("$here/heki.config")
[ "$flavour" = drivers ] && configs+=("$here/drivers.config")
init="$here/$flavour-init.sh"
# The kernel depends on the script, the patches, the fragments and the
# compiler; the initramfs also on the init script and busybox. An init
# script change rebuilds only the initramfs (a second).
kernel_hash=$(
    {
        cat "$0" "${patches[@]}" "${configs[@]}"
        dpkg-query -W -f='${Package} ${Version}\n' linux-source-6.12 gcc
    } | sha256sum | cut -c1-16
)
hash=$(
    {
        echo "$kernel_hash"
        cat "$init"
        [ "$flavour" != drivers ] || cat "$here/vsock-echo.c"
        dpkg-query -W -f='${Package} ${Version}\n' busybox-static gcc libc6-dev
    } | sha256sum | cut -c1-16
)
kernel="$cache/kernel-$flavour-$kernel_hash"
out="$cache/$flavour-$hash"
mkdir -p "$cache"

# One build at a time: two parallel tests must not build twice or in parallel.
exec 9>"$cache/.build.lock"
flock 9
if [ -f "$out/done" ]; then
    echo "$out"
    exit 0
fi

# --- Kernel -----------------------------------------------------------------
work="$cache/work-$flavour-$kernel_hash"
rm -rf "$out.tmp"
mkdir -p "$out.tmp"
trap 'rm -rf "$work" "$out.tmp" "$kernel.tmp"' EXIT
if [ ! -f "$kernel/done" ]; then
    start=$(date +%s)
    rm -rf "$work" "$kernel" "$kernel.tmp"
    mkdir -p "$work" "$kernel.tmp"
    log "building the $flavour kernel in $work (a few minutes)"
    tar -xJf "$tarball" -C "$work"
    src="$work/linux-source-6.12"
    build="$work/build"
    for p in "${patches[@]}"; do
        log "applying $(basename "$p")"
        patch -d "$src" -p1 -s --no-backup-if-mismatch <"$p" >&2
    done
    make -C "$src" O="$build" -s tinyconfig >&2
    "$src/scripts/kconfig/merge_config.sh" -m -O "$build" "$build/.config" "${configs[@]}" >/dev/null
    make -C "$src" O="$build" -s olddefconfig >&2
    # Every option the fragments ask for (the last fragment wins) must have
    # survived olddefconfig.
    wanted=$(awk '/^CONFIG_[A-Za-z0-9_]+=/ { split($0, a, "="); w[a[1]] = $0; next }
        /^# CONFIG_[A-Za-z0-9_]+ is not set$/ { w[$2] = $0 }
        END { for (k in w) print w[k] }' "${configs[@]}")
    bad=0
    while IFS= read -r line; do
        case "$line" in
        CONFIG_*=*)
            grep -qx -- "$line" "$build/.config" || {
                log "config: wanted $line, got: $(grep "^${line%%=*}=" "$build/.config" || echo unset)"
                bad=1
            }
            ;;
        "# CONFIG_"*" is not set")
            opt=${line#\# }
            opt=${opt%% *}
            ! grep -q "^$opt=" "$build/.config" || { log "config: wanted $opt unset"; bad=1; }
            ;;
        esac
    done <<<"$wanted"
    [ "$bad" = 0 ] || { log "config fragments do not apply"; exit 1; }
    make -C "$src" O="$build" -j"$(nproc)" vmlinux >"$kernel.tmp/build.log" 2>&1 || {
        tail -40 "$kernel.tmp/build.log" >&2
        log "kernel build failed"
        exit 1
    }
    cp "$build/vmlinux" "$build/System.map" "$build/usr/gen_init_cpio" "$kernel.tmp/"
    cp "$build/.config" "$kernel.tmp/config"
    echo "$(($(date +%s) - start))" >"$kernel.tmp/build-seconds"
    touch "$kernel.tmp/done"
    for old in "$cache/kernel-$flavour"-*; do
        [ "$old" = "$kernel.tmp" ] || [ ! -d "$old" ] || rm -rf "$old"
    done
    mv "$kernel.tmp" "$kernel"
    rm -rf "$work"
    log "built the $flavour kernel in $(cat "$kernel/build-seconds") s"
fi

# --- Initramfs: busybox and our init, uncompressed ---------------------------
{
    echo "dir /dev 0755 0 0"
    echo "nod /dev/console 0600 0 0 c 5 1"
    for d in bin sbin proc sys tmp mnt etc; do echo "dir /$d 0755 0 0"; done
    echo "file /bin/busybox $busybox 0755 0 0"
    for applet in $("$busybox" --list); do
        [ "$applet" = busybox ] || echo "slink /bin/$applet busybox 0777 0 0"
    done
    echo "file /init $init 0755 0 0"
    if [ "$flavour" = drivers ]; then
        # The guest's vsock peer: busybox has no vsock tool.
        gcc -static -O2 -Wall -o "$out.tmp/vsock-echo" "$here/vsock-echo.c" >&2
        echo "file /bin/vsock-echo $out.tmp/vsock-echo 0755 0 0"
    fi
} >"$out.tmp/initramfs.list"
"$kernel/gen_init_cpio" "$out.tmp/initramfs.list" >"$out.tmp/initramfs.cpio"

cp "$kernel/vmlinux" "$kernel/System.map" "$kernel/config" "$kernel/build-seconds" "$out.tmp/"
touch "$out.tmp/done"
# Older initramfs builds of this flavour are of no use any more.
for old in "$cache/$flavour"-*; do
    [ "$old" = "$out.tmp" ] || [ ! -d "$old" ] || rm -rf "$old"
done
mv "$out.tmp" "$out"
log "$flavour guest ready in $out"
echo "$out"
