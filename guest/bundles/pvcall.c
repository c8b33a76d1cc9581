// SPDX-License-Identifier: GPL-2.0
/*
 * lucos test bundle: new code with paravirt sites (local_irq_save/restore) and
 * static calls (preempt_enable() calls the preempt_schedule trampoline under
 * PREEMPT_DYNAMIC). Their patch-site tables are dropped; the code must still
 * run correctly: /proc/cmdline reads "lucos-pv irqs-were-on=1 irqs-off-inside=1 <cmdline>".
 */
#include <linux/irqflags.h>
#include <linux/preempt.h>
#include <linux/init.h>
#include <linux/seq_file.h>

int lucos_pv_cmdline_proc_show(struct seq_file *m, void *v);

int lucos_pv_cmdline_proc_show(struct seq_file *m, void *v)
{
	unsigned long flags;
	int was_on, off_inside;

	was_on = !irqs_disabled();
	preempt_disable();
	local_irq_save(flags);
	off_inside = irqs_disabled();
	local_irq_restore(flags);
	preempt_enable();
	seq_printf(m, "lucos-pv irqs-were-on=%d irqs-off-inside=%d ", was_on, off_inside);
	seq_puts(m, saved_command_line);
	seq_putc(m, '\n');
	return 0;
}
