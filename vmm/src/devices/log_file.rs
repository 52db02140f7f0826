//! A guest's console written to a host file, bounded: the guest decides
//! what it prints, and an unbounded log would let it fill the host's disk.

use std::io::{self, Write};

/// Most bytes of guest output one VMM writes to a log file (serial or
/// virtio console); what comes after is dropped.
pub const GUEST_LOG_FILE_LIMIT: u64 = 64 << 20;

/// Passes writes through to `inner` until `limit` bytes, then writes one
/// notice and drops the rest (still reporting it written, so the guest's
/// console never stalls or errors on it).
pub struct BoundedLog<W> {
    inner: W,
    limit: u64,
    written: u64,
    dropped: u64,
}

impl<W: Write> BoundedLog<W> {
    pub fn new(inner: W, limit: u64) -> Self {
        Self {
            inner,
            limit,
            written: 0,
            dropped: 0,
        }
    }

    /// Bytes the guest wrote past the limit.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl<W: Write> Write for BoundedLog<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.limit.saturating_sub(self.written);
        if room == 0 {
            self.dropped += buf.len() as u64;
            return Ok(buf.len());
        }
        let take = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.write(&buf[..take])?;
        self.written += n as u64;
        if self.written >= self.limit {
            let _ = write!(
                self.inner,
                "\n[cloister-vmm: guest output reached the {} byte limit; the rest is dropped]\n",
                self.limit
            );
            let _ = self.inner.flush();
            self.dropped += (buf.len() - n) as u64;
            return Ok(buf.len());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_past_the_limit_is_dropped_after_one_notice() {
        let mut log = BoundedLog::new(Vec::new(), 10);

        log.write_all(b"0123456").unwrap();
        log.write_all(b"789abcdef").unwrap();
        log.write_all(b"more").unwrap();

        let text = String::from_utf8(log.inner.clone()).unwrap();
        assert!(
            text.starts_with("0123456789\n[cloister-vmm: guest output reached the 10 byte limit")
        );
        assert_eq!(text.matches("cloister-vmm").count(), 1);
        assert_eq!(log.dropped(), 6 + 4);
    }

    #[test]
    fn output_below_the_limit_passes_unchanged() {
        let mut log = BoundedLog::new(Vec::new(), 100);

        log.write_all(b"hello\n").unwrap();

        assert_eq!(log.inner, b"hello\n");
        assert_eq!(log.dropped(), 0);
    }
}
