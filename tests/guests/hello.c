#include "guest.h"

void guest_main(void) {
    puts("Hello from the hekivisor test guest\n");
}
