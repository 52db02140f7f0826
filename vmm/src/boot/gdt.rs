//! Global descriptor table entries for the boot vCPU and their KVM segment
//! form. The bit layout is the architecture's (Intel SDM vol. 3, 3.4.5).

use kvm_bindings::kvm_segment;

/// Flags of the descriptors we use (access byte in bits 0-7, G/DB/L/AVL in
/// bits 12-15).
pub const CODE64: u16 = 0xa09b; // present, ring 0, execute/read, L=1, G=1
pub const CODE32: u16 = 0xc09b; // present, ring 0, execute/read, D=1, G=1
pub const DATA: u16 = 0xc093; // present, ring 0, read/write, B=1, G=1
pub const TSS64: u16 = 0x808b; // present, busy 64-bit TSS, G=1
pub const TSS32: u16 = 0x008b; // present, busy TSS, byte granular

/// Builds one 8-byte descriptor.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

fn bits(entry: u64, shift: u32, width: u32) -> u8 {
    // Every field decoded here is at most 4 bits wide.
    ((entry >> shift) & ((1 << width) - 1)) as u8
}

/// The segment register value KVM expects for the descriptor `entry` at
/// GDT index `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff);
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let granular = bits(entry, 55, 1);
    let present = bits(entry, 47, 1);
    kvm_segment {
        base,
        limit: if granular == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: bits(entry, 40, 4),
        present,
        dpl: bits(entry, 45, 2),
        db: bits(entry, 54, 1),
        s: bits(entry, 44, 1),
        l: bits(entry, 53, 1),
        g: granular,
        avl: bits(entry, 52, 1),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_segment_is_long_mode_ring0() {
        let seg = segment_from_gdt(gdt_entry(CODE64, 0, 0xfffff), 1);
        assert_eq!(seg.selector, 8);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.db, 0);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.dpl, 0);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn segment_roundtrips_base_and_limit() {
        let seg = segment_from_gdt(gdt_entry(TSS32, 0x1234_5678, 0x67), 3);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0x67);
        assert_eq!(seg.g, 0);
        assert_eq!(seg.selector, 24);
    }

    #[test]
    fn null_descriptor_is_unusable() {
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }
}
