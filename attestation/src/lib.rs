//! TEE evidence (SEV-SNP reports, TDX quotes) and its verification,
//! launch-measurement calculation, init-data, the KBS protocol client and the
//! `cloister-kbs` key broker.
//!
//! Features: the base (`certs`, `snp`, `tdx`, `measure`, `initdata`) needs
//! no async runtime or network stack, so the VMM can share the measurement
//! code; `kbs-client` adds the KBS protocol and client, `kbs-server` the
//! broker. Both are on by default.

pub mod certs;
pub mod initdata;
#[cfg(feature = "kbs-client")]
pub mod kbs;
pub mod measure;
pub mod snp;
pub mod tdx;

#[cfg(test)]
pub(crate) mod test_support;
