// SPDX-License-Identifier: GPL-2.0
/*
 * lucos bench bundle: the body of guest/livepatch/livepatch-cmdline.c's
 * replacement, so lucos and livepatch are compared on the same new code.
 */
#include <linux/seq_file.h>

int lucos_lp_cmdline_proc_show(struct seq_file *m, void *v);

int lucos_lp_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s\n", "this has been live patched");
	return 0;
}
