//! Fitting unit costs to measured steps: `cores = Σ cost_j · rate_j`, least squares with every
//! cost ≥ 0 (a negative cost is noise, not a finding).
//!
//! With two or three unknowns the non-negative least-squares solution is found exactly by
//! solving the unconstrained problem on every subset of the unknowns and keeping the best
//! subset whose costs are all non-negative.

/// One observation: the rates of each kind of work, and the cores used.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Work per second of each kind (e.g. `[sends/s, deliveries/s]`).
    pub rates: Vec<f64>,
    /// Cores used (CPU-seconds per second) beyond any baseline.
    pub cores: f64,
}

/// A fitted set of costs.
#[derive(Debug, Clone, PartialEq)]
pub struct Fit {
    /// CPU-seconds per unit of each kind of work, all ≥ 0.
    pub costs: Vec<f64>,
    /// Root mean square residual, cores.
    pub rms: f64,
}

/// Non-negative least squares of `cores ≈ costs · rates` (no intercept).
/// `None` when there are no observations or they carry no information.
pub fn fit_non_negative(obs: &[Observation]) -> Option<Fit> {
    let n = obs.first()?.rates.len();
    if n == 0 || n > 8 || obs.iter().any(|o| o.rates.len() != n) {
        return None;
    }
    let mut best: Option<Fit> = None;
    for mask in 1u32..(1 << n) {
        let cols: Vec<usize> = (0..n).filter(|j| mask & (1 << j) != 0).collect();
        let Some(sub) = solve_least_squares(obs, &cols) else { continue };
        if sub.iter().any(|&c| c < 0.0) {
            continue;
        }
        let mut costs = vec![0.0; n];
        for (k, &j) in cols.iter().enumerate() {
            costs[j] = sub[k];
        }
        let rms = rms_residual(obs, &costs);
        if best.as_ref().is_none_or(|b| rms < b.rms - 1e-15) {
            best = Some(Fit { costs, rms });
        }
    }
    best.or_else(|| Some(Fit { costs: vec![0.0; n], rms: rms_residual(obs, &vec![0.0; n]) }))
}

fn rms_residual(obs: &[Observation], costs: &[f64]) -> f64 {
    let sum: f64 = obs
        .iter()
        .map(|o| {
            let predicted: f64 = o.rates.iter().zip(costs).map(|(r, c)| r * c).sum();
            (o.cores - predicted).powi(2)
        })
        .sum();
    (sum / obs.len() as f64).sqrt()
}

/// Unconstrained least squares over the columns `cols`, through the normal equations
/// (Gaussian elimination with partial pivoting); `None` if they are singular.
fn solve_least_squares(obs: &[Observation], cols: &[usize]) -> Option<Vec<f64>> {
    let k = cols.len();
    // Scale each column to unit size so per-send (1e-4) and per-delivery (1e-6) costs are
    // conditioned alike.
    let scale: Vec<f64> = cols.iter().map(|&j| obs.iter().map(|o| o.rates[j].abs()).fold(0.0, f64::max)).collect();
    if scale.iter().any(|&s| s <= 0.0) {
        return None;
    }
    let mut a = vec![vec![0.0; k + 1]; k];
    for o in obs {
        for (r, &jr) in cols.iter().enumerate() {
            let xr = o.rates[jr] / scale[r];
            for (c, &jc) in cols.iter().enumerate() {
                a[r][c] += xr * o.rates[jc] / scale[c];
            }
            a[r][k] += xr * o.cores;
        }
    }
    for col in 0..k {
        let pivot = (col..k).max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        let pivot_row = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot_row[col];
                for (v, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                    *v -= f * p;
                }
            }
        }
    }
    Some((0..k).map(|r| a[r][k] / a[r][r] / scale[r]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(sends: f64, deliveries: f64, cores: f64) -> Observation {
        Observation { rates: vec![sends, deliveries], cores }
    }

    #[test]
    fn exact_costs_are_recovered_from_two_room_sizes() {
        // 100 µs per send, 2 µs per delivery; rooms of 2 and of 100.
        let cost = |s: f64, d: f64| s * 100e-6 + d * 2e-6;
        let steps =
            [obs(500.0, 1000.0, 0.0), obs(1000.0, 2000.0, 0.0), obs(100.0, 10_000.0, 0.0), obs(200.0, 20_000.0, 0.0)];
        let steps: Vec<_> = steps.iter().map(|o| obs(o.rates[0], o.rates[1], cost(o.rates[0], o.rates[1]))).collect();
        let fit = fit_non_negative(&steps).unwrap();
        assert!((fit.costs[0] - 100e-6).abs() < 1e-9, "{fit:?}");
        assert!((fit.costs[1] - 2e-6).abs() < 1e-12, "{fit:?}");
        assert!(fit.rms < 1e-9);
    }

    #[test]
    fn a_cost_that_noise_makes_negative_is_clamped_to_zero() {
        // Deliveries explain everything; sends would fit slightly negative.
        let steps = [obs(100.0, 1000.0, 0.010), obs(200.0, 2000.0, 0.020), obs(10.0, 5000.0, 0.051)];
        let fit = fit_non_negative(&steps).unwrap();
        assert!(fit.costs.iter().all(|&c| c >= 0.0), "{fit:?}");
        assert_eq!(fit.costs[0], 0.0, "{fit:?}");
        assert!((fit.costs[1] - 1.02e-5).abs() < 1e-6, "{fit:?}");
    }

    #[test]
    fn one_kind_of_work_is_a_ratio_and_nothing_is_none() {
        let fit = fit_non_negative(&[Observation { rates: vec![1000.0], cores: 0.5 }]).unwrap();
        assert!((fit.costs[0] - 0.0005).abs() < 1e-12);
        assert!(fit_non_negative(&[]).is_none());
        // All rates zero: no information, costs stay zero.
        let fit = fit_non_negative(&[obs(0.0, 0.0, 0.1)]).unwrap();
        assert_eq!(fit.costs, vec![0.0, 0.0]);
    }
}
