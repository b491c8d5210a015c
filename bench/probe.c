/* The benchmarks' probe: its first act after exec is to read CLOCK_MONOTONIC and write
   it, in nanoseconds, to $MEPB_REPORT_DIR/<argv[1]> if that is set (as a MEP's UEP, whose
   stdout is /dev/null), else to fd 4 (the helper's audit pipe) if open, else to fd 1.
   Built static so that exec costs no dynamic loading. A name (argv[1], the UEP name)
   starting with "hold" keeps it alive for 5 s, "holdN" (N digits) for N s, so that many
   can be alive at once. */
#include <stdio.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <string.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    char buf[32];
    int n = snprintf(buf, sizeof buf, "%lld\n", (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
    int fd = fcntl(4, F_GETFD) != -1 ? 4 : 1;
    const char *dir = getenv("MEPB_REPORT_DIR");
    char path[4096];
    if (dir && argc > 1 && snprintf(path, sizeof path, "%s/%s", dir, argv[1]) < (int)sizeof path)
        fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
    int ok = fd >= 0 && write(fd, buf, n) == n;
    if (argc > 1 && strncmp(argv[1], "hold", 4) == 0)
        sleep(argv[1][4] >= '0' && argv[1][4] <= '9' ? (unsigned)atoi(argv[1] + 4) : 5);
    return ok ? 0 : 1;
}
