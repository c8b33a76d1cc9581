// SPDX-License-Identifier: GPL-2.0
/*
 * A module built against the kernel that sample 18 updates to: it links against
 * lucos_sample_answer, an export the running kernel gets only from the bundle's
 * module. Loading it proves the export is real; while it is loaded, the bundle
 * cannot be reverted.
 */
#include <linux/module.h>
#include <linux/printk.h>

int lucos_sample_answer(int x);

static int __init user_init(void)
{
	pr_info("lucos export user: %d\n", lucos_sample_answer(1));
	return 0;
}

static void __exit user_exit(void)
{
}

module_init(user_init);
module_exit(user_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("uses an export a lucos bundle adds");
