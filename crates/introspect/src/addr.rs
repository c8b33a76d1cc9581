//! Guest address newtypes.
//!
//! lucos juggles two address spaces of the same width: guest-physical (what
//! the VMM reads and writes) and guest-virtual (what the kernel's code and
//! symbols use, resolved through the page tables). Both used to be bare `u64`,
//! and a PA passed where a VA was expected (or the reverse) compiles and reads
//! the wrong memory silently. These types, like vm-memory's `GuestAddress`,
//! make that a type error. Serialized records keep plain numbers: both types
//! serialize as their `u64` and converting happens at the edges.

use std::fmt;
use std::ops::Add;

use serde::Serialize;

macro_rules! guest_addr {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
        #[serde(transparent)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The bare number, for arithmetic on bits, wire formats and records.
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// `None` when the sum passes the end of the address space.
            pub fn checked_add(self, off: u64) -> Option<Self> {
                self.0.checked_add(off).map(Self)
            }

            pub const fn wrapping_add(self, off: u64) -> Self {
                Self(self.0.wrapping_add(off))
            }

            /// Bytes from `base` up to `self`; `None` when `self` lies below `base`.
            pub fn offset_from(self, base: Self) -> Option<u64> {
                self.0.checked_sub(base.0)
            }

            /// `self` rounded down to a multiple of `align` (a power of two).
            pub const fn align_down(self, align: u64) -> Self {
                Self(self.0 & !(align - 1))
            }
        }

        /// Panics on overflow in debug builds, like `u64` addition: an address
        /// past the end of the space is a bug, not a value to wrap to.
        impl Add<u64> for $name {
            type Output = Self;
            fn add(self, off: u64) -> Self {
                Self(self.0 + off)
            }
        }

        impl From<$name> for u64 {
            fn from(a: $name) -> u64 {
                a.0
            }
        }

        /// Prints `0x…`, the form every lucos message uses for addresses.
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        /// Formats like `u64`'s, so `{:#x}` and `{:016x}` keep their meaning.
        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

guest_addr!(
    /// A guest-physical address: what [`crate::PhysMem`] reads and
    /// [`crate::Machine`] writes.
    GuestPhysAddr
);

guest_addr!(
    /// A guest-virtual address: meaningful only with the CR3 it is walked
    /// through (see [`crate::paging`]).
    GuestVirtAddr
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_and_printing() {
        let a = GuestPhysAddr(0x1000);
        assert_eq!((a + 0x10).raw(), 0x1010);
        assert_eq!(a.checked_add(u64::MAX), None);
        assert_eq!(GuestPhysAddr(u64::MAX).wrapping_add(2), GuestPhysAddr(1));
        assert_eq!(GuestPhysAddr(0x1010).offset_from(a), Some(0x10));
        assert_eq!(a.offset_from(GuestPhysAddr(0x1010)), None);
        assert_eq!(
            GuestVirtAddr(0x1fff).align_down(0x1000),
            GuestVirtAddr(0x1000)
        );
        assert_eq!(a.to_string(), "0x1000");
        assert_eq!(format!("{:#x} {:x}", a, a), "0x1000 1000");
        assert_eq!(serde_json::to_string(&GuestVirtAddr(5)).unwrap(), "5");
    }
}
