/* The drivers guest's vsock peer (tests/linux_guest.rs), built static into
 * its initramfs by build.sh (busybox has no vsock tool).
 *
 *   vsock-echo listen PORT       accept one connection on PORT, echo one
 *                                line back, exit 0
 *   vsock-echo connect PORT MSG  connect to the host (CID 2) at PORT, send
 *                                MSG and a newline, print the host's line
 *
 * Every step is bounded by an alarm: a test that fails does not hang the guest.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>

static int fail(const char *what)
{
    perror(what);
    return 1;
}

/* Reads one line (with its newline) into buf; returns its length or -1. */
static int read_line(int fd, char *buf, int size)
{
    int n = 0;
    while (n < size - 1) {
        ssize_t r = read(fd, buf + n, 1);
        if (r <= 0)
            return -1;
        if (buf[n++] == '\n')
            break;
    }
    buf[n] = 0;
    return n;
}

static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t w = write(fd, buf, len);
        if (w <= 0)
            return -1;
        buf += w;
        len -= (size_t)w;
    }
    return 0;
}

int main(int argc, char **argv)
{
    char line[256];
    struct sockaddr_vm addr;
    memset(&addr, 0, sizeof(addr));
    addr.svm_family = AF_VSOCK;
    alarm(120);
    if (argc == 3 && strcmp(argv[1], "listen") == 0) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (s < 0)
            return fail("socket");
        addr.svm_cid = VMADDR_CID_ANY;
        addr.svm_port = (unsigned)atoi(argv[2]);
        if (bind(s, (struct sockaddr *)&addr, sizeof(addr)) < 0)
            return fail("bind");
        if (listen(s, 1) < 0)
            return fail("listen");
        printf("drivers: vsock: listening on %s\n", argv[2]);
        fflush(stdout);
        int c = accept(s, NULL, NULL);
        if (c < 0)
            return fail("accept");
        int n = read_line(c, line, sizeof(line));
        if (n < 0 || write_all(c, line, (size_t)n) < 0)
            return fail("echo");
        close(c);
        return 0;
    }
    if (argc == 4 && strcmp(argv[1], "connect") == 0) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (s < 0)
            return fail("socket");
        addr.svm_cid = VMADDR_CID_HOST;
        addr.svm_port = (unsigned)atoi(argv[2]);
        if (connect(s, (struct sockaddr *)&addr, sizeof(addr)) < 0)
            return fail("connect");
        snprintf(line, sizeof(line), "%s\n", argv[3]);
        if (write_all(s, line, strlen(line)) < 0)
            return fail("write");
        if (read_line(s, line, sizeof(line)) < 0)
            return fail("read");
        fputs(line, stdout);
        close(s);
        return 0;
    }
    fprintf(stderr, "usage: vsock-echo listen PORT | connect PORT MSG\n");
    return 2;
}
