/*
 * sysloop: syscall-loop microbenchmark for the lucos guest.
 *
 *   sysloop [--syscall uname|getppid] [--iters N] [--check-release STR]
 *       N calls (default 200000 uname), then one line:
 *       sysloop syscall=uname iters=N ns_per_op=X.X [same=A other=B]
 *
 *   sysloop --forever [--report-ms M] [--syscall ...] [--check-release STR]
 *       loops until killed; every M ms (default 1000) prints
 *       sysloop progress=<total calls> ns_per_op=X.X [same=A other=B]
 *       where ns_per_op covers the calls of that interval only.
 *       On SIGINT/SIGTERM prints one final progress line and exits 0.
 *
 * --check-release STR (uname only): counts calls whose utsname.release equals
 * STR (same) or differs (other); counters are cumulative.
 *
 * The syscalls are issued with syscall(2) directly so no libc caching hides
 * them. Exit status: 0 ok, 1 a syscall failed, 2 usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: sysloop [--syscall uname|getppid] [--iters N] [--check-release STR]\n"
		"       sysloop --forever [--report-ms M] [--syscall uname|getppid] [--check-release STR]\n");
	exit(2);
}

static unsigned long long parse_num(const char *opt, const char *s, int allow_zero)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s || *end || s[0] == '-' || (!allow_zero && v == 0)) {
		fprintf(stderr, "sysloop: bad value for %s: '%s'\n", opt, s);
		exit(2);
	}
	return v;
}

struct state {
	int use_uname;
	const char *release;	/* NULL: no check */
	unsigned long long same, other;
};

/* One syscall; returns 0 or exits on failure. */
static inline void one_call(struct state *st)
{
	if (st->use_uname) {
		struct utsname u;

		if (syscall(SYS_uname, &u) != 0) {
			fprintf(stderr, "sysloop: uname: %s\n", strerror(errno));
			exit(1);
		}
		if (st->release) {
			if (strcmp(u.release, st->release) == 0)
				st->same++;
			else
				st->other++;
		}
	} else {
		syscall(SYS_getppid);
	}
}

static void print_counts(const struct state *st)
{
	if (st->release)
		printf(" same=%llu other=%llu", st->same, st->other);
	printf("\n");
	fflush(stdout);
}

int main(int argc, char **argv)
{
	struct state st = { .use_uname = 1 };
	const char *name = "uname";
	unsigned long long iters = 200000, report_ms = 1000;
	int forever = 0;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];

		if (!strcmp(a, "--forever")) {
			forever = 1;
			continue;
		}
		if (!strcmp(a, "--help") || !strcmp(a, "-h"))
			usage();
		if (i + 1 >= argc) {
			fprintf(stderr, "sysloop: unknown or incomplete option '%s'\n", a);
			usage();
		}
		const char *v = argv[++i];

		if (!strcmp(a, "--syscall")) {
			if (!strcmp(v, "uname"))
				st.use_uname = 1;
			else if (!strcmp(v, "getppid"))
				st.use_uname = 0;
			else {
				fprintf(stderr, "sysloop: unknown syscall '%s'\n", v);
				usage();
			}
			name = st.use_uname ? "uname" : "getppid";
		} else if (!strcmp(a, "--iters")) {
			iters = parse_num(a, v, 0);
		} else if (!strcmp(a, "--report-ms")) {
			report_ms = parse_num(a, v, 0);
		} else if (!strcmp(a, "--check-release")) {
			st.release = v;
		} else {
			fprintf(stderr, "sysloop: unknown option '%s'\n", a);
			usage();
		}
	}
	if (st.release && !st.use_uname) {
		fprintf(stderr, "sysloop: --check-release needs --syscall uname\n");
		usage();
	}

	if (!forever) {
		double t0 = now_ns();

		for (unsigned long long n = 0; n < iters; n++)
			one_call(&st);
		double dt = now_ns() - t0;

		printf("sysloop syscall=%s iters=%llu ns_per_op=%.1f", name, iters, dt / (double)iters);
		print_counts(&st);
		return 0;
	}

	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);

	/* Read the clock once per batch so it does not dominate the loop. */
	const unsigned batch = 64;
	const double period = (double)report_ms * 1e6;
	unsigned long long total = 0, last_total = 0;
	double last = now_ns();

	while (!stop) {
		for (unsigned k = 0; k < batch; k++)
			one_call(&st);
		total += batch;
		double t = now_ns();

		if (t - last >= period) {
			printf("sysloop progress=%llu ns_per_op=%.1f", total,
			       (t - last) / (double)(total - last_total));
			print_counts(&st);
			last = t;
			last_total = total;
		}
	}
	double t = now_ns();
	double per = total > last_total ? (t - last) / (double)(total - last_total) : 0.0;

	printf("sysloop progress=%llu ns_per_op=%.1f", total, per);
	print_counts(&st);
	return 0;
}
