/*
 * probe: prints the kernel-visible values later lucos tests patch.
 *
 *   probe [--every SECONDS] [--count N]
 *
 * Each round prints exactly one line (flushed):
 *   probe uname_release=<utsname.release> cmdline=<first line of /proc/cmdline> version=<first 60 chars of /proc/version>
 * Default: one round. --every S waits S seconds (may be fractional) between
 * rounds and, without --count, repeats until killed. --count N alone repeats
 * N times one second apart. A file that cannot be read prints as "?".
 * Exit status: 0 ok, 1 uname failed, 2 usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

/* First line of path (without the newline), at most max chars. */
static void first_line(const char *path, char *out, size_t max)
{
	FILE *f = fopen(path, "r");
	size_t n;

	if (!f) {
		snprintf(out, max + 1, "?");
		return;
	}
	n = fread(out, 1, max, f);
	fclose(f);
	out[n] = '\0';
	out[strcspn(out, "\n")] = '\0';
}

static void usage(void)
{
	fprintf(stderr, "usage: probe [--every SECONDS] [--count N]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	double every = -1.0;
	long long count = -1;

	for (int i = 1; i < argc; i++) {
		char *end;

		if (i + 1 >= argc)
			usage();
		if (!strcmp(argv[i], "--every")) {
			every = strtod(argv[++i], &end);
			if (*end || end == argv[i] || every < 0)
				usage();
		} else if (!strcmp(argv[i], "--count")) {
			count = strtoll(argv[++i], &end, 10);
			if (*end || end == argv[i] || count < 1)
				usage();
		} else {
			usage();
		}
	}
	if (count < 0)
		count = every >= 0 ? 0 : 1; /* 0: forever */
	if (every < 0)
		every = 1.0;

	for (long long round = 0; count == 0 || round < count; round++) {
		struct utsname u;
		char cmdline[4097], version[61];

		if (round > 0) {
			struct timespec ts = { (time_t)every, (long)((every - (double)(time_t)every) * 1e9) };

			while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
				;
		}
		if (syscall(SYS_uname, &u) != 0) {
			fprintf(stderr, "probe: uname: %s\n", strerror(errno));
			return 1;
		}
		first_line("/proc/cmdline", cmdline, sizeof(cmdline) - 1);
		first_line("/proc/version", version, sizeof(version) - 1);
		printf("probe uname_release=%s cmdline=%s version=%s\n", u.release, cmdline, version);
		fflush(stdout);
	}
	return 0;
}
