#!/usr/bin/env bash
# Boot benchmark: the same tiny PVH guest (prints one line, powers off) under
# hekivisor, Debian's QEMU microvm and Cloud Hypervisor: whole process, RUNS
# runs each (default 20), interleaved, MEM_MIB of guest memory (default 256).
# For each VMM it prints the median wall time, the median CPU time (user +
# system, from wait4) and the median peak RSS, then hekivisor's ratios.
#
# Cloud Hypervisor is the binary in CLOUD_HYPERVISOR, else `cloud-hypervisor`
# on PATH; without one there is no CH column. Build it from a checkout with
#   cargo build --release --bin cloud-hypervisor
# (see scripts/build-ch-remote.sh for its micro-http git dependency).
# hekivisor is built into CARGO_TARGET_DIR (default target/).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-20}
mem=${MEM_MIB:-256}
ch=${CLOUD_HYPERVISOR:-$(command -v cloud-hypervisor || true)}
if [ -n "$ch" ] && [ ! -x "$ch" ]; then
    echo "bench: CLOUD_HYPERVISOR=$ch is not an executable" >&2
    exit 1
fi

if [ ! -x /usr/bin/time ]; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null
fi
if ! command -v qemu-system-x86_64 >/dev/null; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null
fi
cargo build --release --quiet
guest=$(cargo run --release --quiet --example build-guest -- tiny)
hk=${CARGO_TARGET_DIR:-target}/release/hekivisor

# Wall and CPU time: one process per run, started with posix_spawn and
# reaped with wait4, so the wall time has no shell in it and the CPU time is
# the VMM's own (with the threads it starts). Peak RSS: a second run under
# GNU time, because the kernel carries a process's peak RSS across exec and a
# child spawned straight from Python would report Python's. A run that
# outlives 30 s is killed and reported.
python3 - "$runs" "$mem" "$guest" "$hk" "${ch:-}" <<'PY'
import os, signal, statistics, subprocess, sys, time

runs, mem, guest, hk, ch = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
vmms = {
    "hekivisor": [hk, "--kernel", guest, "--memory", f"size={mem}M", "--serial", "null", "--no-reboot"],
    "qemu microvm": ["qemu-system-x86_64", "-enable-kvm", "-cpu", "qemu64,-cx16", "-M", "microvm", "-m", mem,
                     "-nographic", "-no-reboot", "-serial", "null", "-monitor", "none", "-kernel", guest,
                     "-device", "isa-debug-exit,iobase=0xf4,iosize=1"],
}
if ch:
    vmms["cloud-hypervisor"] = [ch, "--kernel", guest, "--cpus", "boot=1", "--memory", f"size={mem}M",
                                "--serial", "null", "--console", "off"]
    version = subprocess.run([ch, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"cloud-hypervisor: {ch} ({version})")
else:
    print("cloud-hypervisor: none (set CLOUD_HYPERVISOR or put cloud-hypervisor on PATH); no CH column")

child = None
def on_timeout(_sig, _frame):
    if child:
        os.kill(child, signal.SIGKILL)
signal.signal(signal.SIGALRM, on_timeout)
devnull = [(os.POSIX_SPAWN_OPEN, fd, "/dev/null", os.O_RDWR, 0) for fd in (0, 1, 2)]

def run(argv):
    global child
    start = time.perf_counter_ns()
    child = os.posix_spawnp(argv[0], argv, os.environ, file_actions=devnull)
    signal.alarm(30)
    _, status, usage = os.wait4(child, 0)
    wall = time.perf_counter_ns() - start
    signal.alarm(0)
    child = None
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        print(f"bench: {argv[0]} timed out after 30 s", file=sys.stderr)
    return wall / 1e6, (usage.ru_utime + usage.ru_stime) * 1e3

rss_file = f"/tmp/bench-boot-rss.{os.getpid()}"
def peak_rss_kib(argv):
    subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss_file, *argv], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    with open(rss_file) as f:
        return int(f.read().split()[-1])

def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])

load_before = loadavg()
results = {name: [] for name in vmms}
for _ in range(runs):
    for name, argv in vmms.items():
        results[name].append((*run(argv), peak_rss_kib(argv)))
os.unlink(rss_file)

print(f"runs: {runs} each, interleaved, {mem} MiB; load average {load_before} before, {loadavg()} after")
print(f"{'':18} {'wall ms':>9} {'CPU ms':>9} {'peak RSS KiB':>13}   (medians)")
med = {}
for name, rows in results.items():
    med[name] = [statistics.median(col) for col in zip(*rows)]
    wall, cpu, rss = med[name]
    print(f"{name:18} {wall:9.1f} {cpu:9.1f} {rss:13.0f}")
hkm = med["hekivisor"]
print(f"hekivisor / qemu microvm: wall {hkm[0] / med['qemu microvm'][0]:.2f} (goal <= 0.5)")
if "cloud-hypervisor" in med:
    chm = med["cloud-hypervisor"]
    print(f"hekivisor / cloud-hypervisor: wall {hkm[0] / chm[0]:.2f} (goal <= 1.0, stretch 0.8), "
          f"CPU {hkm[1] / chm[1]:.2f} (goal <= 0.9), peak RSS {hkm[2] / chm[2]:.2f} (goal <= 0.5)")
print("(guest RAM is mapped lazily: peak RSS includes the pages the guest touched)")
PY
