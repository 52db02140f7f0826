//! Puts a Linux guest into memory: the kernel (vmlinux ELF, PVH entry when
//! it has one; or bzImage), the initramfs, the command line, the memory map
//! and the boot structure the entry ABI expects (`hvm_start_info` for PVH,
//! `boot_params` for the 64-bit protocol).

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use super::layout::{
    CMDLINE_START, EBDA_START, HIGH_MEMORY_START, MMIO_GAP_START, PAGE_SIZE, PVH_INFO_START,
    PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use super::regs::BootEntry;

const E820_RAM: u32 = 1;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Offset of the 64-bit entry point from the start of a bzImage's
/// protected-mode kernel (Documentation/arch/x86/boot.rst).
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// `xloadflags` bit: the kernel has the 64-bit entry point.
const XLF_KERNEL_64: u16 = 1;

/// Why a guest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot open {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {path} is neither a vmlinux ELF ({elf}) nor a bzImage ({bzimage})")]
    KernelFormat {
        path: PathBuf,
        elf: linux_loader::loader::Error,
        bzimage: linux_loader::loader::Error,
    },
    #[error(
        "guest memory too small: the initramfs ({initrd_size} bytes) does not fit between the kernel's end at {kernel_end:#x} and the end of low memory at {low_end:#x}"
    )]
    InitrdDoesNotFit {
        initrd_size: u64,
        kernel_end: u64,
        low_end: u64,
    },
    #[error("bzImage {path} has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)")]
    Not64Bit { path: PathBuf },
    #[error("initramfs {path} is empty")]
    EmptyInitrd { path: PathBuf },
    #[error("cannot write {what} to guest memory: {source}")]
    GuestMemory {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot write the kernel command line: {0}")]
    Cmdline(linux_loader::loader::Error),
}

/// A kernel image in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: BootEntry,
    /// First guest address after the kernel image.
    pub kernel_end: u64,
    /// A bzImage's setup header, to be copied into `boot_params`.
    setup_header: Option<setup_header>,
}

/// Where the initramfs went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdRegion {
    pub addr: u64,
    pub size: u64,
}

fn gm_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> LoaderError {
    move |source| LoaderError::GuestMemory { what, source }
}

fn open(what: &'static str, path: &Path) -> Result<File, LoaderError> {
    File::open(path).map_err(|source| LoaderError::Open {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Loads a vmlinux (ELF) or a bzImage.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LoaderError> {
    let mut file = open("kernel", path)?;
    let highmem = Some(GuestAddress(HIGH_MEMORY_START));
    let elf = match Elf::load(mem, None, &mut file, highmem) {
        Ok(result) => {
            let entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => BootEntry::Pvh {
                    entry: addr.raw_value(),
                },
                _ => BootEntry::LongMode {
                    entry: result.kernel_load.raw_value(),
                },
            };
            return Ok(LoadedKernel {
                entry,
                kernel_end: result.kernel_end,
                setup_header: None,
            });
        }
        Err(e) => e,
    };
    let mut file = open("kernel", path)?;
    match BzImage::load(mem, None, &mut file, highmem) {
        Ok(result) => {
            let load = result.kernel_load.raw_value();
            let header = result.setup_header.unwrap_or_default();
            if header.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(LoaderError::Not64Bit {
                    path: path.to_path_buf(),
                });
            }
            // The decompressor works in memory up to load + init_size,
            // beyond the compressed image: nothing may be placed there.
            Ok(LoadedKernel {
                entry: BootEntry::LongMode {
                    entry: load + BZIMAGE_64BIT_ENTRY_OFFSET,
                },
                kernel_end: result.kernel_end.max(load + u64::from(header.init_size)),
                setup_header: result.setup_header,
            })
        }
        Err(bzimage) => Err(LoaderError::KernelFormat {
            path: path.to_path_buf(),
            elf,
            bzimage,
        }),
    }
}

/// The last guest address + 1 of RAM below the MMIO gap.
pub fn low_memory_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .filter(|r| r.start_addr().raw_value() < MMIO_GAP_START)
        .map(|r| r.start_addr().raw_value() + r.len())
        .max()
        .unwrap_or(0)
        .min(MMIO_GAP_START)
}

/// Chooses the initramfs address: as high in low memory as it fits, page
/// aligned, above the kernel (Linux then has the most room to unpack it).
pub fn place_initrd(low_end: u64, kernel_end: u64, initrd_size: u64) -> Result<u64, LoaderError> {
    let too_small = || LoaderError::InitrdDoesNotFit {
        initrd_size,
        kernel_end,
        low_end,
    };
    let addr = low_end.checked_sub(initrd_size).ok_or_else(too_small)? & !(PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(too_small());
    }
    Ok(addr)
}

/// Copies the initramfs into guest memory.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<InitrdRegion, LoaderError> {
    let mut file = open("initramfs", path)?;
    let size = file
        .metadata()
        .map_err(|source| LoaderError::Open {
            what: "initramfs",
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if size == 0 {
        return Err(LoaderError::EmptyInitrd {
            path: path.to_path_buf(),
        });
    }
    let addr = place_initrd(low_memory_end(mem), kernel_end, size)?;
    let len = usize::try_from(size).map_err(|_| LoaderError::InitrdDoesNotFit {
        initrd_size: size,
        kernel_end,
        low_end: low_memory_end(mem),
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(gm_err("initramfs"))?;
    Ok(InitrdRegion { addr, size })
}

/// The guest's memory map: conventional memory up to the EBDA, then RAM
/// from 1 MiB (the legacy hole stays out), including any region above 4 GiB.
pub fn memory_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let mut map = vec![(0, EBDA_START)];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIGH_MEMORY_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push((start, end - start));
        }
    }
    map
}

/// Writes the command line and the boot structure of `kernel`'s entry ABI.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<InitrdRegion>,
) -> Result<(), LoaderError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(LoaderError::Cmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .map_err(|_| LoaderError::Cmdline(linux_loader::loader::Error::InvalidCommandLine))?;
    let map = memory_map(mem);
    match kernel.entry {
        BootEntry::Pvh { .. } => write_start_info(mem, &map, initrd),
        BootEntry::LongMode { .. } => {
            write_zero_page(mem, kernel.setup_header, &map, cmdline_len, initrd)
        }
    }
}

fn write_start_info(
    mem: &GuestMemoryMmap,
    map: &[(u64, u64)],
    initrd: Option<InitrdRegion>,
) -> Result<(), LoaderError> {
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(gm_err("PVH module list"))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    for (i, (addr, size)) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: E820_RAM,
            reserved: 0,
        };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))
            .map_err(gm_err("PVH memory map"))?;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(gm_err("PVH start info"))
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    map: &[(u64, u64)],
    cmdline_len: usize,
    initrd: Option<InitrdRegion>,
) -> Result<(), LoaderError> {
    let mut params = boot_params::default();
    if let Some(header) = header {
        params.hdr = header;
    } else {
        // A vmlinux without PVH note: what its setup code would have said.
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        // Placed below the MMIO gap, so both fit in 32 bits.
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    for (i, (addr, size)) in map.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].type_ = E820_RAM;
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(gm_err("boot_params"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn place_initrd_goes_to_top_of_low_memory_page_aligned() {
        let addr = place_initrd(128 << 20, 20 << 20, 0x1801).unwrap();
        assert_eq!(addr, (128 << 20) - 0x2000);
    }

    #[test]
    fn place_initrd_with_memory_too_small_names_sizes() {
        let err = place_initrd(32 << 20, 30 << 20, 4 << 20).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("guest memory too small"), "{msg}");
        assert!(msg.contains("4194304 bytes"), "{msg}");
        assert!(place_initrd(1 << 20, 0, 2 << 20).is_err());
    }

    #[test]
    fn memory_map_excludes_legacy_hole_and_keeps_high_region() {
        let mem = create_guest_memory(4096, false).unwrap();
        let map = memory_map(&mem);
        assert_eq!(map[0], (0, EBDA_START));
        assert_eq!(
            map[1],
            (HIGH_MEMORY_START, MMIO_GAP_START - HIGH_MEMORY_START)
        );
        assert_eq!(map[2], (1 << 32, (4096u64 << 20) - MMIO_GAP_START));
        assert_eq!(low_memory_end(&mem), MMIO_GAP_START);
    }

    #[test]
    fn load_kernel_with_garbage_file_names_both_formats() {
        let mem = create_guest_memory(32, false).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), vec![0x5a; 4096]).unwrap();
        let err = load_kernel(&mem, file.path()).unwrap_err();
        assert!(matches!(err, LoaderError::KernelFormat { .. }), "{err}");
        assert!(err.to_string().contains("neither a vmlinux ELF"));
    }

    #[test]
    fn load_kernel_with_missing_file_names_path() {
        let mem = create_guest_memory(32, false).unwrap();
        let err = load_kernel(&mem, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"));
    }

    #[test]
    fn pvh_start_info_points_at_cmdline_memmap_and_initrd() {
        let mem = create_guest_memory(64, false).unwrap();
        let kernel = LoadedKernel {
            entry: BootEntry::Pvh { entry: 0x100_0000 },
            kernel_end: 0x200_0000,
            setup_header: None,
        };
        let cmdline = crate::boot::cmdline::build_cmdline("console=ttyS0", &[]).unwrap();
        let initrd = InitrdRegion {
            addr: 0x300_0000,
            size: 0x1000,
        };
        write_boot_info(&mem, &kernel, &cmdline, Some(initrd)).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries, 2);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 0x1000));
        let mut text = [0u8; 14];
        mem.read_slice(&mut text, GuestAddress(info.cmdline_paddr))
            .unwrap();
        assert_eq!(&text, b"console=ttyS0\0");
    }

    #[test]
    fn zero_page_carries_e820_cmdline_and_initrd() {
        let mem = create_guest_memory(64, false).unwrap();
        let kernel = LoadedKernel {
            entry: BootEntry::LongMode { entry: 0x100_0200 },
            kernel_end: 0x200_0000,
            setup_header: None,
        };
        let cmdline = crate::boot::cmdline::build_cmdline("console=ttyS0 quiet", &[]).unwrap();
        let initrd = InitrdRegion {
            addr: 0x300_0000,
            size: 0x2000,
        };
        write_boot_info(&mem, &kernel, &cmdline, Some(initrd)).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(params.e820_entries, 2);
        assert_eq!({ params.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.hdr.cmdline_size }, 19);
        assert_eq!({ params.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ params.hdr.type_of_loader }, KERNEL_LOADER_OTHER);
    }
}
