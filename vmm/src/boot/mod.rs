//! Getting a guest from reset to its kernel's entry point.

pub mod acpi;
pub mod cmdline;
pub mod gdt;
pub mod layout;
pub mod loader;
pub mod mptable;
pub mod paging;
pub mod regs;
