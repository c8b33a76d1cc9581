// SPDX-License-Identifier: GPL-2.0
/*
 * lucos bench bundle: cmdline_proc_show() with the original body, so a read of
 * /proc/cmdline through it costs what the unpatched read costs plus only what
 * the redirection adds (the jmp at the old entry).
 */
#include <linux/init.h>
#include <linux/seq_file.h>

int lucos_same_cmdline_proc_show(struct seq_file *m, void *v);

int lucos_same_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_puts(m, saved_command_line);
	seq_putc(m, '\n');
	return 0;
}
