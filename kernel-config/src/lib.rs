//! The guest image: which Kconfig options the guest kernel needs, and the newc initramfs that carries `/init`.
