#!/bin/sh
# /init of the drivers guest (tests/linux_guest.rs): real Linux virtio drivers
# against Hekivisor's devices. The host checks these lines:
#   /dev/vda    sector 0 holds "hekivisor-disk-pattern"; sector 1 is written
#               with "written-by-linux" for the host to check in the image;
#               printed: blk-mq's hardware queues, their depth (tags: half
#               the virtio queue size, two descriptors per request) and
#               whether the driver took VIRTIO_BLK_F_MQ (feature bit 12)
#   /dev/hwrng  64 bytes read
#   eth0        $hk_net.2/24, pings the host at $hk_net.1 (hk_net=A.B.C on the
#               kernel command line, which passes it to init as a variable;
#               default 192.168.247)
#   hvc0        one line written, for the host to find in the console file
#   dma         a disk read into a page heki locked (refused under heki)
#   cpus        (hk_hotplug) present and online CPUs; online N brings a
#               CPU the host added online; topology prints each CPU's
#               package, die, core and thread siblings; memory prints
#               MemTotal and the memory blocks online
#   vsock       with hk_vsock=PORT on the command line: listens on vsock port
#               52 and echoes one line to the host; connects to the host at
#               PORT, sends a line and prints the host's answer
#   /proc/interrupts, for the record
# With hk_fs=<tag> on the command line, only virtio-fs instead: mounts the
# share, prints /mnt/from-host.txt, writes /mnt/from-guest.txt, unmounts.
# Benchmarks (scripts/linux-guest/bench-fs-vsock.sh), with hk_bench=:
#   vsock   only the vsock listener on port 52, serving one echo
#   fsblk   reads as many MiB as /dev/vda holds from /dev/zero, /dev/vda and
#           /mnt/data (virtio-fs share hk_fs),
#           printing /proc/uptime before and after each
# With hk_hotplug=1, only devices added and removed at run time
# (tests/linux_hotplug.rs): commands come one per line on the serial
# console, each answered by one "hotplug:" line. With ACPI (the default)
# the guest's acpiphp hears of devices added and removed through the GED
# (docs/platform.md); booted with acpi=off it does not, so the host says
# when to rescan, and the guest releases a device before the host removes it.
echo "init: userspace up"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# CONFIG_DEVTMPFS_MOUNT does not apply to an initramfs.
mount -t devtmpfs devtmpfs /dev
if [ "$hk_bench" = vsock ]; then
    vsock-echo listen 52
    reboot -f
fi
if [ "$hk_bench" = fsblk ]; then
    mount -t virtiofs "$hk_fs" /mnt || echo "bench: virtiofs mount failed"
    # /dev/zero: what the same reads cost the guest without a device.
    size=$(($(cat /sys/block/vda/size) / 2048))
    for src in /dev/zero /dev/vda /mnt/data; do
        t0=$(cut -d' ' -f1 /proc/uptime)
        # busybox dd reports records, not bytes: whole MiB read.
        mib=$(dd if="$src" of=/dev/null bs=1M count="$size" 2>&1 | sed -n 's/^\([0-9]*\)+[0-9]* records out$/\1/p')
        bytes=$((${mib:-0} * 1048576))
        echo "bench: read $src bytes=$bytes from=$t0 to=$(cut -d' ' -f1 /proc/uptime)"
    done
    reboot -f
fi
if [ -n "$hk_fs" ]; then
    if mount -t virtiofs "$hk_fs" /mnt; then
        echo "drivers: virtiofs read: $(cat /mnt/from-host.txt)"
        echo "written-by-linux" >/mnt/from-guest.txt && sync && echo "drivers: virtiofs write: ok"
        umount /mnt && echo "drivers: virtiofs umount: ok"
    else
        echo "drivers: virtiofs: mount failed"
    fi
    echo "drivers: done"
    reboot -f
fi
if [ -n "$hk_hotplug" ]; then
    echo "hotplug: ready"
    while read -r command argument; do
        case "$command" in
        rescan)
            echo 1 >/sys/bus/pci/rescan
            echo "hotplug: rescanned"
            ;;
        ping)
            if ip link set eth0 up && ip addr add "$argument.2/24" dev eth0 &&
                ping -c 1 -W 10 "$argument.1" >/dev/null; then
                echo "hotplug: ping: ok"
            else
                echo "hotplug: ping: failed"
            fi
            ;;
        read)
            echo "hotplug: read: $(dd if=/dev/"$argument" bs=22 count=1 2>/dev/null)"
            ;;
        release)
            # The PCI function above the virtio device: the driver lets go of it.
            if cd -P "/sys/block/$argument/device/.." && echo 1 >remove; then
                echo "hotplug: released $argument"
            else
                echo "hotplug: release failed"
            fi
            cd /
            ;;
        slots)
            # The hotplug slots acpiphp registered from the DSDT.
            echo "hotplug: slots: $(ls /sys/bus/pci/slots 2>/dev/null | wc -l)"
            ;;
        check)
            if [ -b "/dev/$argument" ]; then echo "hotplug: $argument present"; else echo "hotplug: $argument absent"; fi
            ;;
        cpus)
            # The CPUs the kernel has (ACPI CPU hotplug adds to "present";
            # a CPU the host added is onlined by "online N", as Kata's agent does).
            echo "hotplug: cpus: present=$(cat /sys/devices/system/cpu/present)" \
                "online=$(cat /sys/devices/system/cpu/online)"
            ;;
        online)
            if echo 1 >"/sys/devices/system/cpu/cpu$argument/online"; then
                echo "hotplug: cpu$argument online"
            else
                echo "hotplug: cpu$argument online failed"
            fi
            ;;
        memory)
            # What the kernel has: MemTotal and the memory blocks online
            # (ACPI memory hotplug adds blocks, onlined by the kernel).
            echo "hotplug: memory: total_kb=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)" \
                "blocks_online=$(cat /sys/devices/system/memory/memory*/online | grep -c 1)"
            ;;
        topology)
            # One line per CPU: the kernel's view of the CPUID/MADT topology.
            for t in /sys/devices/system/cpu/cpu[0-9]*/topology; do
                echo "hotplug: topology: ${t%/topology} package=$(cat "$t/physical_package_id")" \
                    "die=$(cat "$t/die_id") core=$(cat "$t/core_id") threads=$(cat "$t/thread_siblings_list")"
            done
            ;;
        end)
            echo "hotplug: done"
            reboot -f
            ;;
        esac
    done
fi
if [ -b /dev/vda ]; then
    echo "drivers: disk read: $(dd if=/dev/vda bs=22 count=1 2>/dev/null)"
    echo "written-by-linux" | dd of=/dev/vda bs=512 seek=1 conv=sync,fsync 2>/dev/null &&
        echo "drivers: disk write: ok"
    echo "drivers: disk queues: $(ls /sys/block/vda/mq | wc -l)" \
        "tags: $(cat /sys/block/vda/mq/0/nr_tags)" \
        "mq: $(cut -c13 /sys/block/vda/device/features)"
else
    echo "drivers: disk: no /dev/vda"
fi
if [ -c /dev/hwrng ]; then
    echo "drivers: hwrng bytes: $(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | wc -c)"
else
    echo "drivers: hwrng: no /dev/hwrng"
fi
net=${hk_net:-192.168.247}
if ip link set eth0 up && ip addr add "$net.2/24" dev eth0 &&
    ping -c 1 -W 10 "$net.1" >/dev/null; then
    echo "drivers: ping: ok"
else
    echo "drivers: ping: failed"
fi
if [ -c /dev/hvc0 ] && echo "hello from linux on hvc0" >/dev/hvc0; then
    echo "drivers: hvc0: ok"
else
    echo "drivers: hvc0: failed"
fi
if [ -n "$hk_vsock" ]; then
    vsock-echo listen 52 &
    listener=$!
    echo "drivers: vsock: host said: $(vsock-echo connect "$hk_vsock" "hello from the guest")"
    wait "$listener" && echo "drivers: vsock: echo served"
fi
echo dma >/proc/heki_test
# Which interrupts the drivers use (MSI-X: there is no IOAPIC routing table).
cat /proc/interrupts
echo "drivers: done"
reboot -f
