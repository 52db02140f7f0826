//! TDX MRTD: the build-time measurement the TDX module accumulates while the
//! host adds pages before `TDH.MR.FINALIZE` (Intel TDX module spec, "MRTD").
//!
//! - `TDH.MEM.PAGE.ADD` extends a 128-byte block: `"MEM.PAGE.ADD"` zero-padded
//!   to 16 bytes, the page GPA (u64 LE) at offset 16, zeros after.
//! - `TDH.MR.EXTEND` (per 256-byte chunk) extends a 128-byte block
//!   `"MR.EXTEND"` padded to 16, the chunk GPA at 16, then the 256 bytes.
//!
//! MRTD is the SHA-384 of the whole sequence.

use sha2::{Digest, Sha384};

const PAGE: usize = 4096;
const CHUNK: usize = 256;

/// Running MRTD.
#[derive(Debug, Clone, Default)]
pub struct MrtdCalculator {
    hasher: Sha384,
}

fn block(tag: &[u8], gpa: u64) -> [u8; 128] {
    let mut b = [0u8; 128];
    b[..tag.len()].copy_from_slice(tag);
    b[16..24].copy_from_slice(&gpa.to_le_bytes());
    b
}

impl MrtdCalculator {
    /// Records `TDH.MEM.PAGE.ADD` of the page at `gpa`.
    pub fn page_add(&mut self, gpa: u64) {
        self.hasher.update(block(b"MEM.PAGE.ADD", gpa));
    }

    /// Records `TDH.MR.EXTEND` of a 256-byte chunk at `gpa`.
    pub fn mr_extend(&mut self, gpa: u64, chunk: &[u8; CHUNK]) {
        self.hasher.update(block(b"MR.EXTEND", gpa));
        self.hasher.update(chunk);
    }

    /// Adds a region page by page; with `extend`, its contents are measured
    /// too (TDVF's `MR_EXTENDED` attribute). A trailing partial page is
    /// zero-filled.
    pub fn add_region(&mut self, gpa: u64, data: &[u8], extend: bool) {
        for (i, page) in data.chunks(PAGE).enumerate() {
            let page_gpa = gpa + (i * PAGE) as u64;
            self.page_add(page_gpa);
            if extend {
                let mut full = [0u8; PAGE];
                full[..page.len()].copy_from_slice(page);
                for (j, chunk) in full.chunks_exact(CHUNK).enumerate() {
                    let mut c = [0u8; CHUNK];
                    c.copy_from_slice(chunk);
                    self.mr_extend(page_gpa + (j * CHUNK) as u64, &c);
                }
            }
        }
    }

    /// The MRTD after `TDH.MR.FINALIZE`.
    pub fn finalize(self) -> [u8; 48] {
        self.hasher.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_extended_page_matches_hand_built_stream() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut calc = MrtdCalculator::default();
        calc.add_region(0xFFC0_0000, &data, true);

        let mut stream = Vec::new();
        let mut add = [0u8; 128];
        add[..12].copy_from_slice(b"MEM.PAGE.ADD");
        add[16..24].copy_from_slice(&0xFFC0_0000u64.to_le_bytes());
        stream.extend_from_slice(&add);
        for j in 0..16u64 {
            let mut ext = [0u8; 128];
            ext[..9].copy_from_slice(b"MR.EXTEND");
            ext[16..24].copy_from_slice(&(0xFFC0_0000 + j * 256).to_le_bytes());
            stream.extend_from_slice(&ext);
            stream.extend_from_slice(&data[(j as usize) * 256..(j as usize + 1) * 256]);
        }
        assert_eq!(calc.finalize().to_vec(), Sha384::digest(&stream).to_vec());
    }

    #[test]
    fn unextended_region_ignores_contents() {
        let mut a = MrtdCalculator::default();
        a.add_region(0x1000, &[1u8; 8192], false);
        let mut b = MrtdCalculator::default();
        b.add_region(0x1000, &[2u8; 8192], false);
        assert_eq!(a.finalize(), b.finalize());
    }
}
