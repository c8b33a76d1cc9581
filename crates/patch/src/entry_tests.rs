use super::*;

const AT: u64 = 0xffff_ffff_8110_0000;

/// push rbp; mov rbp,rsp; push r12; xor eax,eax; pop r12; pop rbp; ret
fn plain() -> Vec<u8> {
    vec![
        0x55, 0x48, 0x89, 0xe5, 0x41, 0x54, 0x31, 0xc0, 0x41, 0x5c, 0x5d, 0xc3,
    ]
}

fn check(code: &[u8]) -> Result<EntryWindow, EntryError> {
    check_window(code, AT, &[], &KernelTables::default())
}

/// `jmp rel32` at `at` (offset in the code) to offset `to`.
fn jmp_to(at: usize, to: usize) -> Vec<u8> {
    let rel = to as i64 - (at as i64 + 5);
    let mut v = vec![0xe9];
    v.extend((rel as i32).to_le_bytes());
    v
}

#[test]
fn a_prologue_gives_a_window_of_whole_instructions() {
    let w = check(&plain()).unwrap();
    assert_eq!((w.site_offset, w.end, w.single), (0, 6, false));
    let mut ibt = ENDBR64.to_vec();
    ibt.extend(plain());
    let w = check(&ibt).unwrap();
    assert_eq!((w.site_offset, w.end, w.single), (4, 10, false));
}

#[test]
fn one_five_byte_instruction_needs_no_check_in_the_pause() {
    // mov eax, imm32; ret
    let w = check(&[0xb8, 1, 2, 3, 4, 0xc3]).unwrap();
    assert!(w.single);
    assert_eq!(w.end, 5);
}

#[test]
fn a_call_that_returns_inside_the_window_is_refused() {
    // call rax; ret
    let e = check(&[0xff, 0xd0, 0x31, 0xc0, 0x90, 0x90, 0xc3]).unwrap_err();
    assert!(matches!(e, EntryError::CallInWindow { at: AT, .. }), "{e}");
    // A call that ends at the window's end returns past the jmp: allowed.
    let mut code = vec![0xe8, 0, 0, 0, 0, 0xc3];
    assert!(check(&code).unwrap().single);
    code.insert(0, 0x90);
    assert!(check(&code).is_ok());
}

#[test]
fn traps_in_the_window_are_refused() {
    let e = check(&[0x31, 0xc0, 0x0f, 0x0b, 0x90, 0x90, 0xc3]).unwrap_err();
    assert!(
        matches!(e, EntryError::TrapInWindow { at, .. } if at == AT + 2),
        "{e}"
    );
    let e = check(&[0xcc, 0x90, 0x90, 0x90, 0x90, 0xc3]).unwrap_err();
    assert!(matches!(e, EntryError::TrapInWindow { .. }), "{e}");
}

#[test]
fn branches_into_the_window_are_refused_but_not_to_its_start() {
    let mut code = plain();
    code.pop();
    let at = code.len();
    code.extend(jmp_to(at, 2));
    let e = check(&code).unwrap_err();
    assert!(
        matches!(e, EntryError::BranchIntoWindow { from, to } if from == AT + at as u64 && to == AT + 2),
        "{e}"
    );
    // Back to the entry itself is a fresh call of the new function; past the window is old code.
    for ok in [0, 5, 6] {
        let mut code = plain();
        code.pop();
        let at = code.len();
        code.extend(jmp_to(at, ok));
        assert!(check(&code).is_ok(), "jmp to +{ok}");
    }
    // A short jcc into the window: jne -? from offset 12 to 1.
    let mut code = plain();
    code.extend([0x75, (1i32 - 14) as u8]);
    assert!(matches!(
        check(&code).unwrap_err(),
        EntryError::BranchIntoWindow { .. }
    ));
}

#[test]
fn a_cold_part_that_jumps_back_into_the_window_is_refused() {
    let cold_at = AT + 0x1000;
    let rel = (AT + 3) as i64 - (cold_at as i64 + 5);
    let mut cold = vec![0xe9];
    cold.extend((rel as i32).to_le_bytes());
    let e = check_window(&plain(), AT, &[(cold_at, cold)], &KernelTables::default()).unwrap_err();
    assert!(
        matches!(e, EntryError::BranchIntoWindow { from, .. } if from == cold_at),
        "{e}"
    );
}

#[test]
fn a_native_indirect_jump_is_refused() {
    let mut code = plain();
    code.pop();
    code.extend([0xff, 0xe0]);
    let e = check(&code).unwrap_err();
    assert!(matches!(e, EntryError::IndirectJump { .. }), "{e}");
}

#[test]
fn table_entries_in_the_window_are_refused() {
    for (off, bad) in [(0, true), (3, true), (5, true), (6, false)] {
        let t = KernelTables::new(vec![(AT + off, "jump label"), (AT - 1, "exception table")]);
        let r = check_window(&plain(), AT, &[], &t);
        match r {
            Err(EntryError::TableEntry { table, at }) => {
                assert!(bad, "+{off}");
                assert_eq!((table, at), ("jump label", AT + off));
            }
            Ok(_) => assert!(!bad, "+{off}"),
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn short_undecodable_or_long_entries_are_refused() {
    assert!(matches!(
        check(&[0x31, 0xc0, 0xc3]).unwrap_err(),
        EntryError::TooSmall { .. }
    ));
    assert!(matches!(
        check(&[0x31, 0xc0, 0x06, 0x90, 0x90, 0xc3]).unwrap_err(),
        EntryError::Decode { .. }
    ));
    // endbr64; 4 nops; movabs rax, imm64 (8..18): past the 16 expected bytes.
    let mut code = ENDBR64.to_vec();
    code.extend([0x90; 4]);
    code.extend([0x48, 0xb8, 1, 2, 3, 4, 5, 6, 7, 8, 0xc3]);
    assert!(matches!(
        check(&code).unwrap_err(),
        EntryError::WindowTooLong { len: 18, .. }
    ));
}

#[test]
fn a_patchable_entry_belongs_to_the_kernel() {
    let mut code = crate::NOP5.to_vec();
    code.push(0xc3);
    assert!(matches!(
        check(&code).unwrap_err(),
        EntryError::KernelPoked { .. }
    ));
}
