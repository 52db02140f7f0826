//! `cloister-vmm`: one KVM microVM.
