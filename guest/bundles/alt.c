// SPDX-License-Identifier: GPL-2.0
/*
 * lucos test bundle: CPU-feature alternatives in new code. /proc/cmdline shows
 * which variant of each alternative the linked code runs:
 *   lucos-alt always=2 sse2=<1|2> avx2=<1|2> not_always=1 call=20 cpu_has_sse2=<0|1> cpu_has_avx2=<0|1>
 * where 2 (or 20) is the replacement; sse2 and avx2 follow the guest CPU's
 * flags (/proc/cpuinfo), exactly as the kernel's apply_alternatives() would.
 */
#include <linux/compiler.h>
#include <linux/seq_file.h>
#include <asm/alternative.h>
#include <asm/asm.h>
#include <asm/cpufeature.h>
#include <asm/cpufeatures.h>

int lucos_alt_ten(void);
int lucos_alt_twenty(void);
int lucos_alt_cmdline_proc_show(struct seq_file *m, void *v);

noinline int lucos_alt_ten(void)
{
	return 10;
}

noinline int lucos_alt_twenty(void)
{
	return 20;
}

#define PICK(feature, out) \
	asm volatile(ALTERNATIVE("mov $1, %0", "mov $2, %0", feature) : "=r"(out))

int lucos_alt_cmdline_proc_show(struct seq_file *m, void *v)
{
	unsigned long always, sse2, avx2, not_always;
	int call;

	PICK(X86_FEATURE_ALWAYS, always);
	PICK(X86_FEATURE_XMM2, sse2);
	PICK(X86_FEATURE_AVX2, avx2);
	PICK(ALT_NOT(X86_FEATURE_ALWAYS), not_always);
	/* A call in the replacement: its displacement must follow it to the original. */
	asm volatile(ALTERNATIVE("call lucos_alt_ten", "call lucos_alt_twenty",
				 X86_FEATURE_ALWAYS)
		     : "=a"(call), ASM_CALL_CONSTRAINT
		     :
		     : "rdi", "rsi", "rdx", "rcx", "r8", "r9", "r10", "r11", "memory");
	seq_printf(m, "lucos-alt always=%lu sse2=%lu avx2=%lu not_always=%lu call=%d "
		   "cpu_has_sse2=%d cpu_has_avx2=%d\n",
		   always, sse2, avx2, not_always, call,
		   static_cpu_has(X86_FEATURE_XMM2) ? 1 : 0,
		   static_cpu_has(X86_FEATURE_AVX2) ? 1 : 0);
	return 0;
}
