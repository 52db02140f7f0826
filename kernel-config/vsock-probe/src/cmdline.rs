//! The probe's modes, read from the kernel command line (`/proc/cmdline`;
//! the kernel keeps keys with a dot from init's arguments and environment).

/// Errors in the probe's command-line keys.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    #[error("{key}={value}: not a number")]
    NotANumber { key: String, value: String },
    #[error("{key} needs {needs}")]
    Missing {
        key: &'static str,
        needs: &'static str,
    },
    #[error("vsock_probe.write_chunk={0}: must be a multiple of 8 between 8 and 1048576")]
    BadChunk(u32),
    #[error("no mode chosen: give vsock_probe.echo_port, .listen_port, .bulk_port, .rng_bytes or .blk_read_mib")]
    NoMode,
}

/// Prefix of every key the probe reads.
pub const KEY_PREFIX: &str = "vsock_probe.";

/// Which modes to run, with their parameters (see the crate docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeConfig {
    /// Echo mode: host port to connect to.
    pub echo_port: Option<u32>,
    /// After the echo: unbind and rebind the vsock driver (a driver reset,
    /// as on a guest reboot) and echo once more on the same port.
    pub rebind: bool,
    /// Accept mode: port to listen on, and how many connections to serve.
    pub listen: Option<(u32, u32)>,
    /// Bulk mode: host port to connect to, and MiB in each direction.
    pub bulk: Option<(u32, u32)>,
    /// Bytes per write in bulk mode (default [`crate::BULK_CHUNK`]). Linux
    /// sends a write of more than 32 KiB as one packet spread over several
    /// descriptors, which `vhost-device-vsock` 0.3.0 rejects (the stream
    /// stalls); benchmarks against it use 32 KiB.
    pub write_chunk: Option<u32>,
    /// Rng mode: bytes to read from `/dev/hwrng`.
    pub rng_bytes: Option<u32>,
    /// Block mode: MiB to read (and checksum) from `/dev/vda`, then KiB of
    /// [`crate::BLOCK_WRITE_SEED`] pattern to write at its start.
    pub block: Option<(u32, u32)>,
}

impl ProbeConfig {
    /// Reads the `vsock_probe.*` keys of a kernel command line; unknown
    /// keys of ours are ignored (a newer host may pass more).
    pub fn parse(cmdline: &str) -> Result<Self, CmdlineError> {
        let mut echo_port = None;
        let mut rebind = None;
        let mut listen_port = None;
        let mut connections = None;
        let mut bulk_port = None;
        let mut bulk_mib = None;
        let mut write_chunk = None;
        let mut rng_bytes = None;
        let mut blk_read_mib = None;
        let mut blk_write_kib = None;
        for word in cmdline.split_whitespace() {
            let Some(setting) = word.strip_prefix(KEY_PREFIX) else {
                continue;
            };
            let Some((key, value)) = setting.split_once('=') else {
                continue;
            };
            let slot = match key {
                "echo_port" => &mut echo_port,
                "rebind" => &mut rebind,
                "listen_port" => &mut listen_port,
                "connections" => &mut connections,
                "bulk_port" => &mut bulk_port,
                "bulk_mib" => &mut bulk_mib,
                "write_chunk" => &mut write_chunk,
                "rng_bytes" => &mut rng_bytes,
                "blk_read_mib" => &mut blk_read_mib,
                "blk_write_kib" => &mut blk_write_kib,
                _ => continue,
            };
            *slot = Some(value.parse::<u32>().map_err(|_| CmdlineError::NotANumber {
                key: format!("{KEY_PREFIX}{key}"),
                value: value.to_string(),
            })?);
        }
        let listen = match (listen_port, connections) {
            (Some(port), Some(n)) => Some((port, n)),
            (Some(_), None) => {
                return Err(CmdlineError::Missing {
                    key: "vsock_probe.listen_port",
                    needs: "vsock_probe.connections",
                })
            }
            (None, _) => None,
        };
        let bulk = match (bulk_port, bulk_mib) {
            (Some(port), Some(mib)) => Some((port, mib)),
            (Some(_), None) => {
                return Err(CmdlineError::Missing {
                    key: "vsock_probe.bulk_port",
                    needs: "vsock_probe.bulk_mib",
                })
            }
            (None, _) => None,
        };
        let block = blk_read_mib.map(|mib| (mib, blk_write_kib.unwrap_or(0)));
        if let Some(chunk) = write_chunk {
            if chunk == 0 || chunk % 8 != 0 || chunk > 1 << 20 {
                return Err(CmdlineError::BadChunk(chunk));
            }
        }
        let config = Self {
            echo_port,
            rebind: rebind.is_some_and(|r| r != 0),
            listen,
            bulk,
            write_chunk,
            rng_bytes,
            block,
        };
        if !config.has_mode() {
            return Err(CmdlineError::NoMode);
        }
        Ok(config)
    }

    /// Whether any mode is chosen (`write_chunk` alone is not a mode).
    pub fn has_mode(&self) -> bool {
        self.echo_port.is_some()
            || self.listen.is_some()
            || self.bulk.is_some()
            || self.rng_bytes.is_some()
            || self.block.is_some()
    }

    /// The kernel command-line words that select this configuration.
    pub fn to_cmdline(&self) -> String {
        let mut words = Vec::new();
        if let Some(port) = self.echo_port {
            words.push(format!("{KEY_PREFIX}echo_port={port}"));
        }
        if self.rebind {
            words.push(format!("{KEY_PREFIX}rebind=1"));
        }
        if let Some((port, n)) = self.listen {
            words.push(format!("{KEY_PREFIX}listen_port={port}"));
            words.push(format!("{KEY_PREFIX}connections={n}"));
        }
        if let Some((port, mib)) = self.bulk {
            words.push(format!("{KEY_PREFIX}bulk_port={port}"));
            words.push(format!("{KEY_PREFIX}bulk_mib={mib}"));
        }
        if let Some(chunk) = self.write_chunk {
            words.push(format!("{KEY_PREFIX}write_chunk={chunk}"));
        }
        if let Some(bytes) = self.rng_bytes {
            words.push(format!("{KEY_PREFIX}rng_bytes={bytes}"));
        }
        if let Some((read_mib, write_kib)) = self.block {
            words.push(format!("{KEY_PREFIX}blk_read_mib={read_mib}"));
            words.push(format!("{KEY_PREFIX}blk_write_kib={write_kib}"));
        }
        words.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_all_modes_among_other_kernel_arguments() {
        let line = "console=ttyS0 vsock_probe.echo_port=5000 vsock_probe.rebind=1 quiet vsock_probe.listen_port=1234 \
                    vsock_probe.connections=32 vsock_probe.bulk_port=5001 vsock_probe.bulk_mib=256 \
                    vsock_probe.write_chunk=16384 vsock_probe.future=1";
        let config = ProbeConfig::parse(line).unwrap();
        assert_eq!(
            config,
            ProbeConfig {
                echo_port: Some(5000),
                rebind: true,
                listen: Some((1234, 32)),
                bulk: Some((5001, 256)),
                write_chunk: Some(16384),
                rng_bytes: None,
                block: None,
            }
        );
        assert_eq!(ProbeConfig::parse(&config.to_cmdline()).unwrap(), config);
    }

    #[test]
    fn parse_with_bad_number_names_key_and_value() {
        let err = ProbeConfig::parse("vsock_probe.echo_port=50x0").unwrap_err();
        assert_eq!(err.to_string(), "vsock_probe.echo_port=50x0: not a number");
    }

    #[test]
    fn parse_of_listen_port_without_connections_fails() {
        let err = ProbeConfig::parse("vsock_probe.listen_port=1").unwrap_err();
        assert!(err.to_string().contains("vsock_probe.connections"), "{err}");
    }

    #[test]
    fn parse_of_write_chunk_not_a_multiple_of_8_fails() {
        let err =
            ProbeConfig::parse("vsock_probe.echo_port=1 vsock_probe.write_chunk=1001").unwrap_err();
        assert_eq!(err, CmdlineError::BadChunk(1001));
    }

    #[test]
    fn parse_reads_rng_and_block_modes() {
        let config = ProbeConfig::parse(
            "vsock_probe.rng_bytes=4096 vsock_probe.blk_read_mib=8 vsock_probe.blk_write_kib=1024",
        )
        .unwrap();
        assert_eq!(config.rng_bytes, Some(4096));
        assert_eq!(config.block, Some((8, 1024)));
        assert_eq!(ProbeConfig::parse(&config.to_cmdline()).unwrap(), config);
    }

    #[test]
    fn parse_without_any_mode_fails() {
        assert_eq!(
            ProbeConfig::parse("console=ttyS0"),
            Err(CmdlineError::NoMode)
        );
    }
}
