//! Intel TDX launch of a firmware-less direct boot: the region list and
//! its MRTD ([`direct_boot`]), the ioctl sequence ([`launch`]), quote
//! requests ([`quote`]) and the uAPI structs kvm-bindings lacks ([`uapi`]).

pub mod direct_boot;
pub mod launch;
pub mod quote;
pub mod uapi;
