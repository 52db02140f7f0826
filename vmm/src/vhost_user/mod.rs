//! The devices of `cloister-vmm` served to another VMM (QEMU) over
//! vhost-user.
//!
//! vhost-user primer: the front end (QEMU) owns the virtio transport the
//! guest sees. Over a Unix socket it hands the back end (us) the guest's
//! RAM as file descriptors (so guest memory must be shareable: QEMU's
//! `memory-backend-memfd,share=on`), the ring addresses of each virtqueue,
//! and two eventfds per queue: *kick* (guest → device, the driver made
//! buffers available) and *call* (device → guest, an interrupt). From then
//! on the back end reads and writes the rings in guest memory directly and
//! QEMU only forwards config-space accesses (`GET_CONFIG`) and lifecycle
//! messages. rust-vmm's `vhost-user-backend` implements the protocol; this
//! module adapts our transport-independent [`VirtioDevice`] to it, so the
//! same device code serves `cloister-vmm`'s virtio-mmio guests and QEMU's.
//!
//! One process serves one device to one front end and returns when the
//! front end disconnects (QEMU exits), like `vhost-device-*` and virtiofsd.

mod backend;
pub mod cli;
#[cfg(test)]
mod fs_frontend_tests;
mod relay;

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

pub use backend::{Activation, VhostUserDevice};

use crate::devices::virtio::device::{device_type, VirtioDevice};

/// Errors serving a device over vhost-user.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    // vhost_user_backend::Error implements Display only, hence `reason`.
    #[error("cannot set up the vhost-user back end for {device}: {reason}")]
    Daemon {
        device: String,
        reason: vhost_user_backend::Error,
    },
    #[error("cannot watch {device}'s host event fd: {source}")]
    HostEvent {
        device: String,
        source: std::io::Error,
    },
    #[error("cannot relay vhost-user messages for {device} on {socket}: {source}")]
    Relay {
        device: String,
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("vhost-user back end for {device} on {socket} failed: {reason}")]
    Serve {
        device: String,
        socket: PathBuf,
        reason: vhost_user_backend::Error,
    },
}

/// Serves `device` on the vhost-user socket `socket` (created; a stale file
/// there is replaced) to one front end, until it disconnects.
pub fn serve(device: Box<dyn VirtioDevice>, socket: &Path) -> Result<(), VhostUserError> {
    let name = device.name().to_string();
    // See `relay` for why net goes through one.
    let relayed = device.device_type() == device_type::NET;
    let backend = Arc::new(Mutex::new(VhostUserDevice::new(device)));
    let mut daemon = VhostUserDaemon::new(
        format!("vhost-user-{name}"),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|reason| VhostUserError::Daemon {
        device: name.clone(),
        reason,
    })?;
    watch_host_events(&daemon, &backend).map_err(|source| VhostUserError::HostEvent {
        device: name.clone(),
        source,
    })?;
    tracing::info!("{name}: serving vhost-user on {}", socket.display());
    let relay_error = |source| VhostUserError::Relay {
        device: name.clone(),
        socket: socket.to_path_buf(),
        source,
    };
    let (backend_socket, relay) = if relayed {
        let backend_socket = relay_backend_socket(socket);
        let relay = start_relay(socket, backend_socket.clone()).map_err(relay_error)?;
        (backend_socket, Some(relay))
    } else {
        (socket.to_path_buf(), None)
    };
    daemon
        .serve(&backend_socket)
        .map_err(|reason| VhostUserError::Serve {
            device: name.clone(),
            socket: socket.to_path_buf(),
            reason,
        })?;
    if let Some(relay) = relay {
        relay
            .join()
            .map_err(|_| std::io::Error::other("relay thread panicked"))
            .and_then(|result| result)
            .map_err(relay_error)?;
    }
    let metrics = backend
        .lock()
        .map(|backend| backend.metrics_json())
        .unwrap_or_default();
    tracing::info!("{name}: front end disconnected; metrics {metrics}");
    Ok(())
}

/// Where the back end listens when a relay sits in front of it: beside
/// the public socket.
fn relay_backend_socket(socket: &Path) -> PathBuf {
    let mut path = socket.as_os_str().to_owned();
    path.push(".backend");
    PathBuf::from(path)
}

/// Listens on `socket` (replacing a stale file) and, on a thread, accepts
/// the front end, connects to the back end at `backend_socket` once it
/// listens, and relays until either side leaves. The back end's socket
/// file is removed once connected.
fn start_relay(
    socket: &Path,
    backend_socket: PathBuf,
) -> std::io::Result<thread::JoinHandle<std::io::Result<()>>> {
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(socket)?;
    thread::Builder::new()
        .name("vhost-user-relay".into())
        .spawn(move || {
            let (front, _) = listener.accept()?;
            let started = Instant::now();
            let back = loop {
                match UnixStream::connect(&backend_socket) {
                    Ok(back) => break back,
                    Err(e) if started.elapsed() > Duration::from_secs(10) => return Err(e),
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            };
            let _ = std::fs::remove_file(&backend_socket);
            relay::relay(front, back)
        })
}

/// Registers the device's host event fd with the (single) vring worker.
fn watch_host_events(
    daemon: &VhostUserDaemon<Arc<Mutex<VhostUserDevice>>>,
    backend: &Mutex<VhostUserDevice>,
) -> std::io::Result<()> {
    // A poisoned lock means a device call panicked; nothing to serve.
    let poisoned = |_| std::io::Error::other("device lock poisoned");
    let (fd, id) = {
        let backend = backend.lock().map_err(poisoned)?;
        match backend.host_event_fd() {
            Some(fd) => (fd, backend.host_event_id()),
            None => return Ok(()),
        }
    };
    let handlers = daemon.get_epoll_handlers();
    let Some(worker) = handlers.first() else {
        return Err(std::io::Error::other("no vring worker"));
    };
    // Not under the device lock: the worker asks the backend (locking it)
    // for its queue count.
    worker.register_listener(fd, EventSet::IN, u64::from(id))?;
    backend
        .lock()
        .map_err(poisoned)?
        .attach_epoll(worker.as_raw_fd());
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::thread;
    use std::time::{Duration, Instant};

    use vhost::vhost_user::message::{
        VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    };
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::VhostBackend;

    use super::*;
    use crate::devices::virtio::device::VIRTIO_F_VERSION_1;
    use crate::devices::virtio::vsock::VsockDevice;

    /// The protocol path QEMU takes before it starts the rings, from a real
    /// front end (rust-vmm's) over the socket.
    #[test]
    fn serve_answers_a_front_end_and_returns_when_it_disconnects() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vhu.sock");
        let device = VsockDevice::new(7, dir.path().join("v.sock")).unwrap();
        let (done, result) = mpsc::channel();
        let server_socket = socket.clone();
        thread::spawn(move || {
            let _ = done.send(serve(Box::new(device), &server_socket).map_err(|e| e.to_string()));
        });
        let started = Instant::now();
        let mut frontend = loop {
            match Frontend::connect(&socket, 8) {
                Ok(frontend) => break frontend,
                Err(e) if started.elapsed() > Duration::from_secs(10) => {
                    panic!("no vhost-user socket within 10 s: {e}")
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        };

        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        frontend.set_features(features).unwrap();
        let protocol = frontend.get_protocol_features().unwrap();
        frontend.set_protocol_features(protocol).unwrap();
        let queues = frontend.get_queue_num().unwrap();
        let (_, config) = frontend
            .get_config(0, 8, VhostUserConfigFlags::empty(), &[0; 8])
            .unwrap();
        drop(frontend);
        let served = result.recv_timeout(Duration::from_secs(10));

        assert_ne!(features & VIRTIO_F_VERSION_1, 0);
        assert_ne!(
            features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        assert!(protocol.contains(VhostUserProtocolFeatures::CONFIG));
        // rx and tx: QEMU keeps vsock's event queue to itself.
        assert_eq!(queues, 2);
        assert_eq!(config, 7u64.to_le_bytes());
        assert_eq!(
            served,
            Ok(Ok(())),
            "serve returns Ok once the front end left"
        );
    }
}
