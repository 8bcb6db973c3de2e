//! The simulated values and the boot id of a run.

use std::ops::RangeInclusive;

use rand::Rng;

/// A value that wanders inside a range in small steps, like a real sensor's.
#[derive(Debug, Clone)]
pub struct RandomWalk {
    min: f64,
    max: f64,
    step: f64,
    value: f64,
}

impl RandomWalk {
    /// Starts at a random point of `range`; each step moves at most 2 % of its width.
    pub fn new(range: RangeInclusive<f64>, rng: &mut impl Rng) -> Self {
        let (min, max) = (*range.start(), *range.end());
        Self {
            min,
            max,
            step: (max - min) * 0.02,
            value: rng.random_range(min..=max),
        }
    }

    /// The next value, reflected back into the range at its edges.
    pub fn next_value(&mut self, rng: &mut impl Rng) -> f64 {
        let mut value = self.value + rng.random_range(-self.step..=self.step);
        if value > self.max {
            value = self.max - (value - self.max);
        }
        if value < self.min {
            value = self.min + (self.min - value);
        }
        self.value = value.clamp(self.min, self.max);
        self.value
    }
}

/// A short random id for one run of the process (`k3x9q2`). It never comes from
/// `--seed`: two runs with the same seed are still two boots.
pub fn new_boot_id() -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..6)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn the_walk_stays_in_range_and_moves_in_small_steps() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut walk = RandomWalk::new(990.0..=1020.0, &mut rng);
        let mut previous = walk.value;
        for _ in 0..100_000 {
            let value = walk.next_value(&mut rng);
            assert!((990.0..=1020.0).contains(&value), "{value} out of range");
            assert!(
                (value - previous).abs() <= 0.6 + 1e-9,
                "{previous} -> {value}"
            );
            previous = value;
        }
    }

    #[test]
    fn a_seed_makes_the_series_reproducible() {
        let series = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut walk = RandomWalk::new(20.0..=30.0, &mut rng);
            (0..5)
                .map(|_| walk.next_value(&mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(series(1), series(1));
        assert_ne!(series(1), series(2));
    }

    #[test]
    fn boot_ids_differ_between_runs() {
        let (a, b) = (new_boot_id(), new_boot_id());
        assert_eq!(a.len(), 6);
        assert_ne!(a, b);
    }
}
