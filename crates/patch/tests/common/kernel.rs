//! A fake kernel that bundles really apply to: a linked image (with a build id) of three
//! functions starting with an fentry NOP5, one without (`old_lucos_f4`, redirected at its
//! entry), a read-only ops table and `page_offset_base`,
//! mapped like Linux maps its image, in a running [`FakeMachine`] with empty patch memory.

use std::process::Command;

use lucos_introspect::fake::{FakeMachine, FakeMem};
use lucos_introspect::paging::{PRESENT, RW};
use lucos_introspect::{KernelLayout, KernelSymbols, Machine, PageSize};
use lucos_patch::{pack, signing, Bundle, EngineError, Rewrite, Session, TrustStore};

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

impl FakeKernel {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k.S"), KERNEL_S).unwrap();
        run(Command::new("gcc")
            .current_dir(dir.path())
            .args(["-c", "k.S", "-o", "k.o"]));
        run(Command::new("gcc").current_dir(dir.path()).args([
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--build-id=sha1",
            "-Wl,-e,0",
            &format!("-Wl,-Ttext-segment={IMAGE:#x}"),
            "-o",
            "vmlinux",
            "k.o",
        ]));
        let syms = KernelSymbols::load(dir.path().join("vmlinux")).unwrap();
        let addr = |n: &str| syms.lookup(n).unwrap().addr;
        let mut mem = FakeMem::new();
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
            });
        }
        let signed = signing::sign(&pack(&self.object, &man).unwrap(), &self.key);
        Bundle::open(&signed, &self.trust).unwrap()
    }
}
