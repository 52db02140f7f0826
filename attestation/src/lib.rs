//! TEE evidence (SEV-SNP reports, TDX quotes) and its verification,
//! launch-measurement calculation, init-data, the KBS protocol client and the
//! `cloister-kbs` key broker.

pub mod certs;
pub mod initdata;
pub mod kbs;
pub mod measure;
pub mod pod_config;
pub mod snp;
pub mod tdx;

#[cfg(test)]
pub(crate) mod test_support;
