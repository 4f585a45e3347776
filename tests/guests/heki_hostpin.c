#include "guest.h"

/* Tries, over and over, to hook LSTAR; the host pins it through the API. */
#define MSR_LSTAR 0xc0000082

void ap_main(unsigned cpu) { (void)cpu; }

void guest_main(void) {
    /* Every vCPU must be up (CR0.WP set) for a host pin of WP to succeed. */
    printf("boot cpus=%u\n", smp_start_async());
    wrmsr(MSR_LSTAR, 0xffffffff80001000UL);
    for (;;) {
        u64 v = rdmsr(MSR_LSTAR);
        int fault = try_wrmsr(MSR_LSTAR, v + 0x1000);
        printf("lstar hook %s\n", fault ? "faulted" : "worked");
        /* The host may pin LSTAR between the hook and its undo (it pins the
         * live value): the undo may fault too, and must not kill the guest. */
        if (!fault) try_wrmsr(MSR_LSTAR, v);
        for (volatile u32 i = 0; i < 3000; i++) cpu_relax();
    }
}
