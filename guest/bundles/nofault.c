// SPDX-License-Identifier: GPL-2.0
/*
 * lucos test bundle with an exception-table entry (__ex_table): a load that
 * is allowed to fault. lucos hands the entry to the running kernel through
 * the bundle's struct module, so the kernel's page-fault handler finds the
 * fixup and the read of /proc/cmdline goes on instead of oopsing.
 *
 * __get_kernel_nofault() is the inline load with an _ASM_EXTABLE fixup that
 * mm/maccess.c is built on. (get_user() and get_kernel_nofault() would not
 * do: on x86 6.1 they call out-of-line helpers whose fixups live in vmlinux.)
 * The load from address 16 (the unmapped first page) always faults; the
 * fixup path prints "lucos-nofault fixed-up" before the command line.
 */
#include <linux/init.h>
#include <linux/seq_file.h>
#include <linux/uaccess.h>

int lucos_nofault_cmdline_proc_show(struct seq_file *m, void *v);

int lucos_nofault_cmdline_proc_show(struct seq_file *m, void *v)
{
	const char *nowhere = (const char *)16;
	char first;

	pagefault_disable();
	__get_kernel_nofault(&first, nowhere, char, fault);
	pagefault_enable();
	seq_printf(m, "lucos-nofault read %c %s\n", first, saved_command_line);
	return 0;
fault:
	pagefault_enable();
	seq_printf(m, "lucos-nofault fixed-up %s\n", saved_command_line);
	return 0;
}
