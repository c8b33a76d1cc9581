//! Proof that a refused apply left the guest as it was.

use lucos::patchcmd::apply_bundle;
use lucos_introspect::{GuestPhysAddr, GuestVirtAddr, Machine, PhysMem};
use lucos_patch::Bundle;
use sha2::{Digest, Sha256};

use super::Shared;

/// Everything a refused or failed apply must leave byte-identical: the
/// whole kernel text (sites included), all of patch memory, and the page
/// directory lucos hangs its page tables into.
pub fn guest_hash(s: &mut Shared) -> [u8; 32] {
    let a = &mut s.a;
    let mut h = Sha256::new();
    let text_len = (a.layout.text_end - a.layout.text_start) as usize;
    let mut buf = vec![0u8; text_len];
    a.vm.read_phys(GuestPhysAddr(a.layout.phys_text), &mut buf)
        .unwrap();
    h.update(&buf);
    let w = a.vm.patch_window().unwrap();
    let mut pm = vec![0u8; w.size as usize];
    a.vm.read_phys(GuestPhysAddr(w.gpa), &mut pm).unwrap();
    h.update(&pm);
    // The kernel-image page directory, where a first apply hangs lucos's tables.
    let walk =
        lucos_introspect::walk(&a.vm, a.layout.cr3, GuestVirtAddr(0xffff_ffff_8000_0000)).unwrap();
    let pd = walk
        .entry(lucos_introspect::Level::Pd)
        .unwrap()
        .entry_pa
        .align_down(0x1000);
    let mut page = vec![0u8; 4096];
    a.vm.read_phys(pd, &mut page).unwrap();
    h.update(&page);
    h.finalize().into()
}

pub fn expect_refusal(s: &mut Shared, bundle: &Bundle, needle: &str) -> String {
    let before = guest_hash(s);
    let err = apply_bundle(&mut s.a, bundle).expect_err("apply must be refused");
    let text = format!("{err:#}");
    assert!(
        text.contains(needle),
        "error should mention '{needle}': {text}"
    );
    assert_eq!(
        guest_hash(s),
        before,
        "a refused apply changed guest memory: {text}"
    );
    assert!(!s.a.vm.is_paused().unwrap(), "VM left paused after: {text}");
    text
}
