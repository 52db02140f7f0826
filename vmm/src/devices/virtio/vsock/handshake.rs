//! The host side of a host-initiated connection before it exists: the
//! client's `CONNECT <port>\n` line.
//!
//! The line is read one byte at a time so that nothing the client sends
//! after the newline (the first bytes of the stream) is consumed here; those
//! bytes stay in the socket for the connection to forward.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::MAX_CONNECT_LINE;

/// Why a `CONNECT` line was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("connect line {0:?} is not `CONNECT <port>`")]
    Malformed(String),
    #[error("connect line has no newline within {0} bytes")]
    TooLong(usize),
    #[error("client closed the socket after {0} bytes of its connect line")]
    Eof(usize),
    #[error("cannot read the connect line: {0}")]
    Io(String),
}

/// Parses one line (without its `\n`): `CONNECT <decimal u32>`, with
/// surrounding ASCII whitespace tolerated as Firecracker does.
pub fn parse_connect_line(line: &[u8]) -> Result<u32, HandshakeError> {
    let malformed = || HandshakeError::Malformed(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| malformed())?;
    let mut words = text.split_ascii_whitespace();
    let (Some("CONNECT"), Some(port), None) = (words.next(), words.next(), words.next()) else {
        return Err(malformed());
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    port.parse::<u32>().map_err(|_| malformed())
}

/// What reading the line so far produced.
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeStep {
    /// No complete line yet; wait for more bytes.
    Pending,
    /// The client asked for guest port `0`.
    Connect(u32),
}

/// A host client that connected to the listener and has not finished its
/// `CONNECT` line.
#[derive(Debug)]
pub struct PendingHandshake {
    pub stream: UnixStream,
    line: Vec<u8>,
    pub deadline: Instant,
}

impl PendingHandshake {
    pub fn new(stream: UnixStream, deadline: Instant) -> Self {
        Self {
            stream,
            line: Vec::with_capacity(MAX_CONNECT_LINE),
            deadline,
        }
    }

    /// Reads what the (non-blocking) socket has, up to the newline.
    pub fn read_line(&mut self) -> Result<HandshakeStep, HandshakeError> {
        loop {
            let mut byte = [0u8; 1];
            match self.stream.read(&mut byte) {
                Ok(0) => return Err(HandshakeError::Eof(self.line.len())),
                Ok(_) if byte[0] == b'\n' => {
                    return parse_connect_line(&self.line).map(HandshakeStep::Connect)
                }
                Ok(_) => {
                    // The newline must fit in the bound too.
                    if self.line.len() + 1 >= MAX_CONNECT_LINE {
                        return Err(HandshakeError::TooLong(MAX_CONNECT_LINE));
                    }
                    self.line.push(byte[0]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(HandshakeStep::Pending)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(HandshakeError::Io(e.to_string())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn parse_with_valid_line_returns_port() {
        assert_eq!(parse_connect_line(b"CONNECT 1024"), Ok(1024));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295\r"), Ok(u32::MAX));
        assert_eq!(parse_connect_line(b"  CONNECT   0 "), Ok(0));
    }

    #[test]
    fn parse_with_bad_line_returns_malformed_naming_line() {
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT abc",
            b"CONNECT -1",
            b"CONNECT +5",
            b"CONNECT 4294967296",
            b"CONNECT 1 2",
            b"connect 1",
            b"OK 1",
            b"",
            b"CONNECT \xff",
        ] {
            let e = parse_connect_line(bad).unwrap_err();
            assert!(matches!(e, HandshakeError::Malformed(_)), "{bad:?}: {e}");
        }
        let e = parse_connect_line(b"CONNECT x1").unwrap_err();
        assert!(e.to_string().contains("CONNECT x1"), "{e}");
    }

    fn pair() -> (PendingHandshake, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (PendingHandshake::new(a, Instant::now()), b)
    }

    #[test]
    fn read_line_with_split_writes_returns_pending_then_port() {
        let (mut hs, mut client) = pair();
        client.write_all(b"CONN").unwrap();
        assert_eq!(hs.read_line(), Ok(HandshakeStep::Pending));
        client.write_all(b"ECT 52\nrest").unwrap();
        assert_eq!(hs.read_line(), Ok(HandshakeStep::Connect(52)));
        // Bytes after the newline are left for the connection.
        let mut rest = [0u8; 4];
        hs.stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"rest");
    }

    #[test]
    fn read_line_with_no_newline_within_bound_returns_too_long() {
        let (mut hs, mut client) = pair();
        client.write_all(&[b'7'; MAX_CONNECT_LINE]).unwrap();
        assert_eq!(
            hs.read_line(),
            Err(HandshakeError::TooLong(MAX_CONNECT_LINE))
        );
    }

    #[test]
    fn read_line_with_client_gone_returns_eof() {
        let (mut hs, mut client) = pair();
        client.write_all(b"CONNECT 1").unwrap();
        drop(client);
        assert_eq!(hs.read_line(), Err(HandshakeError::Eof(9)));
    }
}
