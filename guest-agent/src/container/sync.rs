//! Messages between the agent and a container init helper on their
//! socketpair: u32 big-endian length + JSON.
//!
//! ```text
//! agent → helper   Plan(HelperPlan)
//! helper → agent   Ready { root }       (create: set up, waiting for Start)
//!                  Forked { pid }       (exec: the process that will exec)
//!                  Console + 1 byte     (terminal: pty master as SCM_RIGHTS)
//!                  Error { message }    (any step failed; helper exits)
//! agent → helper   Start                (create only)
//! helper           execve: the socket is close-on-exec, so EOF = success
//! ```

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use super::plan::HelperPlan;
pub use super::setup::RootSwitch;

/// Largest frame accepted (plans carry seccomp programs).
pub const MAX_FRAME: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToHelper {
    Plan(Box<HelperPlan>),
    Start,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromHelper {
    /// Set up and waiting for Start; says how the root was entered.
    Ready {
        root: RootSwitch,
    },
    Forked {
        pid: i32,
    },
    /// The next byte on the socket carries the pty master (SCM_RIGHTS).
    Console,
    Error {
        message: String,
    },
}

/// Encodes one frame.
pub fn encode<T: Serialize>(message: &T) -> io::Result<Vec<u8>> {
    let body = serde_json::to_vec(message).map_err(io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Decodes a frame body after its length was read.
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> io::Result<T> {
    serde_json::from_slice(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Checks a frame length.
pub fn check_len(len: [u8; 4]) -> io::Result<usize> {
    let len = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sync frame of {len} bytes"),
        ));
    }
    Ok(len)
}

/// Blocking read of one frame; `Ok(None)` on EOF before a frame.
pub fn read_blocking<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut body = vec![0u8; check_len(len)?];
    r.read_exact(&mut body)?;
    decode(&body).map(Some)
}

/// Blocking write of one frame.
pub fn write_blocking<T: Serialize>(w: &mut impl Write, message: &T) -> io::Result<()> {
    w.write_all(&encode(message)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write_blocking(&mut buf, &FromHelper::Forked { pid: 42 }).unwrap();
        write_blocking(
            &mut buf,
            &FromHelper::Error {
                message: "x".into(),
            },
        )
        .unwrap();
        let mut r = buf.as_slice();
        assert_eq!(
            read_blocking::<FromHelper>(&mut r).unwrap(),
            Some(FromHelper::Forked { pid: 42 })
        );
        assert!(matches!(
            read_blocking::<FromHelper>(&mut r).unwrap(),
            Some(FromHelper::Error { .. })
        ));
        assert_eq!(read_blocking::<FromHelper>(&mut r).unwrap(), None);
    }

    #[test]
    fn oversized_frame_returns_error() {
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        assert!(read_blocking::<FromHelper>(&mut r).is_err());
    }
}
