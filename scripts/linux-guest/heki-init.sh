#!/bin/sh
# /init of the heki test guest (tests/linux_guest.rs): runs every simulated
# rootkit attack of /proc/heki_test (CONFIG_HEKI_TEST) once, then ends the VM.
# Each attack prints its own "heki-test: NAME: result=..." line in dmesg,
# which is the serial console.
echo "init: userspace up"
mount -t proc proc /proc
# hk_bench=syscalls: a system-call-heavy loop timed by the host from these
# two lines (scripts/linux-guest/bench-translation.sh), then the VM ends.
case " $(cat /proc/cmdline) " in
*" hk_bench=syscalls "*)
    mount -t devtmpfs dev /dev 2>/dev/null
    echo "bench: start"
    if dd if=/dev/zero of=/dev/null bs=1 count=100000 2>/dev/null; then
        echo "bench: end"
    else
        echo "bench: failed (dd)"
    fi
    reboot -f
    ;;
esac
for attack in text rodata wp lstar remap-text remap-rodata private-cr3 idt-alias lidt efer textpoke prelock; do
    echo "$attack" >/proc/heki_test || echo "heki-test: $attack: result=unavailable"
done
echo "heki-test: done"
# Time for the host to read GET vm.heki while the VM still runs.
sleep 3
# Without ACPI the kernel cannot power off; a reboot ends the VM through the
# i8042 (hekivisor --no-reboot then exits with status 0).
reboot -f
