// SPDX-License-Identifier: GPL-2.0
/*
 * lucos test bundle for a loaded module: /proc/sys/fs/binfmt_misc/status says
 * "lucos-enabled" (or "lucos-disabled").
 *
 * Replaces bm_status_read() of the binfmt_misc module (fs/binfmt_misc.c) and
 * reads the module's own static `enabled`, which lucos resolves in the live
 * module's symbol table.
 */
#include <linux/fs.h>
#include <linux/string.h>

extern int enabled;

ssize_t lucos_bm_status_read(struct file *file, char __user *buf, size_t nbytes,
			     loff_t *ppos);

ssize_t lucos_bm_status_read(struct file *file, char __user *buf, size_t nbytes,
			     loff_t *ppos)
{
	char *s = enabled ? "lucos-enabled\n" : "lucos-disabled\n";

	return simple_read_from_buffer(buf, nbytes, ppos, s, strlen(s));
}
