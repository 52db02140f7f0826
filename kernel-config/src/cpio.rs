//! A `newc` cpio archive, the format the Linux kernel unpacks as its
//! initramfs (`Documentation/driver-api/early-userspace/buffer-format.rst`).
//!
//! Each entry is a 110-byte ASCII header (`070701` and 13 fields of eight
//! hex digits), the NUL-terminated path, padding to a multiple of four, the
//! data, padding to four again. The archive ends with an entry named
//! `TRAILER!!!`. We write deterministic archives: entries sorted by path,
//! inode numbers in that order, owner root, a fixed mtime.

use std::collections::BTreeMap;
use std::io::{self, Write};

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFMT: u32 = 0o170_000;

/// Errors building an archive.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InitramfsError {
    #[error("invalid archive path '{0}': empty, '.' or '..' component, or NUL byte")]
    InvalidPath(String),
    #[error("archive path '{0}' is added twice")]
    Duplicate(String),
    #[error("cannot add '{path}': its parent '{parent}' is not a directory")]
    ParentNotDirectory { path: String, parent: String },
    #[error("'{path}' is {size} bytes, more than a newc entry can hold (4 GiB - 1)")]
    TooLarge { path: String, size: usize },
    #[error("permission bits {mode:#o} of '{path}' are out of range (max 0o7777)")]
    InvalidMode { path: String, mode: u32 },
}

/// What an archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Directory,
    File(Vec<u8>),
    Symlink(String),
    CharDevice { major: u32, minor: u32 },
}

/// An initramfs being assembled. Paths are absolute inside the image
/// (`/dev/console`); missing parent directories are added with mode 0755.
#[derive(Debug, Clone, Default)]
pub struct Initramfs {
    /// Keyed by path without the leading `/`; `BTreeMap` order puts every
    /// directory before what it contains (a prefix sorts first), which the
    /// kernel's unpacker needs.
    entries: BTreeMap<String, (EntryKind, u32)>,
}

/// The mtime written for every entry (deterministic output).
pub const MTIME: u32 = 0;

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory with permission bits `mode` (e.g. `0o755`).
    pub fn directory(&mut self, path: &str, mode: u32) -> Result<&mut Self, InitramfsError> {
        self.add(path, EntryKind::Directory, mode)
    }

    /// Adds a regular file with `contents` and permission bits `mode`.
    pub fn file(
        &mut self,
        path: &str,
        mode: u32,
        contents: Vec<u8>,
    ) -> Result<&mut Self, InitramfsError> {
        if u32::try_from(contents.len()).is_err() {
            return Err(InitramfsError::TooLarge {
                path: path.to_string(),
                size: contents.len(),
            });
        }
        self.add(path, EntryKind::File(contents), mode)
    }

    /// Adds a symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, InitramfsError> {
        if target.is_empty() || target.contains('\0') {
            return Err(InitramfsError::InvalidPath(target.to_string()));
        }
        self.add(path, EntryKind::Symlink(target.to_string()), 0o777)
    }

    /// Adds a character device node (e.g. `/dev/console`, 5:1).
    pub fn char_device(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self, InitramfsError> {
        self.add(path, EntryKind::CharDevice { major, minor }, mode)
    }

    /// Whether the archive has an entry at `path`.
    pub fn contains(&self, path: &str) -> bool {
        normalize(path).is_ok_and(|key| self.entries.contains_key(&key))
    }

    fn add(&mut self, path: &str, kind: EntryKind, mode: u32) -> Result<&mut Self, InitramfsError> {
        if mode > 0o7777 {
            return Err(InitramfsError::InvalidMode {
                path: path.to_string(),
                mode,
            });
        }
        let key = normalize(path)?;
        if self.entries.contains_key(&key) {
            return Err(InitramfsError::Duplicate(format!("/{key}")));
        }
        // Parents, outermost first: they must be directories or absent.
        let mut parent_end = 0;
        while let Some(offset) = key[parent_end..].find('/') {
            parent_end += offset;
            let parent = &key[..parent_end];
            match self.entries.get(parent) {
                Some((EntryKind::Directory, _)) => {}
                Some(_) => {
                    return Err(InitramfsError::ParentNotDirectory {
                        path: format!("/{key}"),
                        parent: format!("/{parent}"),
                    })
                }
                None => {
                    self.entries
                        .insert(parent.to_string(), (EntryKind::Directory, 0o755));
                }
            }
            parent_end += 1;
        }
        self.entries.insert(key, (kind, mode));
        Ok(self)
    }

    /// Writes the archive, trailer included.
    pub fn write_to<W: Write>(&self, out: &mut W) -> io::Result<()> {
        let mut written = 0usize;
        for (ino, (path, (kind, mode))) in (1u32..).zip(&self.entries) {
            let (type_bits, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match kind {
                EntryKind::Directory => (S_IFDIR, 2, &[], (0, 0)),
                EntryKind::File(contents) => (S_IFREG, 1, contents, (0, 0)),
                EntryKind::Symlink(target) => (S_IFLNK, 1, target.as_bytes(), (0, 0)),
                EntryKind::CharDevice { major, minor } => (S_IFCHR, 1, &[], (*major, *minor)),
            };
            let header = Header {
                ino,
                mode: type_bits | mode,
                nlink,
                rdev,
            };
            written += write_entry(out, &header, path, data)?;
        }
        let trailer = Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            rdev: (0, 0),
        };
        written += write_entry(out, &trailer, TRAILER, &[])?;
        // The kernel reads the archive in 4-byte units; some tools expect
        // 512-byte blocks, the kernel does not, so we stop at 4.
        debug_assert_eq!(written % 4, 0);
        Ok(())
    }

    /// The archive as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = self.write_to(&mut bytes);
        bytes
    }
}

/// Strips the leading `/`, rejects empty, `.` and `..` components and NULs.
fn normalize(path: &str) -> Result<String, InitramfsError> {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let valid = !trimmed.is_empty()
        && !trimmed.contains('\0')
        && trimmed
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if valid {
        Ok(trimmed.to_string())
    } else {
        Err(InitramfsError::InvalidPath(path.to_string()))
    }
}

struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
}

fn write_entry<W: Write>(
    out: &mut W,
    header: &Header,
    name: &str,
    data: &[u8],
) -> io::Result<usize> {
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("entry '{name}' too large"),
        )
    };
    let filesize = u32::try_from(data.len()).map_err(|_| too_large())?;
    let namesize = u32::try_from(name.len() + 1).map_err(|_| too_large())?;
    let fields = [
        header.ino,
        header.mode,
        0, // uid: root
        0, // gid: root
        header.nlink,
        MTIME,
        filesize,
        0, // devmajor
        0, // devminor
        header.rdev.0,
        header.rdev.1,
        namesize,
        0, // check (only used by the "070702" crc format)
    ];
    let mut head = Vec::with_capacity(HEADER_LEN + name.len() + 4);
    head.extend_from_slice(MAGIC);
    for field in fields {
        head.extend_from_slice(format!("{field:08X}").as_bytes());
    }
    head.extend_from_slice(name.as_bytes());
    head.push(0);
    head.resize(head.len().next_multiple_of(4), 0);
    out.write_all(&head)?;
    out.write_all(data)?;
    let pad = data.len().next_multiple_of(4) - data.len();
    out.write_all(&[0u8; 3][..pad])?;
    Ok(head.len() + data.len() + pad)
}

/// Errors reading a `newc` archive.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NewcParseError {
    #[error("offset {offset}: archive ends inside an entry")]
    Truncated { offset: usize },
    #[error("offset {offset}: bad magic {found:?}, expected \"070701\"")]
    BadMagic { offset: usize, found: String },
    #[error("offset {offset}: header field {field} is not eight hex digits")]
    BadField { offset: usize, field: usize },
    #[error("offset {offset}: entry name is not NUL-terminated UTF-8")]
    BadName { offset: usize },
    #[error("archive has no TRAILER!!! entry")]
    MissingTrailer,
}

/// One entry read back from an archive (the trailer is not returned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewcEntry {
    /// Path as stored (no leading `/`).
    pub path: String,
    pub ino: u32,
    /// Full `st_mode`: type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    pub data: Vec<u8>,
}

impl NewcEntry {
    /// What the entry is, as [`Initramfs`] would have added it; `None` for
    /// file types we never write (FIFOs, sockets, block devices).
    pub fn kind(&self) -> Option<EntryKind> {
        match self.mode & S_IFMT {
            S_IFDIR => Some(EntryKind::Directory),
            S_IFREG => Some(EntryKind::File(self.data.clone())),
            S_IFLNK => String::from_utf8(self.data.clone())
                .ok()
                .map(EntryKind::Symlink),
            S_IFCHR => Some(EntryKind::CharDevice {
                major: self.rdev_major,
                minor: self.rdev_minor,
            }),
            _ => None,
        }
    }

    /// Permission bits (`mode & 0o7777`).
    pub fn permissions(&self) -> u32 {
        self.mode & 0o7777
    }
}

/// Reads every entry of a `newc` archive up to its trailer.
pub fn parse_newc(bytes: &[u8]) -> Result<Vec<NewcEntry>, NewcParseError> {
    let mut entries = Vec::new();
    let mut offset = 0usize;
    loop {
        let header = bytes
            .get(offset..offset + HEADER_LEN)
            .ok_or(NewcParseError::Truncated { offset })?;
        if &header[..6] != MAGIC {
            return Err(NewcParseError::BadMagic {
                offset,
                found: String::from_utf8_lossy(&header[..6]).into_owned(),
            });
        }
        let mut fields = [0u32; 13];
        for (index, field) in fields.iter_mut().enumerate() {
            let start = 6 + index * 8;
            let hex = std::str::from_utf8(&header[start..start + 8]).map_err(|_| {
                NewcParseError::BadField {
                    offset,
                    field: index,
                }
            })?;
            *field = u32::from_str_radix(hex, 16).map_err(|_| NewcParseError::BadField {
                offset,
                field: index,
            })?;
        }
        let [ino, mode, uid, gid, nlink, mtime, filesize, _, _, rdev_major, rdev_minor, namesize, _] =
            fields;
        let name_start = offset + HEADER_LEN;
        let name_end = name_start + namesize as usize;
        let name_bytes = bytes
            .get(name_start..name_end)
            .ok_or(NewcParseError::Truncated { offset })?;
        let name = name_bytes
            .strip_suffix(&[0])
            .and_then(|n| std::str::from_utf8(n).ok())
            .ok_or(NewcParseError::BadName { offset })?;
        let data_start = name_end.next_multiple_of(4);
        let data_end = data_start + filesize as usize;
        let data = bytes
            .get(data_start..data_end)
            .ok_or(NewcParseError::Truncated { offset })?;
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(NewcEntry {
            path: name.to_string(),
            ino,
            mode,
            uid,
            gid,
            nlink,
            mtime,
            rdev_major,
            rdev_minor,
            data: data.to_vec(),
        });
        offset = data_end.next_multiple_of(4);
        if offset >= bytes.len() {
            return Err(NewcParseError::MissingTrailer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Initramfs {
        let mut image = Initramfs::new();
        image
            .file("/init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
            .unwrap()
            .directory("/proc", 0o555)
            .unwrap()
            .char_device("/dev/console", 0o600, 5, 1)
            .unwrap()
            .symlink("/bin/sh", "busybox")
            .unwrap()
            .file("/etc/empty", 0o644, Vec::new())
            .unwrap();
        image
    }

    #[test]
    fn written_archive_parses_back_sorted_with_parents() {
        let entries = parse_newc(&sample().to_bytes()).unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "etc",
                "etc/empty",
                "init",
                "proc"
            ]
        );
        let by_path = |p: &str| entries.iter().find(|e| e.path == p).unwrap();
        let console = by_path("dev/console");
        assert_eq!(
            console.kind(),
            Some(EntryKind::CharDevice { major: 5, minor: 1 })
        );
        assert_eq!(console.permissions(), 0o600);
        let init = by_path("init");
        assert_eq!(
            init.kind(),
            Some(EntryKind::File(b"#!/bin/sh\necho hi\n".to_vec()))
        );
        assert_eq!(init.mode, 0o100_755);
        assert_eq!(
            by_path("bin/sh").kind(),
            Some(EntryKind::Symlink("busybox".into()))
        );
        assert_eq!(by_path("bin").kind(), Some(EntryKind::Directory));
        assert_eq!(by_path("bin").permissions(), 0o755);
        assert_eq!(by_path("proc").permissions(), 0o555);
        assert_eq!(by_path("etc/empty").data, b"");
        for (expected_ino, entry) in (1u32..).zip(&entries) {
            assert_eq!(entry.ino, expected_ino);
            assert_eq!((entry.uid, entry.gid, entry.mtime), (0, 0, MTIME));
        }
    }

    #[test]
    fn every_entry_starts_on_four_byte_boundary_and_archive_ends_with_trailer() {
        let bytes = sample().to_bytes();
        assert_eq!(bytes.len() % 4, 0);
        // Walk the headers by hand: each must start with the magic.
        let trailer_at = bytes
            .windows(TRAILER.len())
            .rposition(|w| w == TRAILER.as_bytes())
            .unwrap();
        let header_at = trailer_at - HEADER_LEN;
        assert_eq!(header_at % 4, 0);
        assert_eq!(&bytes[header_at..header_at + 6], MAGIC);
        assert_eq!(
            bytes.len(),
            (trailer_at + TRAILER.len() + 1).next_multiple_of(4)
        );
    }

    #[test]
    fn output_is_deterministic_whatever_the_insertion_order() {
        let mut reversed = Initramfs::new();
        reversed
            .file("/etc/empty", 0o644, Vec::new())
            .unwrap()
            .symlink("/bin/sh", "busybox")
            .unwrap()
            .char_device("/dev/console", 0o600, 5, 1)
            .unwrap()
            .directory("/proc", 0o555)
            .unwrap()
            .file("/init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
            .unwrap();
        assert_eq!(reversed.to_bytes(), sample().to_bytes());
    }

    #[test]
    fn empty_archive_is_only_the_trailer() {
        let bytes = Initramfs::new().to_bytes();
        assert_eq!(parse_newc(&bytes).unwrap(), Vec::new());
        assert_eq!(
            bytes.len(),
            (HEADER_LEN + TRAILER.len() + 1).next_multiple_of(4)
        );
    }

    #[test]
    fn add_with_bad_path_returns_invalid_path() {
        let mut image = Initramfs::new();
        for bad in ["", "/", "/a/../b", "/a//b", "./x", "a\0b"] {
            assert_eq!(
                image.directory(bad, 0o755).unwrap_err(),
                InitramfsError::InvalidPath(bad.to_string()),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn add_twice_returns_duplicate() {
        let mut image = Initramfs::new();
        image.directory("/dev", 0o755).unwrap();
        assert_eq!(
            image.directory("dev", 0o700).unwrap_err(),
            InitramfsError::Duplicate("/dev".into())
        );
    }

    #[test]
    fn add_below_a_file_returns_parent_not_directory() {
        let mut image = Initramfs::new();
        image.file("/init", 0o755, vec![1]).unwrap();
        assert_eq!(
            image.file("/init/x", 0o644, vec![]).unwrap_err(),
            InitramfsError::ParentNotDirectory {
                path: "/init/x".into(),
                parent: "/init".into()
            }
        );
    }

    #[test]
    fn add_with_file_type_in_mode_returns_invalid_mode() {
        let mut image = Initramfs::new();
        assert!(matches!(
            image.file("/x", 0o100_644, vec![]),
            Err(InitramfsError::InvalidMode { .. })
        ));
    }

    #[test]
    fn parse_with_garbage_or_truncation_returns_error() {
        let bytes = sample().to_bytes();
        assert!(matches!(
            parse_newc(b"070707not newc"),
            Err(NewcParseError::Truncated { .. })
        ));
        let mut bad_magic = bytes.clone();
        bad_magic[5] = b'2';
        assert!(matches!(
            parse_newc(&bad_magic),
            Err(NewcParseError::BadMagic { .. })
        ));
        let mut bad_field = bytes.clone();
        bad_field[10] = b'x';
        assert!(matches!(
            parse_newc(&bad_field),
            Err(NewcParseError::BadField { field: 0, .. })
        ));
        let without_trailer = &bytes[..bytes.len() - 124];
        assert!(parse_newc(without_trailer).is_err());
        for cut in [1, 50, 111, 200] {
            assert!(parse_newc(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    /// Cross-check with GNU cpio when it is installed.
    #[test]
    fn gnu_cpio_lists_what_we_wrote() {
        let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("SKIP: cpio not installed (apt-get install cpio)");
            return;
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&sample().to_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "cpio -t failed: {output:?}");
        let listed = String::from_utf8(output.stdout).unwrap();
        let listed: Vec<&str> = listed.lines().collect();
        assert_eq!(
            listed,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "etc",
                "etc/empty",
                "init",
                "proc"
            ]
        );
    }
}
