// SPDX-License-Identifier: GPL-2.0
/*
 * lucos test bundle: uname(2) reports "<release>+lucos" as the release.
 *
 * Replaces __x64_sys_newuname (the syscall entry; __do_sys_newuname is
 * inlined notrace code without an fentry site). Apart from the suffix it
 * behaves like SYSCALL_DEFINE1(newuname) of kernel/sys.c 6.1.
 *
 * It exercises what a patch to real kernel code needs:
 * - a call to a static function of another file: override_release()
 *   (kernel/sys.c, handles the UNAME26 personality);
 * - a read of a static variable: uts_kern_table (kernel/utsname_sysctl.c),
 *   the sysctl table behind /proc/sys/kernel/osrelease, whose "osrelease"
 *   entry gives the longest release the kernel accepts. If the table were
 *   linked to the wrong address the entry would not be found and the
 *   suffix would be missing, so the guest sees the static data was reached.
 *
 * User copies go through the out-of-line _copy_to_user(), so the object has
 * no exception-table entries.
 */
#include <linux/compat.h>
#include <linux/personality.h>
#include <linux/ptrace.h>
#include <linux/rwsem.h>
#include <linux/string.h>
#include <linux/sysctl.h>
#include <linux/uaccess.h>
#include <linux/utsname.h>

/* Statics of the running kernel, resolved by lucos against vmlinux. */
extern int override_release(char __user *release, size_t len);
extern struct ctl_table uts_kern_table[];

#define LUCOS_SUFFIX "+lucos"

/* As in kernel/sys.c. */
#ifdef COMPAT_UTS_MACHINE
#define override_architecture(name) \
	(personality(current->personality) == PER_LINUX32 && \
	 copy_to_user(name->machine, COMPAT_UTS_MACHINE, \
		      sizeof(COMPAT_UTS_MACHINE)))
#else
#define override_architecture(name)	0
#endif

/* Room for the release as declared by its sysctl (0: not found). */
static size_t lucos_release_room(void)
{
	struct ctl_table *t;

	for (t = uts_kern_table; t->procname; t++)
		if (!strcmp(t->procname, "osrelease"))
			return t->maxlen;
	return 0;
}

long lucos_x64_sys_newuname(const struct pt_regs *regs);

long lucos_x64_sys_newuname(const struct pt_regs *regs)
{
	struct new_utsname __user *name = (struct new_utsname __user *)regs->di;
	struct new_utsname tmp;
	size_t room, len;

	down_read(&uts_sem);
	memcpy(&tmp, utsname(), sizeof(tmp));
	up_read(&uts_sem);

	room = min(lucos_release_room(), sizeof(tmp.release));
	len = strnlen(tmp.release, sizeof(tmp.release));
	if (len + sizeof(LUCOS_SUFFIX) <= room)
		memcpy(tmp.release + len, LUCOS_SUFFIX, sizeof(LUCOS_SUFFIX));

	if (copy_to_user(name, &tmp, sizeof(tmp)))
		return -EFAULT;

	if (override_release(name->release, sizeof(name->release)))
		return -EFAULT;
	if (override_architecture(name))
		return -EFAULT;
	return 0;
}
