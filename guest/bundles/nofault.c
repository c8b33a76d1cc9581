// SPDX-License-Identifier: GPL-2.0
/*
 * lucos test bundle that must be REFUSED: its code has an exception-table
 * entry (__ex_table), which lucos does not register with the running kernel,
 * so a fault at that load would oops instead of being fixed up.
 *
 * __get_kernel_nofault() is the inline load with an _ASM_EXTABLE fixup that
 * mm/maccess.c is built on. (get_user() and get_kernel_nofault() would not
 * do: on x86 6.1 they call out-of-line helpers whose fixups live in vmlinux,
 * and user_access_begin() adds .altinstructions too, which would blur which
 * section the refusal names.) Were it ever applied, /proc/cmdline would
 * start with "lucos-bad-extable".
 */
#include <linux/init.h>
#include <linux/seq_file.h>
#include <linux/uaccess.h>

int lucos_bad_extable_cmdline_proc_show(struct seq_file *m, void *v);

int lucos_bad_extable_cmdline_proc_show(struct seq_file *m, void *v)
{
	char first;

	pagefault_disable();
	__get_kernel_nofault(&first, saved_command_line, char, fault);
	pagefault_enable();
	seq_printf(m, "lucos-bad-extable %c %s\n", first, saved_command_line);
	return 0;
fault:
	pagefault_enable();
	seq_puts(m, "lucos-bad-extable fault\n");
	return 0;
}
