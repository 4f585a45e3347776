#include "guest.h"

/* One vCPU writes a page in a loop while another locks it: once the lock
 * call returns, no write may land. */
static volatile u64 page[512] ALIGNED_PAGE;
static volatile int stop_writer;
static volatile u64 writes;

void ap_main(unsigned cpu) {
    if (cpu != 1) return;
    u64 i = 1;
    while (!stop_writer) {
        page[0] = i++;
        writes++;
    }
}

void guest_main(void) {
    /* Start the writer, then lock while it runs. */
    unsigned n = smp_start_async();
    while (writes < 50) cpu_relax();
    s64 rc = heki_protect((u64)page, (u64)page + 4096, HEKI_READ);
    u64 locked = page[0];
    u64 before = writes;
    while (writes < before + 200) cpu_relax();
    u64 later = page[0];
    stop_writer = 1;
    printf("cpus=%u protect rc=%ld locked=%lu later=%lu writer kept running=%s\n", n, rc, locked, later,
           writes >= before + 200 ? "yes" : "no");
    printf("%s\n", locked == later ? "no write landed after the lock" : "WRITE LANDED AFTER LOCK");
}
