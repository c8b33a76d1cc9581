// SPDX-License-Identifier: GPL-2.0
/*
 * lucos test bundle: /proc/cmdline says "lucos-patched <command line>".
 *
 * Replaces the static cmdline_proc_show() of fs/proc/cmdline.c; the guest
 * probe's cmdline= field then starts with "lucos-patched ".
 */
#include <linux/init.h>
#include <linux/seq_file.h>

int lucos_cmdline_proc_show(struct seq_file *m, void *v);

int lucos_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_puts(m, "lucos-patched ");
	seq_puts(m, saved_command_line);
	seq_putc(m, '\n');
	return 0;
}
