//! Bulk-transfer data and its checksum, cheap enough for an emulated guest
//! to produce and check 256 MiB (a few instructions per 8 bytes).

/// A 64-bit checksum of a byte stream, independent of how the stream was
/// split into reads. Not cryptographic: it detects lost, duplicated,
/// reordered or corrupted data, which is what a transport test needs.
#[derive(Debug, Clone)]
pub struct StreamHash {
    state: u64,
    pending: [u8; 8],
    pending_len: usize,
    total: u64,
}

/// An odd 64-bit constant (the golden ratio's fraction) for mixing.
const MIX: u64 = 0x9e37_79b9_7f4a_7c15;

impl Default for StreamHash {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamHash {
    pub fn new() -> Self {
        Self {
            state: 0xcbf2_9ce4_8422_2325,
            pending: [0; 8],
            pending_len: 0,
            total: 0,
        }
    }

    fn mix(&mut self, word: u64) {
        self.state = (self.state ^ word).wrapping_mul(MIX).rotate_left(29);
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.pending_len > 0 {
            let take = (8 - self.pending_len).min(data.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&data[..take]);
            self.pending_len += take;
            data = &data[take..];
            if self.pending_len < 8 {
                return;
            }
            self.mix(u64::from_le_bytes(self.pending));
            self.pending_len = 0;
        }
        let words = data.chunks_exact(8);
        let rest = words.remainder();
        for word in words {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(word);
            self.mix(u64::from_le_bytes(bytes));
        }
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// The checksum of everything passed to [`Self::update`], length
    /// included.
    pub fn finish(mut self) -> u64 {
        if self.pending_len > 0 {
            let mut last = [0u8; 8];
            last[..self.pending_len].copy_from_slice(&self.pending[..self.pending_len]);
            self.mix(u64::from_le_bytes(last));
        }
        let total = self.total;
        self.mix(total);
        self.state
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// Pseudo-random bulk data (xorshift64), so a transfer cannot pass by
/// delivering zero pages or repeating one buffer.
#[derive(Debug, Clone)]
pub struct Pattern {
    state: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Self { state: seed | 1 }
    }

    /// Fills `buf` with the next bytes of the stream (a multiple of 8 bytes
    /// long, or the tail of the last word is cut).
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut words = buf.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.next_word().to_le_bytes());
        }
        let rest = words.into_remainder();
        if !rest.is_empty() {
            let last = self.next_word().to_le_bytes();
            let n = rest.len();
            rest.copy_from_slice(&last[..n]);
        }
    }

    fn next_word(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }
}

/// The checksum of `len` bytes of [`Pattern`] from `seed`, produced in
/// `chunk`-sized pieces (`len` a multiple of `chunk` and `chunk` of 8).
pub fn pattern_hash(seed: u64, len: u64, chunk: usize) -> u64 {
    let mut pattern = Pattern::new(seed);
    let mut hash = StreamHash::new();
    let mut buf = vec![0u8; chunk];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(chunk as u64)).unwrap_or(chunk);
        pattern.fill(&mut buf[..n]);
        hash.update(&buf[..n]);
        left -= n as u64;
    }
    hash.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_does_not_depend_on_how_the_stream_is_split() {
        let mut data = vec![0u8; 1000];
        Pattern::new(7).fill(&mut data);
        let mut whole = StreamHash::new();
        whole.update(&data);
        let mut pieces = StreamHash::new();
        for piece in data.chunks(3) {
            pieces.update(piece);
        }
        assert_eq!(pieces.len(), 1000);
        assert_eq!(whole.finish(), pieces.finish());
    }

    #[test]
    fn hash_changes_with_a_swapped_word_a_flipped_bit_or_a_trailing_zero() {
        let mut data = vec![0u8; 64];
        Pattern::new(9).fill(&mut data);
        let hash = |d: &[u8]| {
            let mut h = StreamHash::new();
            h.update(d);
            h.finish()
        };
        let original = hash(&data);
        let mut swapped = data.clone();
        swapped[..16].rotate_left(8);
        let mut flipped = data.clone();
        flipped[40] ^= 0x10;
        let mut longer = data.clone();
        longer.push(0);
        assert_ne!(hash(&swapped), original);
        assert_ne!(hash(&flipped), original);
        assert_ne!(hash(&longer), original);
    }

    #[test]
    fn pattern_is_seeded_and_continues_across_fills() {
        let mut one = vec![0u8; 32];
        Pattern::new(1).fill(&mut one);
        let mut two = Pattern::new(1);
        let mut a = vec![0u8; 16];
        let mut b = vec![0u8; 16];
        two.fill(&mut a);
        two.fill(&mut b);
        assert_eq!(one, [a, b].concat());
        let mut other = vec![0u8; 32];
        Pattern::new(2).fill(&mut other);
        assert_ne!(one, other);
    }

    #[test]
    fn pattern_hash_matches_hashing_the_filled_buffer() {
        let mut data = vec![0u8; 4096];
        Pattern::new(5).fill(&mut data);
        let mut hash = StreamHash::new();
        hash.update(&data);
        assert_eq!(pattern_hash(5, 4096, 1024), hash.finish());
    }
}
