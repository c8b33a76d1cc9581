// SPDX-License-Identifier: GPL-2.0
/*
 * lucos test bundle: /proc/version says "Linux version lucos-v1 <release> ...".
 *
 * Replaces the static version_proc_show() of fs/proc/version.c. version2.c
 * replaces it again with "lucos-v2", to test stacking bundles on one function.
 */
#include <linux/seq_file.h>
#include <linux/utsname.h>

int lucos_version_proc_show_v1(struct seq_file *m, void *v);

int lucos_version_proc_show_v1(struct seq_file *m, void *v)
{
	seq_printf(m, "%s version lucos-v1 %s %s\n",
		   utsname()->sysname,
		   utsname()->release,
		   utsname()->version);
	return 0;
}
