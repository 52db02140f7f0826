//! TEE evidence (SEV-SNP reports, TDX quotes) and its verification,
//! launch-measurement calculation, init-data, the KBS protocol client and the
//! `cloister-kbs` key broker.
//!
//! Features: the base (`measure`, `initdata`) is what the VMM shares, with
//! no async runtime, network stack or signature crypto; `verify` adds
//! `certs`, `snp` and `tdx`, `kbs-client` the KBS protocol and client,
//! `kbs-server` the broker. All are on by default.

#[cfg(feature = "verify")]
pub mod certs;
pub mod initdata;
#[cfg(feature = "kbs-client")]
pub mod kbs;
pub mod measure;
#[cfg(feature = "kbs-client")]
pub mod pod_config;
#[cfg(feature = "verify")]
pub mod snp;
#[cfg(feature = "verify")]
pub mod tdx;

#[cfg(all(test, feature = "verify"))]
pub(crate) mod test_support;
