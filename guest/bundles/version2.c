// SPDX-License-Identifier: GPL-2.0
/*
 * lucos test bundle: /proc/version says "Linux version lucos-v2 <release> ...".
 *
 * A second bundle replacing version_proc_show() of fs/proc/version.c, to
 * be applied on top of version.c: the newest bundle wins, and reverting it
 * must bring back lucos-v1.
 */
#include <linux/seq_file.h>
#include <linux/utsname.h>

int lucos_version_proc_show_v2(struct seq_file *m, void *v);

int lucos_version_proc_show_v2(struct seq_file *m, void *v)
{
	seq_printf(m, "%s version lucos-v2 %s %s\n",
		   utsname()->sysname,
		   utsname()->release,
		   utsname()->version);
	return 0;
}
