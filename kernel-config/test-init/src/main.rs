//! Placeholder until the boot-test init lands.
fn main() {}
