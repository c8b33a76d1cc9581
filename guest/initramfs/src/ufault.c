/*
 * ufault: makes the kernel write to a user address that is not mapped, so that
 * tests can see how (new) kernel code handles the fault.
 *
 *   ufault getdents DIR
 *
 * Calls getdents64(2) on DIR with a buffer at an address that was mapped and
 * then unmapped (so it passes access_ok() but faults), and prints one line:
 *   ufault getdents ret=<return value> errno=<errno>
 * A kernel that handles the fault returns -1 with errno 14 (EFAULT).
 * Exit status: 0 the call returned, 2 usage or setup error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	void *page;
	long ret;
	int fd;

	if (argc != 3 || strcmp(argv[1], "getdents") != 0) {
		fprintf(stderr, "usage: ufault getdents DIR\n");
		return 2;
	}
	fd = open(argv[2], O_RDONLY | O_DIRECTORY);
	if (fd < 0) {
		perror("open");
		return 2;
	}
	page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (page == MAP_FAILED || munmap(page, 4096) != 0) {
		perror("mmap");
		return 2;
	}
	ret = syscall(SYS_getdents64, fd, page, 4096);
	printf("ufault getdents ret=%ld errno=%d\n", ret, ret < 0 ? errno : 0);
	fflush(stdout);
	return 0;
}
