use lucos_patch::{check_fentry_site, jmp_rel32, LinkError, SiteError, SiteKind, NOP5};

const SITE: u64 = 0xffff_ffff_8123_4560;

#[test]
fn nop_and_jmp_are_accepted() {
    assert_eq!(check_fentry_site(&NOP5, SITE), Ok(SiteKind::Nop));
    let mut longer = NOP5.to_vec();
    longer.extend_from_slice(&[0x55, 0x48, 0x89, 0xe5]);
    assert_eq!(check_fentry_site(&longer, SITE), Ok(SiteKind::Nop));

    let target = 0xffff_ffff_c000_1000;
    let jmp = jmp_rel32(SITE, target).unwrap();
    assert_eq!(jmp[0], 0xe9);
    assert_eq!(jmp[1..], ((target - (SITE + 5)) as i32).to_le_bytes());
    assert_eq!(check_fentry_site(&jmp, SITE), Ok(SiteKind::Jmp { target }));
    // Backwards jump.
    let back = jmp_rel32(SITE, SITE - 0x1000).unwrap();
    assert_eq!(back, [0xe9, 0xfb, 0xef, 0xff, 0xff]);
    assert_eq!(
        check_fentry_site(&back, SITE),
        Ok(SiteKind::Jmp {
            target: SITE - 0x1000
        })
    );
}

#[test]
fn jmp_range() {
    // rel32 == i32::MAX and i32::MIN are the limits.
    assert!(jmp_rel32(SITE, (SITE + 5).wrapping_add(i32::MAX as u64)).is_ok());
    assert!(jmp_rel32(SITE, (SITE + 5).wrapping_sub(1 << 31)).is_ok());
    let far = (SITE + 5).wrapping_add(1 << 31);
    let e = jmp_rel32(SITE, far).unwrap_err();
    assert!(
        matches!(e, LinkError::JumpOutOfRange { site, target } if site == SITE && target == far),
        "{e}"
    );
    assert!(jmp_rel32(SITE, 0xffff_c900_0000_0000).is_err());
}

#[test]
fn foreign_sites_are_reported() {
    // ftrace's call to its trampoline.
    let e = check_fentry_site(&[0xe8, 0x10, 0x20, 0x30, 0x40], SITE).unwrap_err();
    assert!(matches!(e, SiteError::FtraceOwned { .. }), "{e}");
    assert!(e.to_string().contains("ftrace"), "{e}");
    // A kprobe's int3 over the first byte.
    let e = check_fentry_site(&[0xcc, 0x1f, 0x44, 0x00, 0x00], SITE).unwrap_err();
    assert_eq!(e, SiteError::Breakpoint { ip: SITE });
    // A still-unconverted or foreign instruction sequence.
    for bytes in [
        &[0x55, 0x48, 0x89, 0xe5, 0x41][..], // push rbp; ...
        &[0x66, 0x66, 0x66, 0x66, 0x90],     // other 5-byte NOP encoding
        &[0x0f, 0x1f, 0x40, 0x00, 0x90],     // 4-byte NOP + nop
        &[0xe9, 0x00, 0x00, 0x00],           // truncated
        &[0x0f, 0x0b, 0x00, 0x00, 0x00],     // ud2
    ] {
        let e = check_fentry_site(bytes, SITE).unwrap_err();
        assert!(
            matches!(e, SiteError::Unexpected { .. } | SiteError::TooShort { .. }),
            "{bytes:02x?}: {e}"
        );
    }
    // A jmp rel32 whose bytes continue into a longer instruction is still one 5-byte jmp;
    // but a 2-byte jmp rel8 is not a site.
    let e = check_fentry_site(&[0xeb, 0x03, 0x90, 0x90, 0x90], SITE).unwrap_err();
    assert!(matches!(e, SiteError::Unexpected { .. }), "{e}");
}
