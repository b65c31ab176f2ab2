//! The small seeded random-number generator behind the crate's two random choices: KID subsets
//! (DESIGN.md section 4, "Metrics": KID as mean +- std over subsets) and seeded data subsampling.
//! SplitMix64 (Steele, Lea and Flood 2014) with Lemire's unbiased bounded draw; the same seed gives
//! the same draws on every platform.

/// SplitMix64 generator.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform integer in `0..bound` (`bound > 0`), without modulo bias.
    pub fn below(&mut self, bound: u64) -> u64 {
        debug_assert!(bound > 0);
        let threshold = bound.wrapping_neg() % bound;
        loop {
            let product = u128::from(self.next_u64()) * u128::from(bound);
            if (product as u64) >= threshold {
                return (product >> 64) as u64;
            }
        }
    }

    /// `count` distinct indices from `0..population`, drawn without replacement (partial
    /// Fisher-Yates), in the order drawn. `count` must not exceed `population`.
    pub fn choose_without_replacement(&mut self, population: usize, count: usize) -> Vec<usize> {
        debug_assert!(count <= population);
        let mut pool: Vec<usize> = (0..population).collect();
        for i in 0..count {
            let j = i + self.below((population - i) as u64) as usize;
            pool.swap(i, j);
        }
        pool.truncate(count);
        pool
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_distinct_in_range_and_reproducible() {
        let a = SplitMix64::new(5).choose_without_replacement(100, 40);
        let b = SplitMix64::new(5).choose_without_replacement(100, 40);
        assert_eq!(a, b);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 40);
        assert!(sorted.iter().all(|&i| i < 100));
        assert_ne!(a, SplitMix64::new(6).choose_without_replacement(100, 40));
    }

    #[test]
    fn bounded_draw_is_roughly_uniform() {
        let mut rng = SplitMix64::new(1);
        let mut counts = [0usize; 7];
        for _ in 0..70_000 {
            counts[rng.below(7) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
    }
}
