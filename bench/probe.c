/* The benchmarks' probe: its first act after exec is to read CLOCK_MONOTONIC and write
   it, in nanoseconds, to $MEPB_REPORT_DIR/<name> if that is set (as a MEP's UEP, whose
   stdout is the UEP's log), else to fd 4 (the helper's audit pipe) if open, else to fd 1.
   The name is the last argument: the UEP name, which our helper appends to its policy's
   uep_argv and upstream's MEP passes as `globus-compute-endpoint _start-user-endpoint NAME`.
   Built static so that exec costs no dynamic loading. A name starting with "hold" keeps
   it alive for 5 s, "holdN" (N digits) for N s, so that many can be alive at once. Any
   other name, with $MEPB_EXEC set, execs that program with the same arguments once the
   time is written (stdin, fds 3 and 4 untouched): the probe then only timestamps the
   exec of a real UEP (bench/compare.py). */
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
    const char *dir = getenv("MEPB_REPORT_DIR"), *name = argc > 1 ? argv[argc - 1] : "";
    char path[4096];
    int report = dir && argc > 1 && snprintf(path, sizeof path, "%s/%s", dir, name) < (int)sizeof path;
    if (report)
        fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    int ok = fd >= 0 && write(fd, buf, n) == n;
    if (strncmp(name, "hold", 4) == 0) {
        sleep(name[4] >= '0' && name[4] <= '9' ? (unsigned)atoi(name + 4) : 5);
    } else if (getenv("MEPB_EXEC")) {
        if (report && fd >= 0)
            close(fd);
        argv[0] = getenv("MEPB_EXEC");
        execv(argv[0], argv);
        return 127;
    }
    return ok ? 0 : 1;
}
