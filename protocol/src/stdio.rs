//! The header that opens a stdio stream connection.
//!
//! A process's stdin, stdout and stderr each travel on their own vsock
//! connection to [`crate::ports::STDIO_VSOCK_PORT`], opened by the host. The
//! host writes a header naming the stream, the agent answers with one reply,
//! and from then on the connection is the raw byte stream:
//!
//! ```text
//! host → agent   header
//!   0   4  magic b"CLIO"
//!   4   1  version (1)
//!   5   1  stream kind: 0 stdin, 1 stdout, 2 stderr
//!   6   1  container id length C (1..=255)
//!   7   1  exec id length E (0..=255; 0 = the container's init process)
//!   8   C  container id, UTF-8
//!   8+C E  exec id, UTF-8
//! agent → host   reply
//!   0   1  status: 0 attached, 1 refused
//!   1   2  message length L (big endian; 0 when attached)
//!   3   L  UTF-8 reason when refused
//! ```
//!
//! EOF is half-close: the host shuts down its write side of a stdin stream
//! and the process reads EOF; the agent shuts down its write side of a
//! stdout/stderr stream after the last byte the process wrote.

use std::fmt;

/// Magic bytes that start every header.
pub const MAGIC: [u8; 4] = *b"CLIO";
/// Header version this crate writes and accepts.
pub const VERSION: u8 = 1;
/// Length of the fixed part of a header (before the two ids).
pub const FIXED_LEN: usize = 8;
/// Length of the fixed part of a reply (before the message).
pub const REPLY_FIXED_LEN: usize = 3;

/// Errors decoding a header or a reply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StdioHeaderError {
    #[error("bad stdio header magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("unsupported stdio header version {0}")]
    BadVersion(u8),
    #[error("unknown stdio stream kind {0}")]
    BadKind(u8),
    #[error("stdio header container_id is empty")]
    EmptyContainerId,
    #[error("stdio header {field} is {len} bytes, at most 255 allowed")]
    IdTooLong { field: &'static str, len: usize },
    #[error("stdio header {field} is not UTF-8")]
    NotUtf8 { field: &'static str },
    #[error("stdio header body is {got} bytes, expected {expected}")]
    BodyLength { got: usize, expected: usize },
    #[error("unknown stdio reply status {0}")]
    BadReplyStatus(u8),
    #[error("stdio reply message is {got} bytes, expected {expected}")]
    ReplyLength { got: usize, expected: usize },
}

/// Which stream of a process a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// Host → process.
    Stdin,
    /// Process → host (also the terminal's output in tty mode).
    Stdout,
    /// Process → host.
    Stderr,
}

impl StreamKind {
    fn to_byte(self) -> u8 {
        match self {
            StreamKind::Stdin => 0,
            StreamKind::Stdout => 1,
            StreamKind::Stderr => 2,
        }
    }

    fn from_byte(byte: u8) -> Result<Self, StdioHeaderError> {
        match byte {
            0 => Ok(StreamKind::Stdin),
            1 => Ok(StreamKind::Stdout),
            2 => Ok(StreamKind::Stderr),
            other => Err(StdioHeaderError::BadKind(other)),
        }
    }
}

impl fmt::Display for StreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StreamKind::Stdin => "stdin",
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
        })
    }
}

/// A decoded stream header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
    pub kind: StreamKind,
}

/// The fixed part of a header, parsed; tells how many id bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingHeader {
    kind: StreamKind,
    container_id_len: usize,
    exec_id_len: usize,
}

impl PendingHeader {
    /// Number of bytes to read after the fixed part.
    pub fn body_len(&self) -> usize {
        self.container_id_len + self.exec_id_len
    }

    /// Completes the header from the `body_len()` bytes that followed.
    pub fn finish(self, body: &[u8]) -> Result<StreamHeader, StdioHeaderError> {
        if body.len() != self.body_len() {
            return Err(StdioHeaderError::BodyLength {
                got: body.len(),
                expected: self.body_len(),
            });
        }
        let (container, exec) = body.split_at(self.container_id_len);
        let container_id = std::str::from_utf8(container)
            .map_err(|_| StdioHeaderError::NotUtf8 {
                field: "container_id",
            })?
            .to_owned();
        let exec_id = std::str::from_utf8(exec)
            .map_err(|_| StdioHeaderError::NotUtf8 { field: "exec_id" })?
            .to_owned();
        Ok(StreamHeader {
            container_id,
            exec_id,
            kind: self.kind,
        })
    }
}

impl StreamHeader {
    /// Encodes the header; fails on ids the format cannot carry.
    pub fn encode(&self) -> Result<Vec<u8>, StdioHeaderError> {
        if self.container_id.is_empty() {
            return Err(StdioHeaderError::EmptyContainerId);
        }
        let container_len = id_len("container_id", &self.container_id)?;
        let exec_len = id_len("exec_id", &self.exec_id)?;
        let mut out = Vec::with_capacity(FIXED_LEN + self.container_id.len() + self.exec_id.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.kind.to_byte());
        out.push(container_len);
        out.push(exec_len);
        out.extend_from_slice(self.container_id.as_bytes());
        out.extend_from_slice(self.exec_id.as_bytes());
        Ok(out)
    }

    /// Parses the fixed part of a header.
    pub fn parse_fixed(fixed: &[u8; FIXED_LEN]) -> Result<PendingHeader, StdioHeaderError> {
        let magic = [fixed[0], fixed[1], fixed[2], fixed[3]];
        if magic != MAGIC {
            return Err(StdioHeaderError::BadMagic(magic));
        }
        if fixed[4] != VERSION {
            return Err(StdioHeaderError::BadVersion(fixed[4]));
        }
        let kind = StreamKind::from_byte(fixed[5])?;
        if fixed[6] == 0 {
            return Err(StdioHeaderError::EmptyContainerId);
        }
        Ok(PendingHeader {
            kind,
            container_id_len: usize::from(fixed[6]),
            exec_id_len: usize::from(fixed[7]),
        })
    }

    /// Decodes a complete header held in one buffer.
    pub fn decode(bytes: &[u8]) -> Result<Self, StdioHeaderError> {
        let Some((fixed, body)) = bytes.split_first_chunk::<FIXED_LEN>() else {
            return Err(StdioHeaderError::BodyLength {
                got: bytes.len(),
                expected: FIXED_LEN,
            });
        };
        Self::parse_fixed(fixed)?.finish(body)
    }
}

fn id_len(field: &'static str, id: &str) -> Result<u8, StdioHeaderError> {
    u8::try_from(id.len()).map_err(|_| StdioHeaderError::IdTooLong {
        field,
        len: id.len(),
    })
}

/// The agent's answer to a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachReply {
    /// The stream is connected to the process.
    Attached,
    /// The stream was refused; the agent closes the connection.
    Refused(String),
}

impl AttachReply {
    /// Encodes the reply; a refusal's reason is cut to 65535 bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            AttachReply::Attached => vec![0, 0, 0],
            AttachReply::Refused(reason) => {
                let mut end = reason.len().min(usize::from(u16::MAX));
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                let len = u16::try_from(end).unwrap_or(u16::MAX);
                let mut out = Vec::with_capacity(REPLY_FIXED_LEN + end);
                out.push(1);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&reason.as_bytes()[..end]);
                out
            }
        }
    }

    /// Parses the fixed part of a reply: status and message length.
    pub fn parse_fixed(fixed: &[u8; REPLY_FIXED_LEN]) -> Result<(bool, usize), StdioHeaderError> {
        let len = usize::from(u16::from_be_bytes([fixed[1], fixed[2]]));
        match fixed[0] {
            0 => Ok((true, len)),
            1 => Ok((false, len)),
            other => Err(StdioHeaderError::BadReplyStatus(other)),
        }
    }

    /// Decodes a complete reply held in one buffer.
    pub fn decode(bytes: &[u8]) -> Result<Self, StdioHeaderError> {
        let Some((fixed, message)) = bytes.split_first_chunk::<REPLY_FIXED_LEN>() else {
            return Err(StdioHeaderError::ReplyLength {
                got: bytes.len(),
                expected: REPLY_FIXED_LEN,
            });
        };
        let (attached, len) = Self::parse_fixed(fixed)?;
        if message.len() != len {
            return Err(StdioHeaderError::ReplyLength {
                got: message.len(),
                expected: len,
            });
        }
        if attached {
            return Ok(AttachReply::Attached);
        }
        Ok(AttachReply::Refused(
            String::from_utf8_lossy(message).into_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(container: &str, exec: &str, kind: StreamKind) -> StreamHeader {
        StreamHeader {
            container_id: container.to_owned(),
            exec_id: exec.to_owned(),
            kind,
        }
    }

    #[test]
    fn header_round_trips_for_every_kind() {
        for kind in [StreamKind::Stdin, StreamKind::Stdout, StreamKind::Stderr] {
            let original = header("c1", "exec-7", kind);
            let bytes = original.encode().unwrap();
            assert_eq!(&bytes[..4], b"CLIO");
            assert_eq!(bytes.len(), FIXED_LEN + 2 + 6);
            assert_eq!(StreamHeader::decode(&bytes).unwrap(), original);
        }
    }

    #[test]
    fn header_with_empty_exec_id_names_init_process() {
        let bytes = header("abc", "", StreamKind::Stdout).encode().unwrap();
        let decoded = StreamHeader::decode(&bytes).unwrap();
        assert_eq!(decoded.exec_id, "");
        assert_eq!(decoded.container_id, "abc");
    }

    #[test]
    fn header_read_in_two_steps_matches_decode() {
        let bytes = header("pod-a", "e", StreamKind::Stderr).encode().unwrap();
        let fixed: [u8; FIXED_LEN] = bytes[..FIXED_LEN].try_into().unwrap();
        let pending = StreamHeader::parse_fixed(&fixed).unwrap();
        assert_eq!(pending.body_len(), 6);
        let decoded = pending.finish(&bytes[FIXED_LEN..]).unwrap();
        assert_eq!(decoded, header("pod-a", "e", StreamKind::Stderr));
    }

    #[test]
    fn encode_with_empty_container_id_returns_error() {
        let err = header("", "x", StreamKind::Stdin).encode().unwrap_err();
        assert_eq!(err, StdioHeaderError::EmptyContainerId);
    }

    #[test]
    fn encode_with_long_exec_id_returns_error_naming_field() {
        let long = "e".repeat(256);
        let err = header("c", &long, StreamKind::Stdin).encode().unwrap_err();
        assert_eq!(
            err,
            StdioHeaderError::IdTooLong {
                field: "exec_id",
                len: 256
            }
        );
        assert!(err.to_string().contains("exec_id"));
    }

    #[test]
    fn decode_with_bad_magic_returns_error() {
        let mut bytes = header("c", "", StreamKind::Stdin).encode().unwrap();
        bytes[0] = b'X';
        assert!(matches!(
            StreamHeader::decode(&bytes),
            Err(StdioHeaderError::BadMagic(_))
        ));
    }

    #[test]
    fn decode_with_bad_version_or_kind_returns_error() {
        let good = header("c", "", StreamKind::Stdin).encode().unwrap();
        let mut bad_version = good.clone();
        bad_version[4] = 9;
        assert_eq!(
            StreamHeader::decode(&bad_version),
            Err(StdioHeaderError::BadVersion(9))
        );
        let mut bad_kind = good;
        bad_kind[5] = 3;
        assert_eq!(
            StreamHeader::decode(&bad_kind),
            Err(StdioHeaderError::BadKind(3))
        );
    }

    #[test]
    fn decode_with_truncated_body_returns_length_error() {
        let bytes = header("container", "exec", StreamKind::Stdout)
            .encode()
            .unwrap();
        assert_eq!(
            StreamHeader::decode(&bytes[..bytes.len() - 1]),
            Err(StdioHeaderError::BodyLength {
                got: 12,
                expected: 13
            })
        );
        assert!(StreamHeader::decode(&bytes[..3]).is_err());
    }

    #[test]
    fn decode_with_invalid_utf8_names_field() {
        let mut bytes = header("cc", "", StreamKind::Stdout).encode().unwrap();
        bytes[FIXED_LEN] = 0xff;
        assert_eq!(
            StreamHeader::decode(&bytes),
            Err(StdioHeaderError::NotUtf8 {
                field: "container_id"
            })
        );
    }

    #[test]
    fn decode_with_zero_container_length_returns_error() {
        let mut bytes = header("c", "", StreamKind::Stdout).encode().unwrap();
        bytes[6] = 0;
        assert_eq!(
            StreamHeader::decode(&bytes[..FIXED_LEN]),
            Err(StdioHeaderError::EmptyContainerId)
        );
    }

    #[test]
    fn reply_round_trips() {
        assert_eq!(
            AttachReply::decode(&AttachReply::Attached.encode()).unwrap(),
            AttachReply::Attached
        );
        let refused = AttachReply::Refused("unknown container_id \"x\"".into());
        assert_eq!(AttachReply::decode(&refused.encode()).unwrap(), refused);
    }

    #[test]
    fn reply_with_huge_reason_is_cut_on_char_boundary() {
        let reason = "é".repeat(40_000);
        let bytes = AttachReply::Refused(reason).encode();
        let AttachReply::Refused(decoded) = AttachReply::decode(&bytes).unwrap() else {
            panic!("expected a refusal");
        };
        assert!(decoded.len() <= usize::from(u16::MAX));
        assert!(decoded.chars().all(|c| c == 'é'));
    }

    #[test]
    fn reply_with_unknown_status_returns_error() {
        assert_eq!(
            AttachReply::decode(&[7, 0, 0]),
            Err(StdioHeaderError::BadReplyStatus(7))
        );
    }
}
