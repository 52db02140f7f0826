//! `/init` of the vsock test guest: runs the modes the kernel command line
//! chooses (see the library docs), reports on the console, reboots.
//!
//! Build it static like every `/init`:
//! `kernel-config/build-initramfs.sh --package cloister-vsock-probe`.

mod vsock;

use std::ffi::CStr;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::thread;
use std::time::Instant;

use cloister_vsock_probe::{
    Pattern, ProbeConfig, StreamHash, BLOCK_READ_MARKER, BLOCK_WRITE_SEED, BLOCK_WRITTEN_MARKER,
    BULK_CHUNK, DONE_MARKER, FAIL_PREFIX, GUEST_PATTERN_SEED, HOST_CID, LISTENING_MARKER,
    REBIND_MARKER, RNG_MARKER, START_MARKER,
};

use vsock::{VsockListener, VsockStream};

fn main() {
    say(START_MARKER);
    match run() {
        Ok(()) => say(DONE_MARKER),
        Err(e) => say(&format!("{FAIL_PREFIX}: {e}")),
    }
    reboot();
}

fn run() -> Result<(), String> {
    mount_proc()?;
    let cmdline = std::fs::read_to_string("/proc/cmdline")
        .map_err(|e| format!("cannot read /proc/cmdline: {e}"))?;
    let config = ProbeConfig::parse(&cmdline).map_err(|e| e.to_string())?;
    if let Some(bytes) = config.rng_bytes {
        rng(bytes)?;
    }
    if let Some((read_mib, write_kib)) = config.block {
        block(read_mib, write_kib)?;
    }
    if let Some(port) = config.echo_port {
        echo_to_host(port)?;
        if config.rebind {
            rebind_vsock_driver()?;
            echo_to_host(port)?;
        }
    }
    if let Some((port, connections)) = config.listen {
        accept(port, connections)?;
    }
    if let Some((port, mib)) = config.bulk {
        let chunk = config.write_chunk.map_or(BULK_CHUNK, |c| c as usize);
        bulk(port, mib, chunk)?;
    }
    Ok(())
}

fn echo_to_host(port: u32) -> Result<(), String> {
    let started = Instant::now();
    let stream = VsockStream::connect(HOST_CID, port)
        .map_err(|e| format!("echo: connect to {HOST_CID}:{port}: {e}"))?;
    let echoed = echo(stream).map_err(|e| format!("echo on port {port}: {e}"))?;
    say(&format!(
        "vsock-probe: echo: {echoed} bytes echoed to host port {port} in {:.3} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Where virtio drivers list their devices.
const VIRTIO_DRIVERS: &str = "/sys/bus/virtio/drivers";

/// The vsock driver's sysfs folder (named after the module,
/// `vmw_vsock_virtio_transport`).
fn vsock_driver() -> Result<std::path::PathBuf, String> {
    std::fs::read_dir(VIRTIO_DRIVERS)
        .map_err(|e| format!("rebind: list {VIRTIO_DRIVERS}: {e}"))?
        .filter_map(Result::ok)
        .find(|entry| entry.file_name().to_string_lossy().contains("vsock"))
        .map(|entry| entry.path())
        .ok_or_else(|| format!("rebind: no vsock driver in {VIRTIO_DRIVERS}"))
}

/// Unbinds the vsock driver from its device and binds it again: the driver
/// resets the device and sets it up from scratch.
fn rebind_vsock_driver() -> Result<(), String> {
    mount_fs(c"sysfs", c"/sys", c"sysfs", "/sys/bus")?;
    let driver = vsock_driver()?;
    let device = std::fs::read_dir(&driver)
        .map_err(|e| format!("rebind: list {}: {e}", driver.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("virtio"))
        .ok_or_else(|| format!("rebind: no device bound to {}", driver.display()))?;
    for action in ["unbind", "bind"] {
        std::fs::write(driver.join(action), &device)
            .map_err(|e| format!("rebind: {action} {device}: {e}"))?;
    }
    say(&format!(
        "{REBIND_MARKER} ({device} unbound and bound again)"
    ));
    Ok(())
}

/// Copies everything read back to the peer until it shuts down its side;
/// then shuts down ours. Returns the byte count.
fn echo(mut stream: VsockStream) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        stream.write_all(&buf[..n])?;
        total += n as u64;
    }
    stream.shutdown_write()?;
    Ok(total)
}

/// Listens on `port` and echoes on `connections` connections at once.
fn accept(port: u32, connections: u32) -> Result<(), String> {
    let listener = VsockListener::bind(port, connections.max(1))
        .map_err(|e| format!("accept: listen on port {port}: {e}"))?;
    say(&format!("{LISTENING_MARKER} on port {port}"));
    let started = Instant::now();
    let mut workers = Vec::new();
    for i in 0..connections {
        let (stream, peer) = listener
            .accept()
            .map_err(|e| format!("accept: connection {i} on port {port}: {e}"))?;
        workers.push(thread::spawn(move || {
            echo(stream).map_err(|e| format!("accept: connection {i} from {peer}: {e}"))
        }));
    }
    let mut total = 0;
    for worker in workers {
        total += worker
            .join()
            .map_err(|_| "accept: an echo thread panicked".to_string())??;
    }
    say(&format!(
        "vsock-probe: accept: {connections} connections on port {port}, {total} bytes echoed in {:.3} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Receives `mib` MiB, sends their checksum, sends `mib` MiB of pattern
/// (`write_chunk` bytes per write) and their checksum.
fn bulk(port: u32, mib: u32, write_chunk: usize) -> Result<(), String> {
    let fail = |what: &str, e: io::Error| format!("bulk on port {port}: {what}: {e}");
    let mut stream = VsockStream::connect(HOST_CID, port).map_err(|e| fail("connect", e))?;
    let len = u64::from(mib) << 20;
    let mut buf = vec![0u8; BULK_CHUNK.max(write_chunk)];
    let mut received = StreamHash::new();
    let started = Instant::now();
    while received.len() < len {
        let want = usize::try_from(len - received.len())
            .unwrap_or(BULK_CHUNK)
            .min(BULK_CHUNK);
        match stream.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(format!(
                    "bulk on port {port}: host closed after {} of {len} bytes",
                    received.len()
                ))
            }
            Ok(n) => received.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail("receive", e)),
        }
    }
    let rx_secs = started.elapsed().as_secs_f64();
    stream
        .write_all(&received.finish().to_le_bytes())
        .map_err(|e| fail("send rx checksum", e))?;
    let mut pattern = Pattern::new(GUEST_PATTERN_SEED);
    let mut sent = StreamHash::new();
    let started = Instant::now();
    while sent.len() < len {
        let n = usize::try_from(len - sent.len())
            .unwrap_or(write_chunk)
            .min(write_chunk);
        pattern.fill(&mut buf[..n]);
        sent.update(&buf[..n]);
        stream.write_all(&buf[..n]).map_err(|e| fail("send", e))?;
    }
    stream
        .write_all(&sent.finish().to_le_bytes())
        .map_err(|e| fail("send tx checksum", e))?;
    stream.shutdown_write().map_err(|e| fail("shutdown", e))?;
    // Wait for the host to close: the data is then out of our buffers.
    let _ = stream.read(&mut buf);
    let tx_secs = started.elapsed().as_secs_f64();
    say(&format!(
        "vsock-probe: bulk: {mib} MiB in {rx_secs:.3} s, {mib} MiB out in {tx_secs:.3} s \
         ({write_chunk}-byte writes, guest clock)"
    ));
    Ok(())
}

/// Reads `bytes` bytes of entropy from the virtio-rng device.
fn rng(bytes: u32) -> Result<(), String> {
    mount_dev()?;
    let mut data = vec![0u8; bytes as usize];
    std::fs::File::open("/dev/hwrng")
        .and_then(|mut f| f.read_exact(&mut data))
        .map_err(|e| format!("rng: read {bytes} bytes from /dev/hwrng: {e}"))?;
    let mut seen = [false; 256];
    for byte in &data {
        seen[usize::from(*byte)] = true;
    }
    let distinct = seen.iter().filter(|s| **s).count();
    say(&format!(
        "{RNG_MARKER}{bytes} bytes, {distinct} distinct values"
    ));
    Ok(())
}

/// Reads `read_mib` MiB of `/dev/vda` and prints their checksum, then
/// writes `write_kib` KiB of pattern at its start and syncs.
fn block(read_mib: u32, write_kib: u32) -> Result<(), String> {
    mount_dev()?;
    let fail = |what: &str, e: io::Error| format!("blk: {what} /dev/vda: {e}");
    let mut disk = std::fs::OpenOptions::new()
        .read(true)
        .write(write_kib > 0)
        .open("/dev/vda")
        .map_err(|e| fail("open", e))?;
    let mut buf = vec![0u8; BULK_CHUNK];
    let mut hash = StreamHash::new();
    let len = u64::from(read_mib) << 20;
    while hash.len() < len {
        let n = usize::try_from(len - hash.len())
            .unwrap_or(BULK_CHUNK)
            .min(BULK_CHUNK);
        disk.read_exact(&mut buf[..n])
            .map_err(|e| fail("read", e))?;
        hash.update(&buf[..n]);
    }
    say(&format!("{BLOCK_READ_MARKER}{:016x}", hash.finish()));
    if write_kib == 0 {
        return Ok(());
    }
    disk.seek(SeekFrom::Start(0)).map_err(|e| fail("seek", e))?;
    let mut pattern = Pattern::new(BLOCK_WRITE_SEED);
    let mut left = u64::from(write_kib) << 10;
    while left > 0 {
        let n = usize::try_from(left).unwrap_or(BULK_CHUNK).min(BULK_CHUNK);
        pattern.fill(&mut buf[..n]);
        disk.write_all(&buf[..n]).map_err(|e| fail("write", e))?;
        left -= n as u64;
    }
    disk.sync_all().map_err(|e| fail("sync", e))?;
    say(BLOCK_WRITTEN_MARKER);
    Ok(())
}

/// Mounts devtmpfs on /dev unless the device nodes are there already (the
/// kernel does not mount it for an initramfs).
fn mount_dev() -> Result<(), String> {
    mount_fs(c"devtmpfs", c"/dev", c"devtmpfs", "/dev/null")
}

fn mount_proc() -> Result<(), String> {
    mount_fs(c"proc", c"/proc", c"proc", "/proc/self")
}

/// Mounts `fstype` on `target` unless `present` shows it is there already.
fn mount_fs(source: &CStr, target: &CStr, fstype: &CStr, present: &str) -> Result<(), String> {
    if std::path::Path::new(present).exists() {
        return Ok(());
    }
    let target_path = target.to_string_lossy().into_owned();
    let _ = std::fs::create_dir_all(&target_path);
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call
    // and no data.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "mount {} on {target_path}: {}",
            fstype.to_string_lossy(),
            io::Error::last_os_error()
        ))
    }
}

/// One line on the console (stdout), flushed; errors are ignored because
/// there is nowhere else to report them.
fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Ends the VM: without ACPI the guest cannot power off, so it reboots and
/// the VMM (`-no-reboot`, `reboot=t`) exits.
fn reboot() -> ! {
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot() with a valid command; PID 1 holds CAP_SYS_BOOT. It
    // only returns on failure.
    let rc = unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    say(&format!(
        "vsock-probe: reboot failed (rc {rc}): {}",
        io::Error::last_os_error()
    ));
    loop {
        // SAFETY: pause() takes no arguments and only returns on a signal.
        unsafe { libc::pause() };
    }
}
