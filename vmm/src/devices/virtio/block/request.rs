//! Parsing of one virtio-blk request (virtio 1.2, section 5.2.6).
//!
//! A request is one descriptor chain whose bytes, in order, are:
//!
//! ```text
//!   device-readable   struct virtio_blk_req header { le32 type; le32 reserved; le64 sector; }
//!   readable or       data: OUT (readable), IN / GET_ID (writable),
//!     writable          DISCARD / WRITE_ZEROES (readable array of 16-byte segments)
//!   device-writable   u8 status (OK 0, IOERR 1, UNSUPP 2): the chain's last byte
//! ```
//!
//! With `VIRTIO_F_VERSION_1` the framing is free: the header may be split
//! across descriptors or share one with data, and data may span any number of
//! descriptors. [`RequestChain`] reads the chain's descriptors once and
//! addresses its readable and writable bytes by offset; bulk IN/OUT data is
//! handed to the image as guest-memory slices (see
//! [`RequestChain::data_slices`]) so the file I/O reads and writes guest
//! memory directly. (`virtio_queue::{Reader, Writer}` would walk the chain
//! once per direction and copy the data through `io::Read`/`io::Write`.)
//!
//! Everything here is written by the guest. A request that is malformed gets
//! status IOERR (UNSUPP for unknown types and flags) as long as its chain ends
//! in a writable byte to put the status in; a chain without one is returned
//! with nothing written ([`RequestError::NoStatusByte`]).

use std::io;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, VolatileSlice};

use super::disk::SECTOR_SIZE;

/// `struct virtio_blk_req`'s header: type, reserved, sector.
pub const HEADER_LEN: usize = 16;
/// `struct virtio_blk_discard_write_zeroes`: sector, num_sectors, flags.
pub const SEGMENT_LEN: usize = 16;
/// Bytes of the serial number `GET_ID` returns (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = 20;

const T_IN: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
const T_OUT: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
const T_FLUSH: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;
const T_GET_ID: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID;
const T_DISCARD: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_DISCARD;
const T_WRITE_ZEROES: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES;
/// The only defined segment flag, and only for WRITE_ZEROES.
pub const SEGMENT_FLAG_UNMAP: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// The status byte a request completes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    IoErr = 1,
    Unsupp = 2,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("descriptor chain does not end in a device-writable status byte")]
    NoStatusByte,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("request header is {0} bytes, expected 16")]
    HeaderTooShort(usize),
    #[error("request type {0} is not supported")]
    UnsupportedType(u32),
    #[error("{request} request carries {len} bytes of device-{direction} data")]
    WrongDirection {
        request: &'static str,
        len: usize,
        direction: &'static str,
    },
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(usize),
    #[error("sector {sector} plus {len} bytes lies beyond the disk's {capacity} sectors")]
    OutOfRange {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("{request} at sector {sector} on a read-only disk")]
    ReadOnly { request: &'static str, sector: u64 },
    #[error("{request} segment list is {len} bytes, not a multiple of 16")]
    SegmentListLength { request: &'static str, len: usize },
    #[error("{request} carries {count} segments, at most {max} are allowed")]
    TooManySegments {
        request: &'static str,
        count: usize,
        max: usize,
    },
    #[error("{request} segment at sector {sector} has unsupported flags {flags:#x}")]
    UnsupportedFlags {
        request: &'static str,
        sector: u64,
        flags: u32,
    },
    #[error("cannot access request buffers in guest memory: {0}")]
    GuestMemory(String),
    #[error("{request} of {len} bytes at sector {sector} failed: {source}")]
    Io {
        request: &'static str,
        sector: u64,
        len: u64,
        source: io::Error,
    },
}

impl RequestError {
    /// The status the guest sees for this failure.
    pub fn status(&self) -> Status {
        match self {
            Self::UnsupportedType(_) | Self::UnsupportedFlags { .. } => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

/// One DISCARD or WRITE_ZEROES range, checked against the capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

impl Segment {
    pub fn offset(&self) -> u64 {
        // Cannot overflow: checked against the capacity when parsed.
        self.sector * SECTOR_SIZE
    }

    pub fn len(&self) -> u64 {
        u64::from(self.num_sectors) * SECTOR_SIZE
    }
}

/// What the guest asked for, checked for framing, direction and range.
#[derive(Debug)]
pub enum Request {
    /// Read `len` bytes at `sector` into the chain's writable data.
    In {
        sector: u64,
        len: usize,
    },
    /// Write the chain's readable data (`len` bytes) at `sector`.
    Out {
        sector: u64,
        len: usize,
    },
    Flush,
    GetId,
    Discard(Vec<Segment>),
    WriteZeroes(Vec<Segment>),
}

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Self::In { .. } => "read",
            Self::Out { .. } => "write",
            Self::Flush => "flush",
            Self::GetId => "get-id",
            Self::Discard(_) => "discard",
            Self::WriteZeroes(_) => "write-zeroes",
        }
    }
}

/// Limits a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub capacity_sectors: u64,
    /// Most segments in one DISCARD / WRITE_ZEROES (`max_discard_seg`).
    pub max_segments: usize,
}

/// One descriptor of a chain, as read once from the descriptor table.
#[derive(Debug, Clone, Copy)]
pub struct Piece {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

/// A descriptor chain known to end in a status byte: its descriptors read
/// once into a list, and byte ranges of its readable and writable parts
/// addressed by offset, across descriptor boundaries.
pub struct RequestChain<'m, 'p> {
    mem: &'m GuestMemoryMmap,
    /// Non-empty descriptors in chain order.
    pieces: &'p [Piece],
    /// Bytes in device-readable descriptors (header and OUT data).
    readable_len: usize,
    /// Bytes in device-writable descriptors before the status byte.
    writable_len: usize,
    status_addr: GuestAddress,
    readable_after_writable: bool,
}

impl<'m, 'p> RequestChain<'m, 'p> {
    /// Reads the chain's descriptors into `pieces` (reused between requests)
    /// and finds the status byte: the last byte of the chain, which must be
    /// in a device-writable descriptor inside guest memory. Without one no
    /// status can be reported.
    pub fn new(
        mem: &'m GuestMemoryMmap,
        chain: DescriptorChain<&'m GuestMemoryMmap>,
        pieces: &'p mut Vec<Piece>,
    ) -> Result<Self, RequestError> {
        pieces.clear();
        let mut readable_len = 0usize;
        let mut writable_len = 0usize;
        let mut readable_after_writable = false;
        for desc in chain {
            if desc.len() == 0 {
                continue;
            }
            // The queue ends a chain before 2^32 bytes: no overflow.
            let len = desc.len() as usize;
            if desc.is_write_only() {
                writable_len = writable_len.saturating_add(len);
            } else {
                readable_len = readable_len.saturating_add(len);
                readable_after_writable |= writable_len > 0;
            }
            pieces.push(Piece {
                addr: desc.addr(),
                len: desc.len(),
                writable: desc.is_write_only(),
            });
        }
        let last = match pieces.last() {
            Some(last) if last.writable => *last,
            _ => return Err(RequestError::NoStatusByte),
        };
        let status_addr = last
            .addr
            .checked_add(u64::from(last.len) - 1)
            .filter(|a| mem.address_in_range(*a))
            .ok_or(RequestError::NoStatusByte)?;
        Ok(Self {
            mem,
            pieces,
            readable_len,
            writable_len: writable_len - 1,
            status_addr,
            readable_after_writable,
        })
    }

    /// Reads and checks the header and, for DISCARD and WRITE_ZEROES, the
    /// segment list.
    pub fn parse(&self, limits: Limits) -> Result<Request, RequestError> {
        if self.readable_after_writable {
            return Err(RequestError::ReadableAfterWritable);
        }
        if self.readable_len < HEADER_LEN {
            return Err(RequestError::HeaderTooShort(self.readable_len));
        }
        let mut header = [0u8; HEADER_LEN];
        self.read_readable(0, &mut header)?;
        let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14],
            header[15],
        ]);
        let readable_data = self.readable_len - HEADER_LEN;
        let writable_data = self.writable_len;
        match request_type {
            T_IN => {
                no_data("read", readable_data, "readable")?;
                check_range(sector, writable_data, limits.capacity_sectors)?;
                Ok(Request::In {
                    sector,
                    len: writable_data,
                })
            }
            T_OUT => {
                no_data("write", writable_data, "writable")?;
                check_range(sector, readable_data, limits.capacity_sectors)?;
                Ok(Request::Out {
                    sector,
                    len: readable_data,
                })
            }
            T_FLUSH => Ok(Request::Flush),
            T_GET_ID => {
                no_data("get-id", readable_data, "readable")?;
                Ok(Request::GetId)
            }
            T_DISCARD => {
                no_data("discard", writable_data, "writable")?;
                let segments = self.read_segments("discard", readable_data, limits)?;
                if let Some(s) = segments.iter().find(|s| s.flags != 0) {
                    // virtio 1.2, 5.2.6.2: UNMAP is not valid for discard.
                    return Err(RequestError::UnsupportedFlags {
                        request: "discard",
                        sector: s.sector,
                        flags: s.flags,
                    });
                }
                Ok(Request::Discard(segments))
            }
            T_WRITE_ZEROES => {
                no_data("write-zeroes", writable_data, "writable")?;
                let segments = self.read_segments("write-zeroes", readable_data, limits)?;
                if let Some(s) = segments.iter().find(|s| s.flags & !SEGMENT_FLAG_UNMAP != 0) {
                    return Err(RequestError::UnsupportedFlags {
                        request: "write-zeroes",
                        sector: s.sector,
                        flags: s.flags,
                    });
                }
                Ok(Request::WriteZeroes(segments))
            }
            other => Err(RequestError::UnsupportedType(other)),
        }
    }

    /// The guest memory of an IN request's writable data (`writable`) or an
    /// OUT request's readable data after the header, as slices the image
    /// reads into or writes from directly. One slice per descriptor (more
    /// where a descriptor crosses guest memory regions).
    pub fn data_slices(&self, writable: bool) -> Result<Vec<VolatileSlice<'m>>, RequestError> {
        let (skip, len) = if writable {
            (0, self.writable_len)
        } else {
            (HEADER_LEN, self.readable_len.saturating_sub(HEADER_LEN))
        };
        let mut slices = Vec::with_capacity(self.pieces.len());
        self.for_each_range(writable, skip, len, |addr, n| {
            for slice in self.mem.get_slices(addr, n) {
                slices.push(slice.map_err(|e| RequestError::GuestMemory(e.to_string()))?);
            }
            Ok(())
        })?;
        Ok(slices)
    }

    /// Writes the serial (zero padded to 20 bytes, truncated to the buffer).
    /// Returns the bytes written.
    pub fn write_id(&self, serial: &[u8]) -> Result<usize, RequestError> {
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial[..n]);
        let len = self.writable_len.min(ID_BYTES);
        let mut done = 0;
        self.for_each_range(true, 0, len, |addr, n| {
            self.mem
                .write_slice(&id[done..done + n], addr)
                .map_err(|e| RequestError::GuestMemory(e.to_string()))?;
            done += n;
            Ok(())
        })?;
        Ok(len)
    }

    /// Completes the request: writes `status` and returns the used length
    /// (`data_written` plus the status byte).
    pub fn finish(self, status: Status, data_written: usize) -> u32 {
        if let Err(e) = self.mem.write_obj(status as u8, self.status_addr) {
            // The address was checked in `new`, so this only fails if guest
            // memory went away.
            tracing::debug!("cannot write virtio-blk status: {e}");
            return 0;
        }
        u32::try_from(data_written.saturating_add(1)).unwrap_or(u32::MAX)
    }

    /// Copies `buf.len()` readable bytes from `offset` (header at 0).
    fn read_readable(&self, offset: usize, buf: &mut [u8]) -> Result<(), RequestError> {
        let mut done = 0;
        self.for_each_range(false, offset, buf.len(), |addr, n| {
            self.mem
                .read_slice(&mut buf[done..done + n], addr)
                .map_err(|e| RequestError::GuestMemory(e.to_string()))?;
            done += n;
            Ok(())
        })
    }

    /// Calls `f` with the guest address and length of each part of the
    /// byte range `[skip, skip + len)` of the chain's readable or writable
    /// bytes. The caller keeps the range inside what [`Self::new`] counted.
    fn for_each_range(
        &self,
        writable: bool,
        mut skip: usize,
        len: usize,
        mut f: impl FnMut(GuestAddress, usize) -> Result<(), RequestError>,
    ) -> Result<(), RequestError> {
        let mut left = len;
        for piece in self.pieces.iter().filter(|p| p.writable == writable) {
            if left == 0 {
                break;
            }
            let piece_len = piece.len as usize;
            if skip >= piece_len {
                skip -= piece_len;
                continue;
            }
            let take = (piece_len - skip).min(left);
            let addr = piece.addr.checked_add(skip as u64).ok_or_else(|| {
                RequestError::GuestMemory(format!("descriptor at {:#x} wraps", piece.addr.0))
            })?;
            f(addr, take)?;
            skip = 0;
            left -= take;
        }
        if left == 0 {
            Ok(())
        } else {
            Err(RequestError::GuestMemory(format!(
                "descriptor chain ended {left} bytes short"
            )))
        }
    }

    fn read_segments(
        &self,
        request: &'static str,
        len: usize,
        limits: Limits,
    ) -> Result<Vec<Segment>, RequestError> {
        if !len.is_multiple_of(SEGMENT_LEN) {
            return Err(RequestError::SegmentListLength { request, len });
        }
        let count = len / SEGMENT_LEN;
        if count > limits.max_segments {
            return Err(RequestError::TooManySegments {
                request,
                count,
                max: limits.max_segments,
            });
        }
        let mut segments = Vec::with_capacity(count);
        for i in 0..count {
            let mut raw = [0u8; SEGMENT_LEN];
            self.read_readable(HEADER_LEN + i * SEGMENT_LEN, &mut raw)?;
            let sector = u64::from_le_bytes([
                raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
            ]);
            let num_sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
            let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
            check_range_sectors(sector, u64::from(num_sectors), limits.capacity_sectors)?;
            segments.push(Segment {
                sector,
                num_sectors,
                flags,
            });
        }
        Ok(segments)
    }
}

fn no_data(request: &'static str, len: usize, direction: &'static str) -> Result<(), RequestError> {
    if len == 0 {
        Ok(())
    } else {
        Err(RequestError::WrongDirection {
            request,
            len,
            direction,
        })
    }
}

/// `len` bytes from `sector` must be whole sectors inside the disk.
fn check_range(sector: u64, len: usize, capacity: u64) -> Result<(), RequestError> {
    let len = len as u64;
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::UnalignedLength(len as usize));
    }
    check_range_sectors(sector, len / SECTOR_SIZE, capacity)
}

fn check_range_sectors(sector: u64, sectors: u64, capacity: u64) -> Result<(), RequestError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            len: sectors * SECTOR_SIZE,
            capacity,
        }),
    }
}
