#!/usr/bin/env bash
# Two measurements with the drivers Linux guest (issue 23), RUNS runs each
# (default 3), medians printed; see docs/benchmarks.md.
#   vsock   time from starting the VMM to the guest's vsock listener (port 52)
#           answering a host-initiated CONNECT through the hybrid vsock socket
#           and echoing a line: what Kata waits for before it talks to its agent
#   fsblk   the same SIZE_MIB file (default 64) read whole in the guest through
#           virtio-blk (the file is the disk) and through virtio-fs (the file
#           is in a share served by virtiofsd), MB/s of each from the guest's
#           own clock (/proc/uptime, 10 ms resolution); the same copy from
#           /dev/zero shows what the guest's own copying costs
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${RUNS:-3}
only=${ONLY:-}  # vsock or fsblk: one of the two
size_mib=${SIZE_MIB:-64}
cmdline="console=ttyS0 noxsave clearcpuid=smap,popcnt,cx16 panic=-1"

cargo build --release --quiet
guest=$(scripts/linux-guest/build.sh drivers)
virtiofsd=$(scripts/virtiofsd.sh)
hk=target/release/hekivisor
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# --- Boot to the vsock listener ----------------------------------------------
vsock_ms=()
[ "$only" = fsblk ] || for run in $(seq "$runs"); do
    sock="$work/vsock-$run.sock"
    start=$(date +%s%N)
    "$hk" --kernel "$guest/vmlinux" --initramfs "$guest/initramfs.cpio" --cmdline "$cmdline hk_bench=vsock" \
        --memory size=256M --serial "file=$work/vsock-$run.serial" --vsock "cid=3,socket=$sock" --no-reboot \
        </dev/null >"$work/vsock-$run.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    ms=$(python3 - "$sock" "$start" <<'PY'
import socket, sys, time
path, start = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 300
while time.time() < deadline:
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(b"CONNECT 52\n")
        f = s.makefile("rb")
        if f.readline().startswith(b"OK "):
            s.sendall(b"ping\n")
            if f.readline() == b"ping\n":
                print((time.time_ns() - start) // 1_000_000)
                sys.exit(0)
        s.close()
    except OSError:
        pass
    time.sleep(0.05)
sys.exit("no answer from the guest's vsock listener")
PY
)
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "vsock run $run: ${ms} ms to the guest listener's echo"
    vsock_ms+=("$ms")
done

# --- virtio-fs against virtio-blk on the same file ---------------------------
mkdir -p "$work/share"
head -c "$((size_mib << 20))" /dev/urandom >"$work/share/data"
zero_mbs=()
blk_mbs=()
fs_mbs=()
[ "$only" = vsock ] || for run in $(seq "$runs"); do
    rm -f "$work/virtiofsd.sock"
    "$virtiofsd" --socket-path "$work/virtiofsd.sock" --shared-dir "$work/share" --sandbox none --cache auto \
        >"$work/virtiofsd.log" 2>&1 &
    fsd=$!
    pids+=("$fsd")
    for _ in $(seq 100); do [ -S "$work/virtiofsd.sock" ] && break; sleep 0.05; done
    "$hk" --kernel "$guest/vmlinux" --initramfs "$guest/initramfs.cpio" \
        --cmdline "$cmdline hk_bench=fsblk hk_fs=bench" --memory size=512M,shared=on \
        --serial "file=$work/fsblk.serial" --disk "path=$work/share/data,readonly=on" \
        --fs "tag=bench,socket=$work/virtiofsd.sock,num_queues=1,queue_size=1024" --no-reboot \
        </dev/null >"$work/fsblk.log" 2>&1 || true
    kill "$fsd" 2>/dev/null || true
    wait "$fsd" 2>/dev/null || true
    rates=$(awk -v size="$size_mib" '/^bench: read/ {
            split($4, b, "="); split($5, f, "="); split($6, t, "=")
            if (b[2] != size * 1048576) { print "short read of " $3 ": " b[2] " bytes" > "/dev/stderr"; exit 1 }
            printf "%s %.1f\n", $3, size / (t[2] - f[2] > 0.01 ? t[2] - f[2] : 0.01) }' "$work/fsblk.serial")
    [ -n "$rates" ] || { echo "bench: no result; serial:" >&2; tail -20 "$work/fsblk.serial" >&2; exit 1; }
    zero=$(awk '$1 == "/dev/zero" {print $2}' <<<"$rates")
    blk=$(awk '$1 == "/dev/vda" {print $2}' <<<"$rates")
    fs=$(awk '$1 == "/mnt/data" {print $2}' <<<"$rates")
    echo "fsblk run $run: virtio-blk ${blk} MB/s, virtio-fs ${fs} MB/s, /dev/zero ${zero} MB/s (${size_mib} MiB, in the guest)"
    zero_mbs+=("$zero")
    blk_mbs+=("$blk")
    fs_mbs+=("$fs")
done

echo
[ "$only" = fsblk ] || echo "median boot to the vsock listener: $(median "${vsock_ms[@]}") ms ($runs runs)"
[ "$only" = vsock ] && exit 0
b=$(median "${blk_mbs[@]}")
f=$(median "${fs_mbs[@]}")
echo "median read of ${size_mib} MiB: virtio-blk $b MB/s, virtio-fs $f MB/s, /dev/zero $(median "${zero_mbs[@]}") MB/s, fs/blk $(awk -v f="$f" -v b="$b" 'BEGIN {printf "%.2f", f / b}')"
