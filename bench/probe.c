/* The spawn benchmark's probe: its first act after exec is to read CLOCK_MONOTONIC and
   write it, in nanoseconds, to fd 4 (the helper's audit pipe) if open, else to fd 1.
   Built static so that exec costs no dynamic loading. Named "hold" (its argv[1], the UEP
   name), it then stays alive for 5 s, so that many can be alive at once. */
#include <stdio.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <string.h>

int main(int argc, char **argv) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    char buf[32];
    int n = snprintf(buf, sizeof buf, "%lld\n", (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
    int fd = fcntl(4, F_GETFD) != -1 ? 4 : 1;
    int ok = write(fd, buf, n) == n;
    if (argc > 1 && strcmp(argv[1], "hold") == 0)
        sleep(5);
    return ok ? 0 : 1;
}
