//! The virtio-vsock packet header (virtio 1.2, 5.10.6) and the checks a
//! header from the guest must pass before the muxer sees it.

use super::{VsockError, MAX_PKT_PAYLOAD, VSOCK_HOST_CID};

/// Size of the header on the wire.
pub const HDR_LEN: usize = 44;

/// `type`: connection-oriented stream, the only type we support.
pub const TYPE_STREAM: u16 = 1;

/// `flags` of `OP_SHUTDOWN`: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `flags` of `OP_SHUTDOWN`: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// The `op` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Request,
    Response,
    Rst,
    Shutdown,
    Rw,
    CreditUpdate,
    CreditRequest,
}

impl Op {
    pub fn from_wire(op: u16) -> Option<Op> {
        Some(match op {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
        }
    }
}

/// A decoded header. `op` stays raw so that unknown ops reach the state
/// machine, which answers them with `RST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PacketHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn le_u64(b: &[u8; HDR_LEN], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn le_u32(b: &[u8; HDR_LEN], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn le_u16(b: &[u8; HDR_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl PacketHeader {
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> PacketHeader {
        PacketHeader {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: le_u16(b, 28),
            op: le_u16(b, 30),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        }
    }

    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The op, if it is one the specification defines.
    pub fn known_op(&self) -> Option<Op> {
        Op::from_wire(self.op)
    }

    /// Checks the addressing and length of a header the guest put on the tx
    /// queue whose chain holds `available` payload bytes after the header.
    /// A header that fails is dropped; one with the wrong type is answered
    /// with `RST` by the caller.
    pub fn check_from_guest(&self, guest_cid: u64, available: usize) -> Result<(), VsockError> {
        if self.src_cid != guest_cid {
            return Err(VsockError::BadSourceCid(self.src_cid));
        }
        if self.dst_cid != VSOCK_HOST_CID {
            return Err(VsockError::BadDestinationCid(self.dst_cid));
        }
        if self.len as usize > MAX_PKT_PAYLOAD {
            return Err(VsockError::PayloadTooLong(self.len));
        }
        if self.len as usize > available {
            return Err(VsockError::PayloadBeyondChain {
                len: self.len,
                available,
            });
        }
        if self.type_ != TYPE_STREAM {
            return Err(VsockError::UnsupportedType(self.type_));
        }
        Ok(())
    }

    /// The `RST` answering this packet, addressed back to its sender.
    pub fn reset_reply(&self) -> PacketHeader {
        PacketHeader {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: Op::Rst.to_wire(),
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 1024,
            len: 10,
            type_: TYPE_STREAM,
            op: Op::Rw.to_wire(),
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_through_wire_bytes() {
        let h = header();
        assert_eq!(PacketHeader::from_bytes(&h.to_bytes()), h);
    }

    #[test]
    fn header_bytes_are_little_endian_at_spec_offsets() {
        let b = header().to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[28..30], &[1, 0]);
        assert_eq!(&b[30..32], &[5, 0]);
        assert_eq!(&b[40..44], &[7, 0, 0, 0]);
    }

    #[test]
    fn op_from_wire_with_unknown_value_returns_none() {
        assert_eq!(Op::from_wire(0), None);
        assert_eq!(Op::from_wire(8), None);
        for op in 1..=7 {
            assert_eq!(Op::from_wire(op).map(Op::to_wire), Some(op));
        }
    }

    #[test]
    fn check_with_bad_cids_len_or_type_returns_error_naming_value() {
        let ok = header();
        assert!(ok.check_from_guest(3, 10).is_ok());
        let e = ok.check_from_guest(4, 10).unwrap_err();
        assert!(e.to_string().contains("source cid 3"), "{e}");
        let e = PacketHeader { dst_cid: 9, ..ok }
            .check_from_guest(3, 10)
            .unwrap_err();
        assert!(e.to_string().contains("destination cid 9"), "{e}");
        let e = PacketHeader { len: 70_000, ..ok }
            .check_from_guest(3, 100_000)
            .unwrap_err();
        assert!(e.to_string().contains("70000"), "{e}");
        let e = ok.check_from_guest(3, 9).unwrap_err();
        assert!(e.to_string().contains("9 bytes"), "{e}");
        let e = PacketHeader { type_: 2, ..ok }
            .check_from_guest(3, 10)
            .unwrap_err();
        assert!(e.to_string().contains("type 2"), "{e}");
    }

    #[test]
    fn reset_reply_swaps_addresses() {
        let r = header().reset_reply();
        assert_eq!((r.src_cid, r.dst_cid), (2, 3));
        assert_eq!((r.src_port, r.dst_port), (1024, 0x1122_3344));
        assert_eq!(r.known_op(), Some(Op::Rst));
        assert_eq!(r.len, 0);
    }
}
