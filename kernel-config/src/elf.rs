//! Just enough ELF to tell whether a binary can be a guest's `/init`: an
//! x86-64 executable without a program interpreter (`PT_INTERP`), i.e.
//! statically linked. A dynamically linked `/init` fails in the guest with
//! a bare "No working init found", so we refuse it when packing.

/// Errors inspecting an ELF file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not an ELF file (magic {0:02x?})")]
    NotElf(Vec<u8>),
    #[error("ELF class {0} is not 64-bit (2)")]
    Not64Bit(u8),
    #[error("ELF data encoding {0} is not little-endian (1)")]
    NotLittleEndian(u8),
    #[error("ELF machine {0} is not x86-64 (62)")]
    NotX86_64(u16),
    #[error("ELF type {0} is neither an executable (2) nor position-independent (3)")]
    NotExecutable(u16),
    #[error("ELF file is truncated: {what} at offset {offset} is past its end ({len} bytes)")]
    Truncated {
        what: &'static str,
        offset: u64,
        len: usize,
    },
    #[error("PT_INTERP path is not NUL-terminated UTF-8")]
    BadInterpreter,
}

const PT_INTERP: u32 = 3;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;

/// The program interpreter an x86-64 ELF executable asks for (e.g.
/// `/lib64/ld-linux-x86-64.so.2`), or `None` when it is statically linked
/// (static-pie included).
pub fn interpreter(bytes: &[u8]) -> Result<Option<String>, ElfError> {
    let magic = bytes.get(..4).unwrap_or(bytes);
    if magic != b"\x7fELF" {
        return Err(ElfError::NotElf(magic.to_vec()));
    }
    let class = read_u8(bytes, 4, "e_ident")?;
    if class != 2 {
        return Err(ElfError::Not64Bit(class));
    }
    let data = read_u8(bytes, 5, "e_ident")?;
    if data != 1 {
        return Err(ElfError::NotLittleEndian(data));
    }
    let kind = read_u16(bytes, 0x10, "e_type")?;
    if kind != ET_EXEC && kind != ET_DYN {
        return Err(ElfError::NotExecutable(kind));
    }
    let machine = read_u16(bytes, 0x12, "e_machine")?;
    if machine != EM_X86_64 {
        return Err(ElfError::NotX86_64(machine));
    }
    let phoff = read_u64(bytes, 0x20, "e_phoff")?;
    let phentsize = u64::from(read_u16(bytes, 0x36, "e_phentsize")?);
    let phnum = u64::from(read_u16(bytes, 0x38, "e_phnum")?);
    for index in 0..phnum {
        let header = phoff.saturating_add(index.saturating_mul(phentsize));
        if read_u32(bytes, header, "program header")? != PT_INTERP {
            continue;
        }
        let offset = read_u64(bytes, header.saturating_add(8), "p_offset")?;
        let size = read_u64(bytes, header.saturating_add(32), "p_filesz")?;
        let path = slice(bytes, offset, size, "PT_INTERP path")?;
        let path = path
            .strip_suffix(&[0])
            .and_then(|p| std::str::from_utf8(p).ok())
            .ok_or(ElfError::BadInterpreter)?;
        return Ok(Some(path.to_string()));
    }
    Ok(None)
}

fn slice<'a>(
    bytes: &'a [u8],
    offset: u64,
    len: u64,
    what: &'static str,
) -> Result<&'a [u8], ElfError> {
    let truncated = || ElfError::Truncated {
        what,
        offset,
        len: bytes.len(),
    };
    let start = usize::try_from(offset).map_err(|_| truncated())?;
    let len = usize::try_from(len).map_err(|_| truncated())?;
    bytes
        .get(start..start.checked_add(len).ok_or_else(truncated)?)
        .ok_or_else(truncated)
}

fn read_u8(bytes: &[u8], offset: u64, what: &'static str) -> Result<u8, ElfError> {
    Ok(slice(bytes, offset, 1, what)?[0])
}

fn read_u16(bytes: &[u8], offset: u64, what: &'static str) -> Result<u16, ElfError> {
    let mut raw = [0u8; 2];
    raw.copy_from_slice(slice(bytes, offset, 2, what)?);
    Ok(u16::from_le_bytes(raw))
}

fn read_u32(bytes: &[u8], offset: u64, what: &'static str) -> Result<u32, ElfError> {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(slice(bytes, offset, 4, what)?);
    Ok(u32::from_le_bytes(raw))
}

fn read_u64(bytes: &[u8], offset: u64, what: &'static str) -> Result<u64, ElfError> {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(slice(bytes, offset, 8, what)?);
    Ok(u64::from_le_bytes(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header with `program_headers` (type, offset, size)
    /// at 0x40 and `tail` appended at 0x40 + 56 * n.
    fn elf(machine: u16, program_headers: &[(u32, u64, u64)], tail: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; 0x40];
        bytes[..4].copy_from_slice(b"\x7fELF");
        bytes[4] = 2;
        bytes[5] = 1;
        bytes[6] = 1;
        bytes[0x10..0x12].copy_from_slice(&ET_DYN.to_le_bytes());
        bytes[0x12..0x14].copy_from_slice(&machine.to_le_bytes());
        bytes[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        bytes[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        let count = u16::try_from(program_headers.len()).unwrap();
        bytes[0x38..0x3a].copy_from_slice(&count.to_le_bytes());
        for &(kind, offset, size) in program_headers {
            let mut header = [0u8; 56];
            header[..4].copy_from_slice(&kind.to_le_bytes());
            header[8..16].copy_from_slice(&offset.to_le_bytes());
            header[32..40].copy_from_slice(&size.to_le_bytes());
            bytes.extend_from_slice(&header);
        }
        bytes.extend_from_slice(tail);
        bytes
    }

    #[test]
    fn interpreter_of_dynamic_binary_is_its_pt_interp() {
        let path = b"/lib64/ld-linux-x86-64.so.2\0";
        let at = 0x40 + 2 * 56;
        let bytes = elf(
            EM_X86_64,
            &[(6, 0, 0), (PT_INTERP, at, path.len() as u64)],
            path,
        );
        assert_eq!(
            interpreter(&bytes).unwrap().as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
    }

    #[test]
    fn interpreter_of_static_binary_is_none() {
        let bytes = elf(EM_X86_64, &[(1, 0, 0), (2, 0, 0)], &[]);
        assert_eq!(interpreter(&bytes).unwrap(), None);
    }

    #[test]
    fn interpreter_of_non_elf_or_foreign_elf_is_an_error() {
        assert_eq!(
            interpreter(b"#!/bin/sh\n").unwrap_err(),
            ElfError::NotElf(b"#!/b".to_vec())
        );
        assert_eq!(interpreter(b"").unwrap_err(), ElfError::NotElf(vec![]));
        assert_eq!(
            interpreter(&elf(183, &[], &[])).unwrap_err(),
            ElfError::NotX86_64(183)
        );
        let mut elf32 = elf(EM_X86_64, &[], &[]);
        elf32[4] = 1;
        assert_eq!(interpreter(&elf32).unwrap_err(), ElfError::Not64Bit(1));
    }

    #[test]
    fn interpreter_with_headers_past_end_is_truncated_not_a_panic() {
        let mut bytes = elf(EM_X86_64, &[(PT_INTERP, 0xffff_ffff_ffff_fff0, 64)], &[]);
        assert!(matches!(
            interpreter(&bytes),
            Err(ElfError::Truncated { .. })
        ));
        bytes.truncate(0x50);
        assert!(matches!(
            interpreter(&bytes),
            Err(ElfError::Truncated { .. })
        ));
    }

    #[test]
    fn interpreter_of_the_test_binary_itself_is_found() {
        // This test binary is built dynamically linked against glibc.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let interp = interpreter(&me).unwrap();
        assert!(
            interp.as_deref().is_some_and(|p| p.contains("ld-linux")),
            "{interp:?}"
        );
    }
}
