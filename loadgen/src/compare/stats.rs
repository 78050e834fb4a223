//! The statistics of `loadgen compare`, each a plain function over samples or counts.
//!
//! - [`mann_whitney`]: Mann-Whitney U (Wilcoxon rank-sum), two-sided, normal approximation with
//!   tie and continuity corrections (statrs, which follows scipy): did one run's latencies shift
//!   against the other's?
//! - [`quantile_test`]: Mood's test at a quantile: pool both samples, count each run's values
//!   above the pooled quantile, and test the 2×2 table with Fisher's exact test. Under "same
//!   distribution" the split is hypergeometric whatever the distribution, so it tests a tail
//!   (p99) where Mann-Whitney, driven by the bulk, does not look.
//! - [`bootstrap_ci`]: percentile-bootstrap confidence intervals of the difference B − A of
//!   quantiles (median, p99), resampling each run with replacement, from a seeded RNG so that the
//!   same inputs give the same intervals.
//! - [`rate_test`]: two event counts over two durations as Poisson rates: their difference with
//!   a normal-approximation interval, and the conditional binomial test (normal approximation).
//! - [`proportion_test`]: two proportions (lost of expected, say) with Fisher's exact test.
//! - [`holm`]: Holm's step-down adjustment of p-values for testing many figures at once.
//!
//! Every test assumes independent observations. Latencies of one run are not quite that (a
//! stall delays the messages around it together), so p-values are optimistic; samples spread
//! uniformly over the run, bounded in size, and a practical threshold on top of significance
//! keep that from failing a gate on noise.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use statrs::distribution::{ContinuousCDF, Normal};
use statrs::stats_tests::fisher::fishers_exact;
use statrs::stats_tests::mannwhitneyu::{mannwhitneyu, MannWhitneyUMethod};
use statrs::stats_tests::Alternative;

/// The result of a Mann-Whitney U test of A against B.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MannWhitney {
    /// U of sample A (pairs with a > b, ties counting one half).
    pub u_a: f64,
    /// Two-sided p-value.
    pub p: f64,
    /// P(a value of B > a value of A), ties counting one half: 0.5 means no shift.
    pub p_b_greater: f64,
}

/// Mann-Whitney U test, two-sided, normal approximation with tie correction and continuity
/// correction (as scipy's `mannwhitneyu(method="asymptotic")`). `None` when a sample is empty.
pub fn mann_whitney(a: &[u64], b: &[u64]) -> Option<MannWhitney> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let (u_a, p) =
        mannwhitneyu(a, b, MannWhitneyUMethod::AsymptoticInclContinuityCorrection, Alternative::TwoSided).ok()?;
    let pairs = a.len() as f64 * b.len() as f64;
    Some(MannWhitney { u_a, p, p_b_greater: 1.0 - u_a / pairs })
}

/// The q-quantile of sorted values by linear interpolation between order statistics (numpy's
/// default, "type 7"). `None` for no values.
pub fn quantile(sorted: &[u64], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let h = q.clamp(0.0, 1.0) * last as f64;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(last);
    Some(sorted[lo] as f64 + (h - lo as f64) * (sorted[hi] as f64 - sorted[lo] as f64))
}

/// Mood's quantile test: is the share of values above the pooled q-quantile the same in A and
/// B? Fisher's exact test (two-sided) of the table [A above, A not above; B above, B not
/// above]. `None` when a sample is empty.
pub fn quantile_test(a: &[u64], b: &[u64], q: f64) -> Option<f64> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let mut pooled: Vec<u64> = a.iter().chain(b).copied().collect();
    pooled.sort_unstable();
    let cut = quantile(&pooled, q)?;
    let above = |s: &[u64]| s.iter().filter(|&&v| v as f64 > cut).count() as u64;
    let (ka, kb) = (above(a), above(b));
    let table = [ka, a.len() as u64 - ka, kb, b.len() as u64 - kb];
    fishers_exact(&table, Alternative::TwoSided).ok().map(|p| p.clamp(0.0, 1.0))
}

/// Percentile-bootstrap confidence intervals (at `level`, e.g. 0.95) of quantile(B, q) −
/// quantile(A, q) for each of `qs`, from `resamples` resamples of each sample with replacement.
/// `None` when a sample is empty.
pub fn bootstrap_ci(
    a: &[u64],
    b: &[u64],
    qs: &[f64],
    resamples: usize,
    level: f64,
    seed: u64,
) -> Option<Vec<(f64, f64)>> {
    if a.is_empty() || b.is_empty() || resamples == 0 {
        return None;
    }
    let mut rng = SmallRng::seed_from_u64(seed);
    let (a, b) = (sorted_copy(a), sorted_copy(b));
    let mut diffs: Vec<Vec<f64>> = vec![Vec::with_capacity(resamples); qs.len()];
    let (mut ca, mut cb) = (vec![0u32; a.len()], vec![0u32; b.len()]);
    for _ in 0..resamples {
        let qa = resample_quantiles(&a, qs, &mut ca, &mut rng);
        let qb = resample_quantiles(&b, qs, &mut cb, &mut rng);
        for ((d, x), y) in diffs.iter_mut().zip(qa).zip(qb) {
            d.push(y - x);
        }
    }
    let tail = (1.0 - level) / 2.0;
    Some(
        diffs
            .into_iter()
            .map(|mut d| {
                d.sort_by(f64::total_cmp);
                (pick(&d, tail), pick(&d, 1.0 - tail))
            })
            .collect(),
    )
}

fn sorted_copy(v: &[u64]) -> Vec<u64> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v
}

/// The `qs` quantiles (type 7) of one resample with replacement of `sorted`, without building
/// it: draw how many times each value is taken (`counts`), then walk the counts to the order
/// statistics needed. O(n) per resample, where sorting a resample is O(n log n).
fn resample_quantiles(sorted: &[u64], qs: &[f64], counts: &mut [u32], rng: &mut SmallRng) -> Vec<f64> {
    let n = sorted.len();
    counts.fill(0);
    for _ in 0..n {
        counts[rng.random_range(0..n)] += 1;
    }
    // Order statistics (0-based ranks) each quantile interpolates between.
    let ranks: Vec<(usize, usize, f64)> = qs
        .iter()
        .map(|&q| {
            let h = q.clamp(0.0, 1.0) * (n - 1) as f64;
            let lo = h.floor() as usize;
            (lo, (lo + 1).min(n - 1), h - lo as f64)
        })
        .collect();
    let mut wanted: Vec<usize> = ranks.iter().flat_map(|&(lo, hi, _)| [lo, hi]).collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut values = Vec::with_capacity(wanted.len());
    let (mut next, mut seen) = (0usize, 0usize);
    for (i, &c) in counts.iter().enumerate() {
        seen += c as usize;
        while next < wanted.len() && wanted[next] < seen {
            values.push(sorted[i] as f64);
            next += 1;
        }
        if next == wanted.len() {
            break;
        }
    }
    let at = |rank: usize| wanted.iter().position(|&w| w == rank).and_then(|k| values.get(k)).copied().unwrap_or(0.0);
    ranks.iter().map(|&(lo, hi, frac)| at(lo) + frac * (at(hi) - at(lo))).collect()
}

/// The q-quantile of sorted floats (type 7).
fn pick(sorted: &[f64], q: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else { return f64::NAN };
    let h = q.clamp(0.0, 1.0) * last as f64;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(last);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// Two Poisson rates compared: B's rate minus A's with a 95% interval, and a two-sided p-value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateTest {
    /// Rate of A, per second.
    pub a: f64,
    /// Rate of B, per second.
    pub b: f64,
    /// 95% interval of B − A (normal approximation).
    pub ci: (f64, f64),
    /// Two-sided p-value of "same rate": given n_a + n_b events, n_b is binomial with
    /// probability t_b / (t_a + t_b) (normal approximation).
    pub p: f64,
}

/// Compares `na` events in `ta` seconds with `nb` events in `tb` seconds as Poisson rates.
/// `None` when a duration is not positive.
pub fn rate_test(na: u64, ta: f64, nb: u64, tb: f64) -> Option<RateTest> {
    if !(ta > 0.0 && tb > 0.0) {
        return None;
    }
    let normal = Normal::standard();
    let (ra, rb) = (na as f64 / ta, nb as f64 / tb);
    let se = (na as f64 / (ta * ta) + nb as f64 / (tb * tb)).sqrt();
    let z95 = normal.inverse_cdf(0.975);
    let n = (na + nb) as f64;
    let share = tb / (ta + tb);
    let p = if n == 0.0 {
        1.0
    } else {
        let z = (nb as f64 - n * share).abs() / (n * share * (1.0 - share)).sqrt();
        (2.0 * normal.sf(z)).min(1.0)
    };
    Some(RateTest { a: ra, b: rb, ci: (rb - ra - z95 * se, rb - ra + z95 * se), p })
}

/// Fisher's exact test (two-sided) of `ka` of `na` against `kb` of `nb`.
pub fn proportion_test(ka: u64, na: u64, kb: u64, nb: u64) -> f64 {
    let table = [ka, na.saturating_sub(ka), kb, nb.saturating_sub(kb)];
    fishers_exact(&table, Alternative::TwoSided).map_or(1.0, |p| p.clamp(0.0, 1.0))
}

/// Holm's step-down adjustment: the adjusted p-values, in the input's order. A figure is
/// significant at family-wise error rate α when its adjusted p < α.
pub fn holm(ps: &[f64]) -> Vec<f64> {
    let m = ps.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&i, &j| ps[i].total_cmp(&ps[j]));
    let mut adjusted = vec![0.0; m];
    let mut running = 0.0f64;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max(((m - rank) as f64 * ps[i]).min(1.0));
        adjusted[i] = running;
    }
    adjusted
}

#[cfg(test)]
mod tests {
    //! Expected values were computed with scipy 1.17 (`scipy.stats.mannwhitneyu`,
    //! `fisher_exact`, `numpy.quantile`) in a throwaway virtualenv, or by hand where shown.

    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1e-300)
    }

    #[test]
    fn mann_whitney_matches_scipy() {
        // Textbook: no ties.
        let a = [1, 5, 7, 9];
        let b = [2, 4, 6, 8, 10];
        // Pairs a > b: 5>2,5>4; 7>2,4,6; 9>2,4,6,8 → 2+3+4 = 9.
        let r = mann_whitney(&a, &b).unwrap();
        assert_eq!(r.u_a, 9.0);
        // scipy: mannwhitneyu(a, b, method="asymptotic") → statistic 9.0, pvalue 0.90252325...
        assert!(close(r.p, 0.902_523_250_177_679_4, 1e-9), "{r:?}");
        assert!(close(r.p_b_greater, 1.0 - 9.0 / 20.0, 1e-12));

        // With ties and a shift.
        let a = [10, 12, 12, 13, 15, 15, 15, 18, 20, 21];
        let b = [14, 15, 17, 17, 19, 22, 22, 24, 25, 30, 31];
        let r = mann_whitney(&a, &b).unwrap();
        // By hand: a > b pairs 15>14 (×3), 18>14,15,17,17, 20>14,15,17,17,19, 21>(same 5)
        // = 3 + 4 + 5 + 5 = 17, plus ties 15=15 (×3) at one half = 18.5.
        assert_eq!(r.u_a, 18.5);
        // scipy: mannwhitneyu(a, b, method="asymptotic") → statistic 18.5, pvalue 0.01090239...
        assert!(close(r.p, 0.010_902_397_226_477_08, 1e-9), "{r:?}");
        assert!(mann_whitney(&[], &b).is_none());
    }

    #[test]
    fn quantiles_interpolate_like_numpy() {
        let s = [1, 2, 3, 4, 10];
        assert_eq!(quantile(&s, 0.5), Some(3.0));
        assert!(close(quantile(&s, 0.9).unwrap(), 7.6, 1e-12)); // numpy.quantile → 7.6000000000000005
        assert_eq!(quantile(&s, 0.0), Some(1.0));
        assert_eq!(quantile(&s, 1.0), Some(10.0));
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(pick(&[1.0, 2.0], 0.5), 1.5);
    }

    #[test]
    fn quantile_test_is_fisher_on_the_split_at_the_pooled_quantile() {
        // Pooled 0..=199; median 99.5: A = 0..100 has 0 above, B = 100..200 has 100 above.
        let a: Vec<u64> = (0..100).collect();
        let b: Vec<u64> = (100..200).collect();
        let p = quantile_test(&a, &b, 0.5).unwrap();
        // scipy: fisher_exact([[0, 100], [100, 0]]) → 2.208760693199503e-59 = 2 / C(200, 100);
        // statrs sums the far tail as 1 − cdf, which bottoms out near 1e-14: still far below
        // any α.
        assert!(p < 1e-12, "{p:e}");
        // The same sample twice: an even split, p = 1.
        assert!(close(quantile_test(&a, &a, 0.99).unwrap(), 1.0, 1e-9));
        // scipy: fisher_exact([[3, 97], [12, 88]]) → 0.028671314973177094
        assert!(close(proportion_test(3, 100, 12, 100), 0.028_671_314_973_177_094, 1e-9));
        // fisher_exact([[1, 499], [9, 491]]), ([[20, 1980], [45, 1955]]), ([[0, 2000], [5, 1995]])
        assert!(close(proportion_test(1, 500, 9, 500), 0.020_872_237_155_988_137, 1e-9));
        let p = proportion_test(20, 2000, 45, 2000);
        assert!(close(p, 0.002_423_915_569_582_878, 1e-7), "{p:e}"); // statrs: 2.4e-9 relative
        assert!(close(proportion_test(0, 2000, 5, 2000), 0.062_343_769_580_123_31, 1e-9));
        assert_eq!(proportion_test(0, 100, 0, 100), 1.0);
    }

    #[test]
    fn bootstrap_intervals_hold_the_shift_and_are_reproducible() {
        let a: Vec<u64> = (0..500).map(|i| 1000 + (i * 7919) % 1000).collect();
        let b: Vec<u64> = a.iter().map(|v| v + 2000).collect();
        let ci = bootstrap_ci(&a, &b, &[0.5, 0.99], 400, 0.95, 1).unwrap();
        for &(lo, hi) in &ci {
            assert!(lo <= 2000.0 && 2000.0 <= hi && hi - lo < 400.0, "{ci:?}");
        }
        assert_eq!(ci, bootstrap_ci(&a, &b, &[0.5, 0.99], 400, 0.95, 1).unwrap(), "same seed, same interval");
        let same = bootstrap_ci(&a, &a, &[0.5], 400, 0.95, 2).unwrap();
        assert!(same[0].0 <= 0.0 && 0.0 <= same[0].1, "{same:?}");
        assert!(bootstrap_ci(&a, &[], &[0.5], 10, 0.95, 1).is_none());
    }

    #[test]
    fn resampled_quantiles_are_the_quantiles_of_the_resample() {
        // Check the counting walk against sorting an explicit resample drawn the same way.
        let sorted: Vec<u64> = (0..101).map(|v| v * v).collect();
        let qs = [0.0, 0.5, 0.9, 0.99, 1.0];
        let mut counts = vec![0u32; sorted.len()];
        for seed in 0..20 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let got = resample_quantiles(&sorted, &qs, &mut counts, &mut rng);
            let mut explicit: Vec<u64> =
                counts.iter().enumerate().flat_map(|(i, &c)| std::iter::repeat_n(sorted[i], c as usize)).collect();
            explicit.sort_unstable();
            for (g, &q) in got.iter().zip(&qs) {
                assert!((g - quantile(&explicit, q).unwrap()).abs() < 1e-9, "seed {seed} q {q}: {got:?}");
            }
        }
    }

    #[test]
    fn rates_as_poisson_counts() {
        // 400 in 10 s vs 300 in 10 s: under "same rate" n_b ~ Bin(700, 1/2):
        // z = |300 - 350| / sqrt(175) = 3.7796; scipy: 2 * norm.sf(50 / sqrt(175)) = 1.5705228e-4.
        let r = rate_test(400, 10.0, 300, 10.0).unwrap();
        assert_eq!((r.a, r.b), (40.0, 30.0));
        assert!(close(r.p, 1.570_522_842_307_511_9e-4, 1e-6), "{r:?}");
        // B − A = -10 ± norm.ppf(0.975) * sqrt(4 + 3) = -15.185577..., -4.814422...
        assert!(close(r.ci.0, -15.185_577_281_736_228, 1e-9) && close(r.ci.1, -4.814_422_718_263_772, 1e-9), "{r:?}");
        assert_eq!(rate_test(10, 0.0, 10, 1.0), None);
        assert_eq!(rate_test(0, 1.0, 0, 1.0).map(|r| r.p), Some(1.0));
    }

    #[test]
    fn holm_step_down() {
        // By hand: sorted 0.01, 0.02, 0.03, 0.5 with m = 4 → 0.04, 0.06, 0.06 (monotone), 0.5.
        let adj = holm(&[0.03, 0.5, 0.01, 0.02]);
        let want = [0.06, 0.5, 0.04, 0.06];
        for (a, w) in adj.iter().zip(want) {
            assert!(close(*a, w, 1e-12), "{adj:?}");
        }
        // 0.8 × 2 caps at 1, and no adjusted p falls below an earlier one.
        assert_eq!(holm(&[0.9, 0.8]), vec![1.0, 1.0]);
        let adj = holm(&[0.3, 0.04]);
        assert!(close(adj[0], 0.3, 1e-12) && close(adj[1], 0.08, 1e-12), "{adj:?}");
        assert!(holm(&[]).is_empty());
    }
}
