//! The host side of a virtio-blk device: a raw image file (or a host block
//! device) and the positioned, vectored I/O that moves data between it and
//! guest memory without an intermediate buffer.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::device::BlockError;

/// Bytes in a virtio-blk sector, whatever the image's block size.
pub const SECTOR_SIZE: u64 = 512;

/// Most iovecs handed to one `preadv`/`pwritev` (the kernel's `UIO_MAXIOV`).
const MAX_IOVECS_PER_CALL: usize = 1024;

/// What `fallocate` can do on the file system that holds the image, probed
/// once at open so the device offers only what will work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoleSupport {
    /// `FALLOC_FL_PUNCH_HOLE`: deallocate a range, which then reads as zeros.
    pub punch_hole: bool,
    /// `FALLOC_FL_ZERO_RANGE`: zero a range, keeping it allocated.
    pub zero_range: bool,
}

/// An open disk image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    size_bytes: u64,
    holes: HoleSupport,
}

impl DiskImage {
    /// Opens `path` read-write, or with `O_RDONLY` when `read_only`, takes an
    /// advisory lock (exclusive for read-write, shared for read-only) so two
    /// VMMs cannot write one image, and probes `fallocate` support.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        lock(&file, read_only).map_err(|source| BlockError::Lock {
            path: path.to_owned(),
            source,
        })?;
        // Seeking to the end, unlike the metadata's length, also sizes a host
        // block device (a devmapper snapshot).
        let size_bytes = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_owned(),
                source,
            })?;
        if size_bytes < SECTOR_SIZE {
            return Err(BlockError::TooSmall {
                path: path.to_owned(),
                size_bytes,
            });
        }
        if !size_bytes.is_multiple_of(SECTOR_SIZE) {
            tracing::warn!(
                path = %path.display(),
                size_bytes,
                "image size is not a multiple of 512; the last partial sector is not visible to the guest"
            );
        }
        let holes = if read_only {
            HoleSupport::default()
        } else {
            probe_holes(&file, size_bytes)
        };
        Ok(Self {
            file,
            path: path.to_owned(),
            size_bytes,
            holes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whole sectors the guest can address.
    pub fn capacity_sectors(&self) -> u64 {
        self.size_bytes / SECTOR_SIZE
    }

    pub fn holes(&self) -> HoleSupport {
        self.holes
    }

    /// The file system's preferred I/O size, used as discard alignment.
    pub fn block_size(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file
            .metadata()
            .map(|m| m.blksize())
            .unwrap_or(4096)
            .max(SECTOR_SIZE)
    }

    /// Fills `slices` (guest memory) with the image's bytes from `offset` on.
    pub fn read_to_guest<B: BitmapSlice>(
        &self,
        offset: u64,
        slices: &[VolatileSlice<'_, B>],
    ) -> io::Result<()> {
        self.transfer(offset, slices, Direction::FileToGuest)?;
        for slice in slices {
            slice.bitmap().mark_dirty(0, slice.len());
        }
        Ok(())
    }

    /// Writes `slices` (guest memory) to the image from `offset` on.
    pub fn write_from_guest<B: BitmapSlice>(
        &self,
        offset: u64,
        slices: &[VolatileSlice<'_, B>],
    ) -> io::Result<()> {
        self.transfer(offset, slices, Direction::GuestToFile)
    }

    /// Makes written data durable (`fdatasync`).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates `len` bytes at `offset`; they read back as zeros.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Zeroes `len` bytes at `offset`, keeping them allocated.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(
            &self.file,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// `preadv`/`pwritev` over the slices, batched and resumed after short
    /// transfers, until every byte moved.
    fn transfer<B: BitmapSlice>(
        &self,
        mut offset: u64,
        slices: &[VolatileSlice<'_, B>],
        direction: Direction,
    ) -> io::Result<()> {
        // Position in `slices`: the slice, and how far into it we are.
        let mut index = 0;
        let mut skip = 0;
        loop {
            // Zero-length slices need no transfer (and a batch of only them
            // would look like end of file).
            while index < slices.len() && slices[index].is_empty() {
                index += 1;
            }
            if index == slices.len() {
                return Ok(());
            }
            let batch = &slices[index..slices.len().min(index + MAX_IOVECS_PER_CALL)];
            // The guards keep each slice's memory mapped while the kernel
            // uses the pointers (a no-op for plain mmap, needed for Xen's).
            let guards: Vec<_> = batch.iter().map(|s| s.ptr_guard_mut()).collect();
            let iovecs: Vec<libc::iovec> = guards
                .iter()
                .enumerate()
                .map(|(i, guard)| {
                    let start = if i == 0 { skip } else { 0 };
                    libc::iovec {
                        // `start < guard.len()` (invariant below), so the
                        // pointer stays inside the slice.
                        iov_base: guard.as_ptr().wrapping_add(start).cast(),
                        iov_len: guard.len() - start,
                    }
                })
                .collect();
            let done = self.vectored_at(&iovecs, offset, direction)?;
            if done == 0 {
                return Err(match direction {
                    Direction::FileToGuest => io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("image ends before offset {offset}"),
                    ),
                    Direction::GuestToFile => io::Error::from(io::ErrorKind::WriteZero),
                });
            }
            offset += done as u64;
            // Advance past what the kernel moved, keeping `skip` strictly
            // inside the current slice.
            let mut left = done;
            while left > 0 && index < slices.len() {
                let rest = slices[index].len() - skip;
                if left >= rest {
                    left -= rest;
                    index += 1;
                    skip = 0;
                } else {
                    skip += left;
                    left = 0;
                }
            }
        }
    }

    fn vectored_at(
        &self,
        iovecs: &[libc::iovec],
        offset: u64,
        direction: Direction,
    ) -> io::Result<usize> {
        let count = libc::c_int::try_from(iovecs.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        loop {
            let moved = match direction {
                // SAFETY: every iovec points into guest memory that a
                // `VolatileSlice` (bounds-checked against the guest memory
                // mapping) covers and whose `PtrGuardMut` is alive for this
                // call; the kernel writes at most `iov_len` bytes to each.
                Direction::FileToGuest => unsafe {
                    libc::preadv(self.file.as_raw_fd(), iovecs.as_ptr(), count, offset)
                },
                // SAFETY: as above; the kernel only reads the iovecs' memory.
                Direction::GuestToFile => unsafe {
                    libc::pwritev(self.file.as_raw_fd(), iovecs.as_ptr(), count, offset)
                },
            };
            if moved >= 0 {
                // Non-negative `isize` always fits `usize`.
                return Ok(moved.unsigned_abs());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Direction {
    FileToGuest,
    GuestToFile,
}

fn lock(file: &File, shared: bool) -> io::Result<()> {
    let operation = if shared { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: fallocate on a file descriptor we own; no memory is passed.
        if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Tries `ZERO_RANGE` and `PUNCH_HOLE` on one block just past the end of the
/// image, where they cannot touch the guest's data (`KEEP_SIZE` keeps the
/// size). The punch also releases what the zero-range probe allocated.
fn probe_holes(file: &File, size_bytes: u64) -> HoleSupport {
    const PROBE_LEN: u64 = 4096;
    let Some(probe_offset) = size_bytes
        .checked_next_multiple_of(PROBE_LEN)
        .filter(|o| o.checked_add(PROBE_LEN).is_some())
    else {
        return HoleSupport::default();
    };
    let zero_range = fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        probe_offset,
        PROBE_LEN,
    )
    .is_ok();
    let punch_hole = fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        probe_offset,
        PROBE_LEN,
    )
    .is_ok();
    HoleSupport {
        punch_hole,
        zero_range,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn open_read_only_returns_file_without_write_access() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro.img");
        std::fs::write(&path, [7u8; 1024]).unwrap();

        let disk = DiskImage::open(&path, true).unwrap();

        // EBADF even for root: the descriptor itself is O_RDONLY.
        let err = disk.file.write_at(b"x", 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        assert_eq!(disk.holes(), HoleSupport::default());
    }

    #[test]
    fn probe_leaves_image_size_and_content_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rw.img");
        std::fs::write(&path, [9u8; 1000]).unwrap();

        let disk = DiskImage::open(&path, false).unwrap();

        assert_eq!(disk.capacity_sectors(), 1);
        assert_eq!(std::fs::read(&path).unwrap(), vec![9u8; 1000]);
    }
}
