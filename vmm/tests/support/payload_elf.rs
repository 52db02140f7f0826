//! Tiny payloads packed as ELF "kernels", so the `cloister-vmm` binary
//! (not only the builder) boots them: shared by `tests/jail.rs` and
//! `examples/bench_jail.rs`.

/// Where the payload is loaded and entered: 1 MiB.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// Prints "hello from long mode" on COM1, resets through the i8042
/// (`HELLO_THEN_RESET` of kvm_payloads.rs).
pub const HELLO_THEN_RESET: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, //                  mov dx, 0x3f8
    0x48, 0x8d, 0x35, 0x17, 0x00, 0x00, 0x00, // lea rsi, [rip + msg]
    0xb9, 0x15, 0x00, 0x00, 0x00, //            mov ecx, 21
    0xac, 0xee, 0xe2, 0xfc, //                  1: lodsb; out dx, al; loop 1b
    0x66, 0xba, 0x40, 0x04, 0xb0, 0x7b, 0xee, // boot timer: out 0x440, 123
    0xb0, 0xfe, 0xe6, 0x64, //                  i8042 reset
    0xf4, 0xeb, 0xfd, //                        2: hlt; jmp 2b
    b'h', b'e', b'l', b'l', b'o', b' ', b'f', b'r', b'o', b'm', b' ', b'l', b'o', b'n', b'g', b' ',
    b'm', b'o', b'd', b'e', b'\n',
];

/// `hlt` forever: a VM that runs until it is stopped.
pub const HALT_FOREVER: &[u8] = &[0xf4, 0xeb, 0xfd];

/// `code` as a minimal ELF64 executable loaded and entered at 1 MiB (no
/// PVH note: the VMM enters it in long mode, as a raw payload).
pub fn elf_kernel(code: &[u8]) -> Vec<u8> {
    const CODE_OFFSET: usize = 0x1000;
    let mut elf = Vec::with_capacity(CODE_OFFSET + code.len());
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // flags
    for half in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    let len = code.len() as u64;
    for word in [CODE_OFFSET as u64, LOAD_ADDR, LOAD_ADDR, len, len, 0x1000] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.resize(CODE_OFFSET, 0);
    elf.extend_from_slice(code);
    elf
}
