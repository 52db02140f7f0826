//! The audit file: opened with `O_APPEND`, one `write(2)` per record.
//!
//! Several pod shims share one file. With `O_APPEND` the kernel moves to
//! the end and writes under the inode's lock, so whole lines from
//! different processes never interleave as long as each line goes out in
//! one `write`. A short write (disk full) could still cut a line: this
//! writer's next line then starts with a newline, so the cut line stays a
//! single malformed line that `cloister audit` reports. Another shim's
//! record may still land right behind the cut; `cloister audit` recovers
//! it from the record start inside the line. (Checking the file's last
//! byte at open would race with appends in flight: the size grows page by
//! page while a write is copied in.)
//!
//! A file renamed away (logrotate without `copytruncate`) is noticed at the
//! next record, which starts a new file at the path.
//!
//! A file that cannot be opened or written never stops the shim: the
//! failure is logged at error level (the first one, then every 100th, and
//! when writing works again, with the count of records lost), and the
//! record is still in the shim's log.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// How often a persisting failure is logged again.
const REPORT_EVERY: u64 = 100;

/// The append-only audit file of one shim.
#[derive(Debug)]
pub struct AuditWriter {
    path: PathBuf,
    file: Option<File>,
    /// Records not written since the last success.
    lost: u64,
    /// The last write was cut short: the file ends mid-line.
    torn: bool,
}

impl AuditWriter {
    /// A writer for `path`; the file (and its folder) is made on the first
    /// record.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            file: None,
            lost: 0,
            torn: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records lost since writing last worked.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Appends one line (newline included) in one `write`; failures are
    /// logged, counted, and never returned.
    pub fn append(&mut self, line: &str) {
        match self.try_append(line) {
            Ok(()) => {
                if self.lost > 0 {
                    tracing::error!(
                        path = %self.path.display(),
                        "audit file writable again; {} audit records were lost",
                        self.lost
                    );
                    self.lost = 0;
                }
            }
            Err(e) => {
                self.lost += 1;
                if self.lost == 1 || self.lost.is_multiple_of(REPORT_EVERY) {
                    tracing::error!(
                        path = %self.path.display(),
                        "AUDIT RECORD NOT WRITTEN ({} lost so far; the shim goes on, records stay in this log): {e}",
                        self.lost
                    );
                }
            }
        }
    }

    fn try_append(&mut self, line: &str) -> std::io::Result<()> {
        if self
            .file
            .as_ref()
            .is_some_and(|file| !self.is_current(file))
        {
            // Rotated away (logrotate's rename-and-create): the next
            // record starts the new file.
            self.file = None;
            self.torn = false;
        }
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(open_append(&self.path)?),
        };
        let mut bytes = Vec::with_capacity(line.len() + 1);
        if self.torn {
            bytes.push(b'\n');
        }
        bytes.extend_from_slice(line.as_bytes());
        match file.write(&bytes) {
            Ok(n) if n == bytes.len() => {
                self.torn = false;
                Ok(())
            }
            Ok(n) => {
                self.torn = n > 0 || self.torn;
                Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    format!("short write: {n} of {} bytes", bytes.len()),
                ))
            }
            Err(e) => {
                // Reopen next time: the file may have been rotated away or
                // its file system remounted.
                self.file = None;
                Err(e)
            }
        }
    }
}

impl AuditWriter {
    /// Whether `file` is still the one at the path (one `stat` per record).
    fn is_current(&self, file: &File) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(&self.path), file.metadata()) {
            (Ok(at_path), Ok(open)) => at_path.dev() == open.dev() && at_path.ino() == open.ino(),
            _ => false,
        }
    }
}

/// Opens `path` for appending, making its folder (0750) and the file
/// (0640) when missing: audit records name commands and pods, so they are
/// not for every user of the node.
pub fn open_append(path: &Path) -> std::io::Result<File> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(parent)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", parent.display())))?;
    }
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_lines_and_makes_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/audit.jsonl");
        let mut writer = AuditWriter::new(&path);
        writer.append("{\"n\":1}\n");
        writer.append("{\"n\":2}\n");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"n\":1}\n{\"n\":2}\n"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777 & !0o022, 0o640 & !0o022);
        assert_eq!(writer.lost(), 0);
    }

    #[test]
    fn a_rotated_file_is_followed_by_a_new_one_at_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let rotated = dir.path().join("audit.jsonl.1");
        let mut writer = AuditWriter::new(&path);
        writer.append("{\"n\":1}\n");
        std::fs::rename(&path, &rotated).unwrap();
        writer.append("{\"n\":2}\n");
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "{\"n\":1}\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"n\":2}\n");
        // Truncated in place (copytruncate): appends go on at the new end.
        std::fs::write(&path, "").unwrap();
        writer.append("{\"n\":3}\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"n\":3}\n");
    }

    #[test]
    fn an_unwritable_path_counts_lost_records_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the folder should be: the open fails whoever we are.
        let blocker = dir.path().join("blocker");
        std::fs::write(&blocker, "").unwrap();
        let path = blocker.join("audit.jsonl");
        let mut writer = AuditWriter::new(&path);
        writer.append("{}\n");
        writer.append("{}\n");
        assert_eq!(writer.lost(), 2);
        std::fs::remove_file(&blocker).unwrap();
        writer.append("{\"after\":true}\n");
        assert_eq!(writer.lost(), 0);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"after\":true}\n"
        );
    }

    #[test]
    fn a_full_disk_loses_records_without_failing() {
        // /dev/full answers every write with ENOSPC.
        if !Path::new("/dev/full").exists() {
            eprintln!("SKIP: no /dev/full");
            return;
        }
        let mut writer = AuditWriter::new(Path::new("/dev/full"));
        writer.append("{}\n");
        writer.append("{}\n");
        assert_eq!(writer.lost(), 2);
    }

    #[test]
    fn after_a_torn_line_the_next_record_starts_on_a_new_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut writer = AuditWriter::new(&path);
        writer.append("{\"n\":1}\n");
        // What a short write leaves behind.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"n\":")
            .unwrap();
        writer.torn = true;
        writer.append("{\"n\":3}\n");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"n\":1}\n{\"n\":\n{\"n\":3}\n");
    }

    /// Set by the concurrency test for the processes it starts.
    const CHILD_ENV: &str = "CLOISTER_AUDIT_WRITER_CHILD";
    const LINES_PER_WRITER: usize = 400;

    /// Lines long enough (about 3 KiB) that a non-atomic append would show.
    fn line(writer: &str, n: usize) -> String {
        let pad = "x".repeat(3000);
        format!("{{\"writer\":\"{writer}\",\"n\":{n},\"pad\":\"{pad}\"}}\n")
    }

    /// A writer process of the test below (does nothing when run alone).
    #[test]
    fn child_process_writer() {
        let Ok(spec) = std::env::var(CHILD_ENV) else {
            return;
        };
        let (path, name) = spec.split_once('|').unwrap();
        let mut writer = AuditWriter::new(Path::new(path));
        for n in 0..LINES_PER_WRITER {
            writer.append(&line(name, n));
        }
        assert_eq!(writer.lost(), 0);
    }

    #[test]
    fn concurrent_appends_from_threads_and_processes_never_tear_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let exe = std::env::current_exe().unwrap();
        let children: Vec<_> = (0..3)
            .map(|i| {
                std::process::Command::new(&exe)
                    .args([
                        "--exact",
                        "audit::writer::tests::child_process_writer",
                        "--test-threads=1",
                    ])
                    .env(CHILD_ENV, format!("{}|proc{i}", path.display()))
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    // Each thread its own writer, as each shim has its own.
                    let mut writer = AuditWriter::new(&path);
                    for n in 0..LINES_PER_WRITER {
                        writer.append(&line(&format!("thread{i}"), n));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        for mut child in children {
            assert!(child.wait().unwrap().success());
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut seen: std::collections::HashMap<String, Vec<u64>> = Default::default();
        for (i, line) in text.lines().enumerate() {
            let value: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("line {} torn: {e}", i + 1));
            seen.entry(value["writer"].as_str().unwrap().to_owned())
                .or_default()
                .push(value["n"].as_u64().unwrap());
        }
        assert_eq!(seen.len(), 7, "{:?}", seen.keys());
        for (writer, ns) in seen {
            // Every line of every writer, in that writer's order.
            let expected: Vec<u64> = (0..LINES_PER_WRITER as u64).collect();
            assert_eq!(ns, expected, "{writer}");
        }
    }
}
