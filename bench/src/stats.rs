//! Summaries of measurements: percentiles of per-operation samples, and the median and
//! spread of one row's repetitions.

/// The `p`-th percentile (0..=100, nearest rank) of `sorted`, which must be sorted
/// ascending; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sort `samples` (NaNs last) and return the median and the 99th percentile.
pub fn median_p99(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    (percentile(samples, 50.0), percentile(samples, 99.0))
}

/// Median of `values` (any order); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    percentile(&v, 50.0)
}

/// Relative spread of repetitions: (max - min) / median, as a fraction. 0 for fewer
/// than two values.
pub fn relative_spread(values: &[f64]) -> f64 {
    if values.len() < 2 {
        return 0.0;
    }
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let m = median(values);
    if m == 0.0 {
        0.0
    } else {
        (hi - lo) / m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let (m, p99) = median_p99(&mut v);
        assert_eq!((m, p99), (50.0, 99.0));
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(relative_spread(&[9.0, 10.0, 11.0]), 0.2);
        assert_eq!(relative_spread(&[5.0]), 0.0);
    }
}
