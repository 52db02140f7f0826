//! Guest RAM: anonymous private mappings laid out around the MMIO gap.

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::boot::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Why guest memory could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {0} MiB does not fit the address space")]
    TooLarge(u64),
    #[error("cannot map {size_mib} MiB of guest memory{hint}: {source}")]
    Mmap {
        size_mib: u64,
        hint: &'static str,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot assemble guest memory regions: {0}")]
    Regions(#[from] vm_memory::GuestRegionCollectionError),
}

/// The guest-physical ranges that hold `size` bytes of RAM: everything below
/// the MMIO gap first, the rest from 4 GiB up.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// Maps `size_mib` MiB of guest RAM. With `hugepages`, the mapping uses
/// 2 MiB pages from the host's hugetlb pool (which must be large enough).
pub fn create_guest_memory(size_mib: u32, hugepages: bool) -> Result<GuestMemoryMmap, MemoryError> {
    let size = u64::from(size_mib) << 20;
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    if hugepages {
        flags |= libc::MAP_HUGETLB;
    }
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(size) {
        let len = usize::try_from(len).map_err(|_| MemoryError::TooLarge(size >> 20))?;
        let region = vm_memory::mmap::MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(hugepages)
            .build()
            .map_err(|source| MemoryError::Mmap {
                size_mib: size >> 20,
                hint: if hugepages {
                    " with hugepages (is /proc/sys/vm/nr_hugepages large enough?)"
                } else {
                    ""
                },
                source,
            })?;
        let region: MmapRegion = region;
        let region =
            GuestRegionMmap::new(region, start).ok_or(MemoryError::TooLarge(size >> 20))?;
        regions.push(region);
    }
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemory, GuestMemoryRegion};

    #[test]
    fn ram_ranges_below_gap_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn ram_ranges_above_gap_continue_at_4gib() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(
            ranges,
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 1 << 30)]
        );
    }

    #[test]
    fn create_guest_memory_maps_requested_size() {
        let mem = create_guest_memory(32, false).unwrap();
        assert_eq!(mem.num_regions(), 1);
        let total: u64 = mem.iter().map(|r| r.len()).sum();
        assert_eq!(total, 32 << 20);
    }
}
