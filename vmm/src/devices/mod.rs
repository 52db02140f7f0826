//! Emulated devices and the buses they sit on.

pub mod boot_timer;
pub mod bus;
pub mod i8042;
pub mod log_file;
pub mod serial;
pub mod virtio;
