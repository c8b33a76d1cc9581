//! A fake kernel that bundles really apply to: a linked image (with a build id) of three
//! functions starting with an fentry NOP5, one without (`old_lucos_f4`, redirected at its
//! entry), a read-only ops table and `page_offset_base`,
//! mapped like Linux maps its image, in a running [`FakeMachine`] with empty patch memory.
//! [`FakeKernel::with_modules`] adds the module bookkeeping a bundle's `struct module` is
//! linked into (an empty module list, bug list and module tree, free mutexes) and the BTF
//! that describes it, so that applies there link a module inside the pause.

use std::process::Command;

use lucos_introspect::fake::{FakeMachine, FakeMem};
use lucos_introspect::paging::{PRESENT, RW};
use lucos_introspect::{KernelLayout, KernelSymbols, Machine, PageSize};
use lucos_patch::{pack, signing, Bundle, EngineError, Manifest, Rewrite, Session, TrustStore};

use super::fake::{GPA, SIZE};

const IMAGE: u64 = 0xffff_ffff_8100_0000;
const KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
pub const POB: u64 = 0xffff_8880_0000_0000;
/// Bytes of each old function: NOP5, push %rbp, pop %rbp, ret.
pub const OLD_CODE: [u8; 8] = [0x0f, 0x1f, 0x44, 0x00, 0x00, 0x55, 0x5d, 0xc3];
/// `old_lucos_f4`, which has no fentry site: push %rbp; mov %rsp,%rbp; pop %rbp; ret. The
/// entry jmp overwrites three instructions.
pub const ENTRY_CODE: [u8; 6] = [0x55, 0x48, 0x89, 0xe5, 0x5d, 0xc3];
pub const OPS: [u8; 16] = [0x11, 0x11, 0, 0, 0, 0, 0, 0, 0x22, 0x22, 0, 0, 0, 0, 0, 0];

const KERNEL_S: &str = r#"
	.text
	.globl _text
_text:
	.irp n, 1, 2, 3
	.balign 16
	.globl old_lucos_f\n
	.type old_lucos_f\n,@function
old_lucos_f\n:
	.byte 0x0f,0x1f,0x44,0x00,0x00
	push %rbp
	pop %rbp
	ret
	.size old_lucos_f\n, .-old_lucos_f\n
	.endr
	.balign 16
	.globl old_lucos_f4
	.type old_lucos_f4,@function
old_lucos_f4:
	push %rbp
	mov %rsp,%rbp
	pop %rbp
	ret
	.size old_lucos_f4, .-old_lucos_f4
	.globl _etext
_etext:
	.section .rodata
	.balign 64
	.globl ops_table
	.type ops_table,@object
ops_table:
	.quad 0x1111, 0x2222
	.size ops_table, 16
	.data
	.balign 8
	.globl page_offset_base
	.type page_offset_base,@object
page_offset_base:
	.quad 0xffff888000000000
	.size page_offset_base, 8
	.bss
	.globl _end
_end:
"#;

/// The kernel's module bookkeeping, laid out as Linux 6.1 lays it out (members lucos does
/// not use left out), compiled with `-gbtf` so that the BTF describes these very types.
const KMOD_C: &str = r#"
struct list_head { struct list_head *next, *prev; };
struct rb_node { unsigned long __rb_parent_color; struct rb_node *rb_right, *rb_left; };
struct rb_root { struct rb_node *rb_node; };
struct latch_tree_node { struct rb_node node[2]; };
typedef struct { unsigned int sequence; } seqcount_latch_t;
struct latch_tree_root { seqcount_latch_t seq; struct rb_root tree[2]; };
struct module;
struct mod_tree_node { struct module *mod; struct latch_tree_node node; };
struct module_layout {
	void *base; unsigned int size, text_size, ro_size, ro_after_init_size;
	struct mod_tree_node mtn;
};
struct mod_tree_root { struct latch_tree_root root; unsigned long addr_min, addr_max; };
struct mod_kallsyms { void *symtab; unsigned int num_symtab; char *strtab; char *typetab; };
struct mod_arch_specific { unsigned int num_orcs; int *orc_unwind_ip; void *orc_unwind; };
struct static_key { int enabled; union { unsigned long type; void *entries; void *next; }; };
struct static_key_mod { struct static_key_mod *next; void *entries; struct module *mod; };
typedef struct { long counter; } atomic_long_t;
struct mutex { atomic_long_t owner; int wait_lock; struct list_head wait_list; };
struct module {
	int state;
	struct list_head list;
	char name[56];
	unsigned char build_id[20];
	struct module_layout core_layout, init_layout;
	struct mod_arch_specific arch;
	unsigned long taints;
	unsigned int num_bugs;
	struct list_head bug_list;
	void *bug_table;
	struct mod_kallsyms *kallsyms;
	struct mod_kallsyms core_kallsyms;
	struct list_head source_list, target_list;
	struct { int counter; } refcnt;
	unsigned int num_exentries;
	void *extable;
	void *jump_entries;
	unsigned int num_jump_entries;
	const void *syms;
	const int *crcs;
	unsigned int num_syms;
	unsigned int num_gpl_syms;
	const void *gpl_syms;
	const int *gpl_crcs;
};
struct module_use {
	struct list_head source_list, target_list;
	struct module *source, *target;
};
struct list_head modules = { &modules, &modules };
struct list_head module_bug_list = { &module_bug_list, &module_bug_list };
struct mod_tree_root mod_tree = { .addr_min = -1UL };
struct mutex module_mutex = { .wait_list = { &module_mutex.wait_list, &module_mutex.wait_list } };
struct mutex jump_label_mutex = {
	.wait_list = { &jump_label_mutex.wait_list, &jump_label_mutex.wait_list }
};
/* Only so that the BTF has these types. */
struct module *lucos_module_type = 0;
struct static_key_mod *lucos_skm_type = 0;
struct static_key *lucos_key_type = 0;
struct module_use *lucos_use_type = 0;
"#;

/// The BTF of [`KMOD_C`] in the image, between the symbols the kernel's BTF has.
const BTF_S: &str = r#"
	.section .rodata.btf,"a"
	.globl __start_BTF
__start_BTF:
	.incbin "btf.bin"
	.globl __stop_BTF
__stop_BTF:
"#;

const BUNDLE_C: &str = "int lucos_f1(int x) { return x + 1; }\n\
int lucos_f2(int x) { return x + 2; }\n\
int lucos_f3(int x) { return x + 3; }\n\
int lucos_f4(int x) { return x + 4; }\n\
const long lucos_ops[2] = { 0x3333, 0x4444 };\n";

pub struct FakeKernel {
    pub syms: KernelSymbols,
    pub layout: KernelLayout,
    /// The guest before any apply, running.
    pub fresh: FakeMachine,
    trust: TrustStore,
    key: ed25519_dalek::SigningKey,
    object: Vec<u8>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The objects of the module bookkeeping in `dir`: the variables, and their BTF placed in
/// the image (extracted from the first object's `.BTF`, which gcc does not load).
fn kmod_objects(dir: &std::path::Path) -> [&'static str; 2] {
    std::fs::write(dir.join("kmod.c"), KMOD_C).unwrap();
    std::fs::write(dir.join("btf.S"), BTF_S).unwrap();
    run(Command::new("gcc").current_dir(dir).args([
        "-c",
        "-gbtf",
        "-fno-zero-initialized-in-bss",
        "kmod.c",
        "-o",
        "kmod.o",
    ]));
    run(Command::new("objcopy").current_dir(dir).args([
        "--dump-section",
        ".BTF=btf.bin",
        "kmod.o",
        "kmod.tmp",
    ]));
    run(Command::new("gcc")
        .current_dir(dir)
        .args(["-c", "btf.S", "-o", "btf.o"]));
    ["kmod.o", "btf.o"]
}

/// Every allocated section of the image at its physical address (slide 0), `.bss` as
/// zeros, so that the kernel's initialised variables hold their values.
fn load_image(mem: &mut FakeMem, vmlinux: &[u8]) {
    use object::{Object, ObjectSection, SectionFlags, SectionKind};
    let file = object::File::parse(vmlinux).unwrap();
    for sec in file.sections() {
        let alloc = match sec.flags() {
            SectionFlags::Elf { sh_flags } => sh_flags & u64::from(object::elf::SHF_ALLOC) != 0,
            _ => false,
        };
        if !alloc || sec.size() == 0 {
            continue;
        }
        let pa = sec.address() - KERNEL_MAP;
        match sec.kind() {
            SectionKind::UninitializedData => mem.write(pa, &vec![0u8; sec.size() as usize]),
            _ => mem.write(pa, sec.data().unwrap()),
        }
    }
}

impl FakeKernel {
    pub fn new() -> Self {
        Self::build(false)
    }

    /// A kernel with module bookkeeping: every bundle applied to it gets a `struct module`,
    /// linked into the kernel's lists and tree inside the pause.
    pub fn with_modules() -> Self {
        Self::build(true)
    }

    fn build(modules: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k.S"), KERNEL_S).unwrap();
        run(Command::new("gcc")
            .current_dir(dir.path())
            .args(["-c", "k.S", "-o", "k.o"]));
        let mut objects = vec!["k.o"];
        if modules {
            objects.extend(kmod_objects(dir.path()));
        }
        run(Command::new("gcc")
            .current_dir(dir.path())
            .args([
                "-nostdlib",
                "-static",
                "-no-pie",
                "-Wl,--build-id=sha1",
                "-Wl,-e,0",
                &format!("-Wl,-Ttext-segment={IMAGE:#x}"),
                "-o",
                "vmlinux",
            ])
            .args(&objects));
        let syms = KernelSymbols::load(dir.path().join("vmlinux")).unwrap();
        let addr = |n: &str| syms.lookup(n).unwrap().addr;
        let mut mem = FakeMem::new();
        if modules {
            load_image(
                &mut mem,
                &std::fs::read(dir.path().join("vmlinux")).unwrap(),
            );
        }
        let cr3 = mem.new_pml4();
        let end = addr("_end").next_multiple_of(2 << 20);
        let mut va = IMAGE & !((2 << 20) - 1);
        while va < end {
            mem.map(cr3, va, va - KERNEL_MAP, PageSize::Size2M, PRESENT | RW);
            va += 2 << 20;
        }
        for n in 1..=3 {
            mem.write(addr(&format!("old_lucos_f{n}")) - KERNEL_MAP, &OLD_CODE);
        }
        mem.write(addr("old_lucos_f4") - KERNEL_MAP, &ENTRY_CODE);
        mem.write(addr("ops_table") - KERNEL_MAP, &OPS);
        mem.write_u64(addr("page_offset_base") - KERNEL_MAP, POB);
        // The direct map already covers patch memory's first 2 MiB.
        mem.map(cr3, POB + GPA, GPA, PageSize::Size2M, PRESENT | RW);
        mem.write(GPA, &vec![0u8; SIZE as usize]);
        let layout = KernelLayout {
            slide: 0,
            cr3,
            text_start: addr("_text"),
            text_end: addr("_etext"),
            image_end: addr("_end"),
            phys_text: addr("_text") - KERNEL_MAP,
            phys_base: 0,
        };
        let mut fresh = FakeMachine::new(mem, 1);
        fresh.resume().unwrap();
        let (kdir, trust, key) = super::trusted_key();
        FakeKernel {
            syms,
            layout,
            fresh,
            trust,
            key,
            object: super::compile_c(BUNDLE_C, &[]),
            _dirs: (dir, kdir),
        }
    }

    /// Guest-physical address of a kernel symbol.
    pub fn pa(&self, name: &str) -> u64 {
        self.syms.lookup(name).unwrap().addr - KERNEL_MAP
    }

    pub fn session<'a, M: Machine + ?Sized>(
        &'a self,
        m: &'a mut M,
    ) -> Result<Session<'a, M>, EngineError> {
        Session::new(m, &self.syms, self.layout.clone(), GPA, SIZE)
    }

    /// A signed, opened bundle `id` replacing `old_<n>` by each `n` of `news`, and with
    /// `rewrite`, also rewriting `ops_table` to `lucos_ops`.
    pub fn bundle(&self, id: &str, news: &[&str], rewrite: bool) -> Bundle {
        self.bundle_with(id, news, rewrite, |_| {})
    }

    /// [`Self::bundle`] with its manifest edited by `edit` before it is signed.
    pub fn bundle_with(
        &self,
        id: &str,
        news: &[&str],
        rewrite: bool,
        edit: impl FnOnce(&mut Manifest),
    ) -> Bundle {
        let mut man = super::manifest(news);
        man.id = id.into();
        man.target.build_id = self.syms.build_id_hex().unwrap();
        for r in man.replacements.iter_mut().filter(|r| r.new == "lucos_f4") {
            r.no_fentry = true;
            r.expect = ENTRY_CODE.to_vec();
        }
        if rewrite {
            man.rewrites.push(Rewrite {
                old: "ops_table".into(),
                old_file: None,
                new: "lucos_ops".into(),
                expect: OPS.to_vec(),
                skip: Vec::new(),
                fields: Vec::new(),
            });
        }
        edit(&mut man);
        let signed = signing::sign(&pack(&self.object, &man).unwrap(), &self.key);
        Bundle::open(&signed, &self.trust).unwrap()
    }
}
