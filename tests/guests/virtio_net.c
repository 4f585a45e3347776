#include "virtio.h"

/* virtio-net over a host TAP: the guest ARPs for the host's address and the
 * host kernel's reply comes back through the receive queue. */
static struct virtq_page rxq ALIGNED_PAGE;
static struct virtq_page txq ALIGNED_PAGE;
static u8 rxbuf[VIRTQ_SIZE][2048] ALIGNED_PAGE;
static u8 frame[12 + 42] ALIGNED_PAGE;

static void setup_queue(struct virtio_dev *d, u16 index, struct virtq_page *q) {
    COMMON16(d, 0x16) = index;
    COMMON16(d, 0x18) = VIRTQ_SIZE;
    u64 desc = (u64)q->desc, avail = (u64)&q->avail, used = (u64)&q->used;
    COMMON32(d, 0x20) = (u32)desc; COMMON32(d, 0x24) = (u32)(desc >> 32);
    COMMON32(d, 0x28) = (u32)avail; COMMON32(d, 0x2c) = (u32)(avail >> 32);
    COMMON32(d, 0x30) = (u32)used; COMMON32(d, 0x34) = (u32)(used >> 32);
    COMMON16(d, 0x1c) = 1;
}

static void notify(struct virtio_dev *d, u16 index) { *(volatile u16 *)(d->notify + 4 * index) = index; }

void guest_main(void) {
    struct virtio_dev d = {0};
    if (virtio_find(0x1041, &d, &rxq)) { puts("no virtio-net\n"); return; }
    u8 mac[6];
    for (int i = 0; i < 6; i++) mac[i] = d.device[i];
    memset(&rxq, 0, sizeof(rxq));
    memset(&txq, 0, sizeof(txq));
    COMMON8(&d, 0x14) = 0;
    COMMON8(&d, 0x14) = 3;
    COMMON32(&d, 0x08) = 1; COMMON32(&d, 0x0c) = 1;
    COMMON32(&d, 0x08) = 0; COMMON32(&d, 0x0c) = 1 << 5; /* VIRTIO_NET_F_MAC */
    COMMON8(&d, 0x14) = 11;
    setup_queue(&d, 0, &rxq);
    setup_queue(&d, 1, &txq);
    COMMON8(&d, 0x14) = 15;
    printf("status=%x mac=%x:%x:%x:%x:%x:%x\n", COMMON8(&d, 0x14), mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]);

    if (cmdline_has("protect-rx"))
        printf("protect rx rc=%ld\n", heki_protect((u64)rxbuf, (u64)rxbuf + sizeof(rxbuf), HEKI_READ));
    for (int i = 0; i < VIRTQ_SIZE; i++) {
        rxq.desc[i] = (struct virtq_desc){ (u64)rxbuf[i], sizeof(rxbuf[i]), VIRTQ_DESC_F_WRITE, 0 };
        rxq.avail.ring[i] = i;
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    rxq.avail.idx = VIRTQ_SIZE;
    notify(&d, 0);

    /* ARP who-has 192.168.249.1 tell 192.168.249.2 */
    u8 *e = frame + 12;
    memset(e, 0xff, 6);
    memcpy(e + 6, mac, 6);
    e[12] = 0x08; e[13] = 0x06;
    u8 arp[28] = {0, 1, 8, 0, 6, 4, 0, 1};
    memcpy(arp + 8, mac, 6);
    arp[14] = 192; arp[15] = 168; arp[16] = cmdline_has("protect-rx") ? 248 : 249; arp[17] = 2;
    arp[24] = 192; arp[25] = 168; arp[26] = cmdline_has("protect-rx") ? 248 : 249; arp[27] = 1;
    memcpy(e + 14, arp, 28);

    u16 seen = 0;
    for (int attempt = 0; attempt < 5; attempt++) {
        txq.desc[0] = (struct virtq_desc){ (u64)frame, sizeof(frame), 0, 0 };
        txq.avail.ring[txq.avail.idx % VIRTQ_SIZE] = 0;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        txq.avail.idx++;
        notify(&d, 1);
        for (u32 spin = 0; spin < 100000; spin++) {
            u16 used = *(volatile u16 *)&rxq.used.idx;
            while (seen != used) {
                struct virtq_used_elem el = rxq.used.ring[seen % VIRTQ_SIZE];
                u8 *p = rxbuf[el.id] + 12;
                seen++;
                if (el.len >= 12 + 42 && p[12] == 0x08 && p[13] == 0x06 && p[21] == 2) {
                    printf("arp reply from %u.%u.%u.%u is-at %x:%x:%x:%x:%x:%x\n", p[28], p[29], p[30], p[31],
                           p[22], p[23], p[24], p[25], p[26], p[27]);
                    return;
                }
            }
            cpu_relax();
        }
    }
    puts("no arp reply\n");
}
