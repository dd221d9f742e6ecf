// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//
// A tiny AF_VSOCK client and server for the e2e guest (busybox has none). Built
// statically on the host at test time (tests/e2e_upstream.rs) and put into the initramfs.
//
//   vsock connect CID PORT MESSAGE   connect, send MESSAGE and a newline, print the
//                                    first line the peer answers, then close
//   vsock listen PORT                accept one connection, print the first line
//                                    received, answer "ECHO <line>\n", then close
//   vsock cid                        print this guest's CID as the driver read it from
//                                    the device's config space ("vsock: cid N")
//
// Lines printed: "vsock: got <line>" (and errors on stderr). Exit status 0 on success.
// Every call has a timeout (SO_RCVTIMEO / SO_SNDTIMEO, and alarm() for accept), so a
// broken transport fails the test instead of hanging it.

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <linux/vm_sockets.h>

#define TIMEOUT_SECS 30

static int fail(const char *what) {
    fprintf(stderr, "vsock: %s: %s\n", what, strerror(errno));
    return 1;
}

static void set_timeouts(int fd) {
    struct timeval tv = {.tv_sec = TIMEOUT_SECS, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

// Read up to a newline (not kept) into buf; returns the length, -1 on error or EOF
// before any newline.
static ssize_t read_line(int fd, char *buf, size_t cap) {
    size_t len = 0;
    while (len + 1 < cap) {
        ssize_t n = read(fd, buf + len, 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        if (buf[len] == '\n') {
            buf[len] = '\0';
            return (ssize_t)len;
        }
        len++;
    }
    buf[len] = '\0';
    return (ssize_t)len;
}

static int do_connect(unsigned cid, unsigned port, const char *msg) {
    char line[512];
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0)
        return fail("socket");
    set_timeouts(fd);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        return fail("connect");
    if (write_all(fd, msg, strlen(msg)) < 0 || write_all(fd, "\n", 1) < 0)
        return fail("write");
    if (read_line(fd, line, sizeof(line)) < 0)
        return fail("read");
    printf("vsock: got %s\n", line);
    close(fd);
    return 0;
}

static int do_listen(unsigned port) {
    char line[512], reply[600];
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0)
        return fail("socket");
    if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        return fail("bind");
    if (listen(fd, 1) < 0)
        return fail("listen");
    printf("vsock: listening on port %u\n", port);
    fflush(stdout);
    alarm(2 * TIMEOUT_SECS);
    int conn = accept(fd, NULL, NULL);
    if (conn < 0)
        return fail("accept");
    alarm(0);
    set_timeouts(conn);
    if (read_line(conn, line, sizeof(line)) < 0)
        return fail("read");
    printf("vsock: got %s\n", line);
    fflush(stdout);
    snprintf(reply, sizeof(reply), "ECHO %s\n", line);
    if (write_all(conn, reply, strlen(reply)) < 0)
        return fail("write");
    // Let the peer read the answer before the connection goes away.
    shutdown(conn, SHUT_WR);
    read_line(conn, line, sizeof(line));
    close(conn);
    close(fd);
    return 0;
}

static int do_cid(void) {
    unsigned cid = 0;
    int fd = open("/dev/vsock", O_RDONLY);
    if (fd < 0)
        return fail("open /dev/vsock");
    if (ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) < 0)
        return fail("IOCTL_VM_SOCKETS_GET_LOCAL_CID");
    printf("vsock: cid %u\n", cid);
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 5 && strcmp(argv[1], "connect") == 0)
        return do_connect((unsigned)strtoul(argv[2], NULL, 0), (unsigned)strtoul(argv[3], NULL, 0),
                          argv[4]);
    if (argc == 3 && strcmp(argv[1], "listen") == 0)
        return do_listen((unsigned)strtoul(argv[2], NULL, 0));
    if (argc == 2 && strcmp(argv[1], "cid") == 0)
        return do_cid();
    fprintf(stderr, "usage: vsock connect CID PORT MESSAGE | vsock listen PORT | vsock cid\n");
    return 2;
}
