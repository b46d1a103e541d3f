//! The unbiased pass@k estimator of Chen et al. (2021, "Evaluating Large Language Models Trained
//! on Code"): with n samples of which c pass, pass@k = 1 − C(n−c, k) / C(n, k), computed as a
//! product so that large n does not overflow.

/// pass@k for one problem; `None` when k > n (not enough samples to estimate it).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> Option<f64> {
    if k == 0 || k > n || c > n {
        return None;
    }
    if n - c < k {
        return Some(1.0);
    }
    // C(n−c, k) / C(n, k) = Π_{i = n−c+1}^{n} (1 − k / i)
    let fail: f64 = (n - c + 1..=n).map(|i| 1.0 - k as f64 / i as f64).product();
    Some(1.0 - fail)
}

/// The mean of pass@k over problems, each given as (samples, passed).
pub fn mean_pass_at_k(results: &[(usize, usize)], k: usize) -> Option<f64> {
    let each: Option<Vec<f64>> = results.iter().map(|&(n, c)| pass_at_k(n, c, k)).collect();
    let each = each?;
    (!each.is_empty()).then(|| each.iter().sum::<f64>() / each.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_hand_computed_values() {
        // n = 5, c = 1, k = 1: one in five.
        assert!((pass_at_k(5, 1, 1).unwrap() - 0.2).abs() < 1e-12);
        // n = 10, c = 3, k = 5: 1 − C(7,5)/C(10,5) = 1 − 21/252.
        assert!((pass_at_k(10, 3, 5).unwrap() - (1.0 - 21.0 / 252.0)).abs() < 1e-12);
        // n = 4, c = 2, k = 2: 1 − C(2,2)/C(4,2) = 1 − 1/6.
        assert!((pass_at_k(4, 2, 2).unwrap() - 5.0 / 6.0).abs() < 1e-12);
        // Every sample passing, or more passing than k can miss: 1. None passing: 0.
        assert_eq!(pass_at_k(3, 3, 2), Some(1.0));
        assert_eq!(pass_at_k(5, 4, 2), Some(1.0));
        assert_eq!(pass_at_k(4, 0, 3), Some(0.0));
        // k above n cannot be estimated.
        assert_eq!(pass_at_k(2, 1, 3), None);
        // The mean over problems.
        assert!((mean_pass_at_k(&[(5, 1), (5, 0)], 1).unwrap() - 0.1).abs() < 1e-12);
    }
}
