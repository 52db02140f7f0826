//! What the device checks in a FUSE request before the server sees it.
//!
//! The server (`fuse-backend-rs`) parses and bounds-checks every request;
//! it reads a name up to its first NUL, though, so `"a\0/../x"` would be
//! served as `"a"`. A guest kernel sends each name as its bytes and one
//! NUL, so anything else in the name part of a request that carries names
//! (an empty name, a NUL inside, bytes after the last name) is answered
//! EINVAL here.

use std::io::Read;
use std::mem::size_of;

use fuse_backend_rs::abi::fuse_abi::{
    CreateIn, InHeader, LinkIn, MkdirIn, MknodIn, Opcode, Rename2In, RenameIn,
};
use fuse_backend_rs::transport::Reader;

/// Longest name part checked; longer requests are left to the server
/// (names are at most 255 bytes, a symlink target at most 4095).
const MAX_NAMES_BYTES: usize = 2 * 4096 + 512;

/// The opcode's fixed argument struct size and the number of names after
/// it, for the opcodes whose arguments end in names.
fn name_layout(opcode: u32) -> Option<(usize, usize)> {
    let layout = match opcode {
        x if x == Opcode::Lookup as u32 => (0, 1),
        x if x == Opcode::Unlink as u32 => (0, 1),
        x if x == Opcode::Rmdir as u32 => (0, 1),
        x if x == Opcode::Symlink as u32 => (0, 2),
        x if x == Opcode::Mknod as u32 => (size_of::<MknodIn>(), 1),
        x if x == Opcode::Mkdir as u32 => (size_of::<MkdirIn>(), 1),
        x if x == Opcode::Link as u32 => (size_of::<LinkIn>(), 1),
        x if x == Opcode::Create as u32 => (size_of::<CreateIn>(), 1),
        x if x == Opcode::Rename as u32 => (size_of::<RenameIn>(), 2),
        x if x == Opcode::Rename2 as u32 => (size_of::<Rename2In>(), 2),
        _ => return None,
    };
    Some(layout)
}

/// Whether `bytes` are exactly `count` non-empty NUL-terminated names.
fn names_are_well_formed(bytes: &[u8], count: usize) -> bool {
    let mut rest = bytes;
    for _ in 0..count {
        match rest.iter().position(|b| *b == 0) {
            Some(0) | None => return false,
            Some(end) => rest = &rest[end + 1..],
        }
    }
    rest.is_empty()
}

/// What the device learnt from a request's header.
#[derive(Debug, Clone, Copy)]
pub struct Peeked {
    pub header: InHeader,
    /// The request carries names that are not well-formed.
    pub bad_names: bool,
}

/// Reads the request's header and checks its names, from a copy of the
/// request's reader. `None`: not even a header.
pub fn peek(mut reader: Reader<'_>) -> Option<Peeked> {
    let header: InHeader = reader.read_obj().ok()?;
    let bad_names = match name_layout(header.opcode) {
        None => false,
        Some((fixed, count)) => {
            let body = (header.len as usize).saturating_sub(size_of::<InHeader>());
            match body.checked_sub(fixed) {
                // Too short for its arguments: the server says so.
                None => false,
                Some(names) if names > MAX_NAMES_BYTES || names > reader.available_bytes() => false,
                Some(names) => {
                    let mut buf = vec![0u8; fixed + names];
                    match reader.read_exact(&mut buf) {
                        Ok(()) => !names_are_well_formed(&buf[fixed..], count),
                        Err(_) => false,
                    }
                }
            }
        }
    };
    Some(Peeked { header, bad_names })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_inner_nul_empty_or_trailing_bytes_are_refused() {
        assert!(names_are_well_formed(b"a\0", 1));
        assert!(names_are_well_formed(b"old\0new\0", 2));
        assert!(!names_are_well_formed(b"a\0/../x\0", 1));
        assert!(!names_are_well_formed(b"\0", 1));
        assert!(!names_are_well_formed(b"a", 1));
        assert!(!names_are_well_formed(b"a\0\0", 1));
        assert!(!names_are_well_formed(b"a\0", 2));
        assert!(!names_are_well_formed(b"", 1));
    }
}
