//! Shared harness for VM integration tests: one booted guest per test
//! binary (tests lock it in turn), at most one extra VM at a time, and no
//! QEMU left behind even when tests fail (PDEATHSIG + exit hook + Drop).

#![allow(dead_code)]

pub mod refusal;

use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use lucos::guest::{self, Guest};
use lucos::harness::{self, Booted};
use lucos::info::{attach_vm, Attached};
use lucos::run::VmOpts;
use lucos_backend::{RunningVm, Vm};

pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// This test process's own signing key and trust store, through the variables `lucos`
/// reads (inherited by the `lucos` processes tests start): bundles are signed and checked
/// as in real use, never bypassed, and the user's own key is not touched.
pub fn signing_env() {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        std::env::set_var("LUCOS_SIGNING_KEY", d.path().join("signing.key"));
        std::env::set_var("LUCOS_TRUST_DIR", d.path().join("trusted"));
        d
    });
}

/// Signs `bytes` with the test key, writes them to [`bundle_path`] and opens the file as
/// `lucos apply` does.
pub fn sign_and_store(bytes: &[u8]) -> lucos_patch::Bundle {
    signing_env();
    let id = lucos_patch::Bundle::parse(bytes)
        .unwrap()
        .manifest()
        .id
        .clone();
    let path = bundle_path(&id);
    std::fs::write(&path, lucos::signing::sign(bytes).unwrap()).unwrap();
    lucos::patchcmd::load_bundle(&path).unwrap()
}

pub fn guest() -> &'static Guest {
    signing_env();
    static G: OnceLock<Guest> = OnceLock::new();
    G.get_or_init(|| {
        // Every VM the tests attach to is guarded, as the lucos binary's are.
        lucos_backend::guard::enable(
            env!("CARGO_BIN_EXE_lucos").into(),
            lucos_backend::guard::DEFAULT_DEADLINE,
        );
        guest::GuestSel::default()
            .ensure()
            .expect("guest build (run scripts/test.sh)")
    })
}

pub fn opts(tag: &str, vcpus: usize) -> VmOpts {
    VmOpts {
        name: format!("test-{}-{tag}", std::process::id()),
        vcpus,
        mem: 256,
        patch_mem: 16,
        accel: "tcg".into(),
        guest: guest::GuestSel::default(),
        append: String::new(),
        qemu: "qemu-system-x86_64".into(),
    }
}

pub struct Shared {
    pub booted: Booted,
    pub a: Attached,
}

impl Shared {
    /// Runs a guest shell command, expecting success; returns its output.
    pub fn sh(&self, cmd: &str) -> String {
        let out = self
            .booted
            .console
            .run(cmd, CMD_TIMEOUT)
            .unwrap_or_else(|e| panic!("`{cmd}`: {e}"));
        assert_eq!(out.status, 0, "`{cmd}` failed: {}", out.output);
        out.output
    }
}

/// The test binary's shared 2-vCPU guest, booted on first use.
pub fn shared() -> MutexGuard<'static, Shared> {
    static S: OnceLock<Mutex<Shared>> = OnceLock::new();
    let m = S.get_or_init(|| {
        let booted = harness::boot_for_process(&opts("shared", 2), guest())
            .expect("booting the shared guest");
        eprintln!(
            "shared guest booted in {:.2} s",
            booted.boot_time.as_secs_f64()
        );
        let vm = Vm::attach_desc(booted.desc.clone()).expect("attach");
        let a = attach_vm(vm).expect("attach: symbols + KASLR");
        Mutex::new(Shared { booted, a })
    });
    // A failed test poisons the lock; the guest itself is still usable.
    let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
    // Each test starts from an unpatched kernel, whatever the last one left.
    let applied: Vec<String> = lucos::patchcmd::session(&mut s.a)
        .and_then(|sess| Ok(sess.registry()?))
        .map(|r| r.applied().map(|b| b.id.clone()).collect())
        .unwrap_or_default();
    for id in applied.iter().rev() {
        lucos::patchcmd::revert_bundle(&mut s.a, id).unwrap_or_else(|e| panic!("resetting: {e:#}"));
    }
    s
}

/// `lucos reset` on an attached VM.
pub fn reset(a: &mut Attached) -> Result<lucos_patch::ResetReport, lucos_patch::EngineError> {
    let w = a.vm.patch_window().unwrap();
    let pob = lucos_patch::page_offset_base(&a.vm, &a.syms, &a.layout)?;
    lucos_patch::reset_registry(&mut a.vm, (a.layout.cr3, pob), w.gpa, w.size)
}

/// The one slot for a VM besides the shared guest.
pub fn private_slot() -> MutexGuard<'static, ()> {
    static SLOT: Mutex<()> = Mutex::new(());
    SLOT.lock().unwrap_or_else(|p| p.into_inner())
}

/// A private VM for tests that need their own configuration; at most one
/// at a time per process so that no more than two VMs ever run.
pub fn private(tag: &str, vcpus: usize) -> (MutexGuard<'static, ()>, RunningVm, Booted) {
    let slot = private_slot();
    let (vm, booted) = harness::boot(&opts(tag, vcpus), guest()).expect("booting a private guest");
    (slot, vm, booted)
}

/// Where a test bundle (signed) is written, by its id.
pub fn bundle_path(id: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("lucos-test-{}-{id}.lcb", std::process::id()))
}

/// Builds (once per process) the test bundle guest/bundles/<name>.json.
pub fn bundle(name: &str) -> lucos_patch::Bundle {
    static CACHE: Mutex<Vec<(String, Vec<u8>)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, b)) = cache.iter().find(|(n, _)| n == name) {
        return sign_and_store(b);
    }
    let g = guest();
    let spec = lucos::guest::guest_dir()
        .join("bundles")
        .join(format!("{name}.json"));
    let syms = symbols();
    let bytes = lucos_diffobj::make_from_spec_file(&g.kernel_dir, &spec, syms)
        .unwrap_or_else(|e| panic!("building {}: {e}", spec.display()));
    let b = sign_and_store(&bytes);
    cache.push((name.to_owned(), bytes));
    b
}

pub fn symbols() -> &'static lucos_introspect::KernelSymbols {
    static S: OnceLock<lucos_introspect::KernelSymbols> = OnceLock::new();
    S.get_or_init(|| lucos_introspect::KernelSymbols::load(&guest().vmlinux).unwrap())
}

pub const UNKNOWN_SYMBOL: &str = r#"
#include <linux/seq_file.h>
extern int lucos_no_such_symbol(void);
int lucos_snip_cmdline(struct seq_file *m, void *v)
{
	seq_printf(m, "%d\n", lucos_no_such_symbol());
	return 0;
}
"#;

/// A 32-bit zero-extended reference to a kernel address cannot be linked.
pub const RELOC_OVERFLOW: &str = r#"
#include <linux/seq_file.h>
asm(".pushsection .data.lucos_snip,\"aw\"\n lucos_abs32: .long jiffies_64\n .popsection");
int lucos_snip_cmdline(struct seq_file *m, void *v)
{
	seq_puts(m, "x\n");
	return 0;
}
"#;

/// More .bss than patch memory holds.
pub const TOO_BIG: &str = r#"
#include <linux/seq_file.h>
char lucos_big[32 << 20];
int lucos_snip_cmdline(struct seq_file *m, void *v)
{
	lucos_big[m->count] = 1;
	seq_printf(m, "%d\n", lucos_big[m->size]);
	return 0;
}
"#;

/// A bundle replacing cmdline_proc_show with `lucos_snip_cmdline` from a C
/// snippet, packed without lucos-diffobj's own checks (apply must catch what
/// a careless or hostile bundle maker lets through).
pub fn snippet_bundle(id: &str, source: &str) -> lucos_patch::Bundle {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join(format!("{}.c", id.replace('-', "_")));
    std::fs::write(&src, source).unwrap();
    let g = guest();
    let obj = lucos_diffobj::kbuild::compile(
        &lucos_diffobj::KernelTree::open(&g.kernel_dir).unwrap().root,
        &[src],
    )
    .unwrap_or_else(|e| panic!("compiling snippet {id}: {e}"));
    let syms = symbols();
    let release = lucos_diffobj::kernel_release(&g.kernel_dir).unwrap();
    let manifest = lucos_patch::Manifest {
        format: lucos_patch::FORMAT_VERSION,
        id: id.to_owned(),
        description: format!("test snippet {id}"),
        target: lucos_diffobj::target_for(syms, &release).unwrap(),
        replacements: vec![lucos_diffobj::replacement_for(
            syms,
            "cmdline_proc_show",
            "lucos_snip_cmdline",
        )
        .unwrap()],
        resolve: Default::default(),
        aliases: Default::default(),
        rewrites: Vec::new(),
        frame_types: Vec::new(),
        exports: Vec::new(),
        zeroed: Vec::new(),
        prototypes: Vec::new(),
    };
    sign_and_store(&lucos_patch::pack(&obj, &manifest).unwrap())
}

/// Repacks a bundle (built by [`bundle`]) with an edited manifest.
pub fn with_manifest(
    b: &lucos_patch::Bundle,
    edit: impl FnOnce(&mut lucos_patch::Manifest),
) -> lucos_patch::Bundle {
    let mut m = b.manifest().clone();
    edit(&mut m);
    let obj = std::fs::read(bundle_path(&b.manifest().id)).unwrap();
    sign_and_store(&lucos_patch::pack(&obj, &m).unwrap())
}

/// Builds (once per process) a bundle from a sample diff in guest/patches.
pub fn diff_bundle(patch: &str) -> lucos_patch::Bundle {
    static CACHE: Mutex<Vec<(String, Vec<u8>)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, b)) = cache.iter().find(|(n, _)| n == patch) {
        return sign_and_store(b);
    }
    let path = lucos::guest::guest_dir().join("patches").join(patch);
    let outcome = lucos_diffobj::diff::build(
        &guest().kernel_dir,
        &path,
        &lucos_diffobj::diff::BuildOptions::default(),
        &lucos_diffobj::diff::NoProgress,
    )
    .unwrap_or_else(|e| panic!("{patch}: {e}"));
    let lucos_diffobj::diff::BuildOutcome::Bundle(b) = outcome else {
        panic!("{patch}: no bundle");
    };
    cache.push((patch.to_owned(), b.bundle.clone()));
    sign_and_store(&b.bundle)
}
