//! A vhost-user message relay that holds back what QEMU's virtio-net sends
//! too early.
//!
//! QEMU (7.2) enables a vhost-user net back end's rings with
//! `SET_VRING_ENABLE` the moment the guest driver negotiates features,
//! before it has sent the back end `SET_FEATURES`. The
//! vhost-user specification allows `SET_VRING_ENABLE` only once
//! `VHOST_USER_F_PROTOCOL_FEATURES` is negotiated, and rust-vmm's handler
//! enforces that: the early message fails the request loop and ends the
//! session. (Without the protocol feature QEMU refuses to start vhost net
//! at all; and QEMU does not repeat the message when it starts the
//! device, it counts on the early one.) So for net the front end talks to
//! this relay, which forwards every message to the back end's own socket
//! unchanged, file descriptors included, except that it holds
//! `SET_VRING_ENABLE` messages that come before the first `SET_FEATURES`
//! and forwards them, in order, right after it. The back end does not
//! offer `REPLY_ACK`; if a front end asks for a reply to a held message
//! anyway, the relay acks it at once itself.
//!
//! Message framing: a 12-byte header (`request`, `flags`, `size`, all u32
//! little-endian) and `size` payload bytes; file descriptors travel as
//! `SCM_RIGHTS` with the header.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HEADER_LEN: usize = 12;
/// vhost-user's largest payload (`MAX_MSG_SIZE`) and fd count.
const MAX_PAYLOAD: usize = 0x1000;
const MAX_FDS: usize = 32;
const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// One message with the descriptors that came with it.
struct Message {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes([self.bytes[0], self.bytes[1], self.bytes[2], self.bytes[3]])
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes([self.bytes[4], self.bytes[5], self.bytes[6], self.bytes[7]])
    }

    fn clear_need_reply(&mut self) {
        let flags = self.flags() & !FLAG_NEED_REPLY;
        self.bytes[4..8].copy_from_slice(&flags.to_le_bytes());
    }
}

/// Reads the next message; `None` when the peer closed the socket.
fn read_message(stream: &mut UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER_LEN];
    let mut raw_fds: [RawFd; MAX_FDS] = [-1; MAX_FDS];
    let mut iovecs = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    }];
    // SAFETY: the iovec points at `header`, live and unaliased for the
    // call, which recvmsg may fill with any bytes.
    let (read, fd_count) = unsafe { stream.recv_with_fds(&mut iovecs, &mut raw_fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds = raw_fds[..fd_count]
        .iter()
        // SAFETY: recvmsg just created these descriptors for this process;
        // nothing else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if read == 0 {
        return Ok(None);
    }
    stream.read_exact(&mut header[read..])?;
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message payload of {size} bytes exceeds {MAX_PAYLOAD}"),
        ));
    }
    let mut bytes = vec![0u8; HEADER_LEN + size];
    bytes[..HEADER_LEN].copy_from_slice(&header);
    stream.read_exact(&mut bytes[HEADER_LEN..])?;
    Ok(Some(Message { bytes, fds }))
}

fn write_message(stream: &UnixStream, message: &Message) -> io::Result<()> {
    let fds: Vec<RawFd> = message.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = stream
        .send_with_fds(&[&message.bytes[..]], &fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // The descriptors went with the first bytes; the rest is plain data.
    (&*stream).write_all(&message.bytes[sent..])
}

/// The ack a `NEED_REPLY` message gets: success (0).
fn ack(request: &Message) -> Message {
    let mut bytes = Vec::with_capacity(HEADER_LEN + 8);
    bytes.extend_from_slice(&request.request().to_le_bytes());
    bytes.extend_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
    bytes.extend_from_slice(&8u32.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    Message {
        bytes,
        fds: Vec::new(),
    }
}

/// Relays between `front` (QEMU) and `back` (the back end's socket) until
/// either side closes; then closes both.
pub fn relay(front: UnixStream, back: UnixStream) -> io::Result<()> {
    let front_writer = Arc::new(Mutex::new(front.try_clone()?));
    let replies = {
        let mut back = back.try_clone()?;
        let front_writer = front_writer.clone();
        thread::Builder::new()
            .name("vhost-user-relay".into())
            .spawn(move || -> io::Result<()> {
                while let Some(message) = read_message(&mut back)? {
                    let front = front_writer
                        .lock()
                        .map_err(|_| io::Error::other("relay lock poisoned"))?;
                    write_message(&front, &message)?;
                }
                Ok(())
            })?
    };
    let result = forward_requests(front, &back, &front_writer);
    // Either way the session is over: wake the other direction too.
    let _ = back.shutdown(std::net::Shutdown::Both);
    if let Ok(front) = front_writer.lock() {
        let _ = front.shutdown(std::net::Shutdown::Both);
    }
    let replied = replies
        .join()
        .map_err(|_| io::Error::other("relay reply thread panicked"))?;
    result.and(replied.or_else(|e| match e.kind() {
        // The front end left while a reply was on its way.
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => Ok(()),
        _ => Err(e),
    }))
}

/// Front end → back end, holding `SET_VRING_ENABLE` back until
/// `SET_FEATURES` has gone through.
fn forward_requests(
    mut front: UnixStream,
    back: &UnixStream,
    front_writer: &Mutex<UnixStream>,
) -> io::Result<()> {
    let mut features_set = false;
    let mut held_back = Vec::new();
    loop {
        let message = match read_message(&mut front) {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e),
        };
        if message.request() == SET_VRING_ENABLE && !features_set {
            tracing::debug!("vhost-user relay: SET_VRING_ENABLE before SET_FEATURES held back");
            if message.flags() & FLAG_NEED_REPLY != 0 {
                let front = front_writer
                    .lock()
                    .map_err(|_| io::Error::other("relay lock poisoned"))?;
                write_message(&front, &ack(&message))?;
            }
            held_back.push(message);
            continue;
        }
        tracing::trace!(
            "vhost-user relay: request {} ({} bytes, {} fds)",
            message.request(),
            message.bytes.len(),
            message.fds.len()
        );
        write_message(back, &message)?;
        if message.request() == SET_FEATURES {
            features_set = true;
            for mut held in held_back.drain(..) {
                // Its reply (if any) was sent already.
                held.clear_need_reply();
                write_message(back, &held)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    fn message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = request.to_le_bytes().to_vec();
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    fn read_raw(stream: &mut UnixStream) -> Option<Message> {
        read_message(stream).unwrap()
    }

    #[test]
    fn relay_holds_early_vring_enable_until_after_set_features_and_forwards_fds() {
        let (mut qemu, front) = UnixStream::pair().unwrap();
        let (back, mut backend) = UnixStream::pair().unwrap();
        let relay = thread::spawn(move || relay(front, back));
        let event = vmm_sys_util::eventfd::EventFd::new(0).unwrap();

        let early_enable = message(SET_VRING_ENABLE, FLAG_VERSION_1, &[0; 8]);
        let early_ack = message(SET_VRING_ENABLE, FLAG_VERSION_1 | FLAG_NEED_REPLY, &[0; 8]);
        let kick = message(12, FLAG_VERSION_1, &0u64.to_le_bytes());
        let features = message(SET_FEATURES, FLAG_VERSION_1, &[1; 8]);
        let late_enable = message(SET_VRING_ENABLE, FLAG_VERSION_1, &[2; 8]);
        qemu.write_all(&early_enable).unwrap();
        qemu.write_all(&early_ack).unwrap();
        let acked = read_raw(&mut qemu).unwrap();
        qemu.send_with_fds(&[&kick[..]], &[event.as_raw_fd()])
            .unwrap();
        qemu.write_all(&features).unwrap();
        qemu.write_all(&late_enable).unwrap();

        let got: Vec<Message> = (0..5).map(|_| read_raw(&mut backend).unwrap()).collect();
        assert_eq!(acked.bytes, message(SET_VRING_ENABLE, 0x5, &[0; 8]));
        assert_eq!(got[0].bytes, kick);
        assert_eq!(got[0].fds.len(), 1, "the kick eventfd travels along");
        assert_eq!(got[1].bytes, features);
        // The held ones, in order, without NEED_REPLY (answered already).
        assert_eq!(got[2].bytes, early_enable);
        assert_eq!(got[3].bytes, early_enable);
        assert_eq!(got[4].bytes, late_enable);

        // Replies go back; the front end leaving ends the relay.
        let reply = message(1, FLAG_VERSION_1 | FLAG_REPLY, &[7; 8]);
        backend.write_all(&reply).unwrap();
        assert_eq!(read_raw(&mut qemu).unwrap().bytes, reply);
        drop(qemu);
        relay.join().unwrap().unwrap();
        assert!(read_raw(&mut backend).is_none(), "back end sees the close");
    }

    #[test]
    fn relay_refuses_a_payload_beyond_the_protocol_maximum() {
        let (mut qemu, front) = UnixStream::pair().unwrap();
        let (back, _backend) = UnixStream::pair().unwrap();
        let relay = thread::spawn(move || relay(front, back));
        let mut bytes = message(5, FLAG_VERSION_1, &[]);
        bytes[8..12].copy_from_slice(&0x10_0000u32.to_le_bytes());

        qemu.write_all(&bytes).unwrap();

        let err = relay.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("1048576 bytes"), "{err}");
    }
}
