//! [`MacAddress`]: the guest NIC's Ethernet address, written
//! `02:00:00:00:00:01` in configs and on the command line.

use std::fmt;
use std::io;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A unicast Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress([u8; 6]);

/// Why a MAC address was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MacError {
    #[error("mac {0:?} is not six hex bytes separated by ':' (like 02:00:00:00:00:01)")]
    Syntax(String),
    #[error("mac {0} is a multicast address (lowest bit of the first byte set)")]
    Multicast(String),
    #[error("mac {0} is all zeroes")]
    Zero(String),
}

impl MacAddress {
    /// `bytes` as an address; multicast and all-zero addresses are refused
    /// (a NIC cannot own them).
    pub fn new(bytes: [u8; 6]) -> Result<Self, MacError> {
        let mac = Self(bytes);
        if bytes[0] & 1 != 0 {
            return Err(MacError::Multicast(mac.to_string()));
        }
        if bytes == [0; 6] {
            return Err(MacError::Zero(mac.to_string()));
        }
        Ok(mac)
    }

    /// A random locally administered unicast address (first byte `x2`,
    /// `x6`, `xA` or `xE`), as QEMU and Firecracker users pick by hand.
    pub fn random() -> io::Result<Self> {
        let mut bytes = [0u8; 6];
        let mut filled = 0;
        while filled < bytes.len() {
            let rest = &mut bytes[filled..];
            // SAFETY: `rest` is a valid, writable buffer of `rest.len()`
            // bytes for the duration of the call; getrandom writes at most
            // that many.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            filled += n.unsigned_abs();
        }
        // Locally administered, unicast.
        bytes[0] = (bytes[0] & 0xfc) | 0x02;
        // A zero address is impossible now (byte 0 has bit 1 set).
        Ok(Self(bytes))
    }

    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddress {
    type Err = MacError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || MacError::Syntax(s.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(syntax)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(syntax());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| syntax())?;
        }
        if parts.next().is_some() {
            return Err(syntax());
        }
        Self::new(bytes)
    }
}

impl Serialize for MacAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_roundtrips_through_text_in_lowercase() {
        let mac: MacAddress = "02:AB:cd:00:00:01".parse().unwrap();
        assert_eq!(mac.bytes(), [0x02, 0xab, 0xcd, 0, 0, 1]);
        assert_eq!(mac.to_string(), "02:ab:cd:00:00:01");
    }

    #[test]
    fn mac_with_bad_syntax_names_the_value() {
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "02-00-00-00-00-01",
            "2:00:00:00:00:01",
            "02:00:00:00:00:0g",
            "+2:00:00:00:00:01",
        ] {
            let err = bad.parse::<MacAddress>().unwrap_err();
            assert_eq!(err, MacError::Syntax(bad.to_string()));
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn mac_multicast_or_zero_is_refused() {
        let err = "01:00:5e:00:00:01".parse::<MacAddress>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "mac 01:00:5e:00:00:01 is a multicast address (lowest bit of the first byte set)"
        );
        assert!(matches!(
            "00:00:00:00:00:00".parse::<MacAddress>(),
            Err(MacError::Zero(_))
        ));
    }

    #[test]
    fn random_mac_is_locally_administered_unicast_and_varies() {
        let macs: Vec<MacAddress> = (0..8).map(|_| MacAddress::random().unwrap()).collect();
        for mac in &macs {
            assert_eq!(mac.bytes()[0] & 0x03, 0x02, "{mac}");
            MacAddress::new(mac.bytes()).unwrap();
        }
        assert!(macs.iter().any(|m| *m != macs[0]), "8 equal random macs");
    }
}
