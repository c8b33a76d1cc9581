/*
 * lpbench: the in-guest half of `lucos bench` against Linux livepatch.
 *
 *   lpbench load MODULE.ko NAME [MAX_S]   finit_module, then poll
 *                                 /sys/kernel/livepatch/NAME/transition until 0;
 *                                 prints "lpbench load_us=<load> transition_us=<total>"
 *   lpbench read PATH ITERS ROUNDS   ROUNDS rounds of ITERS pread()s of PATH;
 *                                 prints "lpbench read_ns=<min over rounds, per read>"
 *
 * Times are CLOCK_MONOTONIC inside the guest. Exit status: 0 ok, 1 a syscall
 * failed, 2 usage error, 3 the transition had not ended after MAX_S seconds
 * (default 60). Below 15 s klp has not yet sent its fake signals to unswitched tasks
 * (SIGNALS_TIMEOUT), so an end before then means every stack was judged reliable.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int load(const char *ko, const char *name, long long max_s)
{
	char path[256], buf[8];
	long long t0, t1;
	int fd = open(ko, O_RDONLY | O_CLOEXEC);

	if (fd < 0) {
		perror(ko);
		return 1;
	}
	snprintf(path, sizeof(path), "/sys/kernel/livepatch/%s/transition", name);
	t0 = now_ns();
	if (syscall(SYS_finit_module, fd, "", 0) != 0) {
		perror("finit_module");
		return 1;
	}
	t1 = now_ns();
	for (;;) {
		int s = open(path, O_RDONLY);
		ssize_t n;

		if (s < 0) {
			perror(path);
			return 1;
		}
		n = read(s, buf, sizeof(buf));
		close(s);
		if (n > 0 && buf[0] == '0')
			break;
		if (now_ns() - t0 > max_s * 1000000000LL) {
			printf("lpbench transition stalled\n");
			return 3;
		}
		usleep(1000);
	}
	printf("lpbench load_us=%lld transition_us=%lld\n", (t1 - t0) / 1000,
	       (now_ns() - t0) / 1000);
	return 0;
}

static int readloop(const char *p, long iters, long rounds)
{
	char buf[4096];
	long long best = -1;
	int fd = open(p, O_RDONLY);

	if (fd < 0) {
		perror(p);
		return 1;
	}
	for (long r = 0; r < rounds; r++) {
		long long t0 = now_ns(), d;

		for (long i = 0; i < iters; i++)
			if (pread(fd, buf, sizeof(buf), 0) < 0) {
				perror("pread");
				return 1;
			}
		d = now_ns() - t0;
		if (best < 0 || d < best)
			best = d;
	}
	printf("lpbench read_ns=%lld\n", best / iters);
	return 0;
}

int main(int argc, char **argv)
{
	if ((argc == 4 || argc == 5) && !strcmp(argv[1], "load"))
		return load(argv[2], argv[3], argc == 5 ? atol(argv[4]) : 60);
	if (argc == 5 && !strcmp(argv[1], "read"))
		return readloop(argv[2], atol(argv[3]), atol(argv[4]));
	fprintf(stderr, "usage: lpbench load MODULE.ko NAME | lpbench read PATH ITERS ROUNDS\n");
	return 2;
}
