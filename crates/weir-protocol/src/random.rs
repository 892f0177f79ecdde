//! weir's one pseudo-random generator: SplitMix64, tiny, fast, and fully determined by
//! its seed, so a simulation, a retry schedule or a relay's impairments replay exactly.
//! Used for retry jitter (the shipper's backoff, the device client's reconnects), the
//! simulator's draws and the relay's loss and delay. Not for anything secret.

/// SplitMix64 (Steele, Lea and Flood, 2014).
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = self.state;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    }

    /// A uniform draw in `0..=bound`.
    pub fn below_or_equal(&mut self, bound: u64) -> u64 {
        if bound == u64::MAX {
            return self.next_u64();
        }
        self.next_u64() % (bound + 1)
    }

    /// A uniform draw in `[0, 1)` (53 bits).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_draws_and_units_stay_in_range() {
        let mut one = SplitMix64::new(9);
        let mut two = SplitMix64::new(9);
        for _ in 0..1000 {
            assert_eq!(one.next_u64(), two.next_u64());
            let unit = one.unit();
            two.unit();
            assert!((0.0..1.0).contains(&unit));
            assert!(one.below_or_equal(6) <= 6);
            two.below_or_equal(6);
        }
        // The first draw of seed 0 is SplitMix64's published first output.
        assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    }
}
