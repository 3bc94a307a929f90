//! The beta distribution's distribution function and its inverse, which the
//! `beta` schedule needs (its times are beta quantiles).
//!
//! The regularized incomplete beta function I_x(a, b) is evaluated by its
//! continued fraction (modified Lentz), on the side of the symmetry
//! I_x(a, b) = 1 − I_{1−x}(b, a) where the fraction converges fast; the quantile
//! inverts it by bisection, which is slow-ish (about 60 evaluations) but cannot
//! diverge and ends at the float resolution.
//!
//! Must not: know about schedules or tensors; it is plain f64 arithmetic.

/// ln Γ(x) for x > 0 (Lanczos, g = 7, nine terms; about 15 significant digits),
/// with the reflection formula below 1/2.
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const COEF: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = COEF[0];
    for (i, c) in COEF.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// The continued fraction of I_x(a, b) without its prefactor; converges fast for
/// x < (a + 1) / (a + b + 2).
fn continued_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    const MAX_TERMS: usize = 500;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut f = d;
    for m in 1..=MAX_TERMS {
        let m = m as f64;
        // The even term m(b − m)x / ((a + 2m − 1)(a + 2m)), then the odd one
        // −(a + m)(a + b + m)x / ((a + 2m)(a + 2m + 1)).
        for num in [
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0)),
        ] {
            d = 1.0 + num * d;
            if d.abs() < TINY {
                d = TINY;
            }
            c = 1.0 + num / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            f *= c * d;
        }
        if (c * d - 1.0).abs() < 1e-16 {
            break;
        }
    }
    f
}

/// The regularized incomplete beta function I_x(a, b): the distribution function
/// of Beta(a, b) at x, for a, b > 0; x outside [0, 1] is clamped.
pub(crate) fn cdf(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = a * x.ln() + b * (1.0 - x).ln() - (ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b));
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * continued_fraction(x, a, b) / a
    } else {
        1.0 - ln_front.exp() * continued_fraction(1.0 - x, b, a) / b
    }
}

/// The quantile of Beta(a, b): the x in [0, 1] with I_x(a, b) = p (scipy's
/// `beta.ppf`); p outside [0, 1] is clamped.
pub(crate) fn quantile(p: f64, a: f64, b: f64) -> f64 {
    if p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    loop {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            return mid;
        }
        if cdf(mid, a, b) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference values: scipy 1.17.1 `scipy.stats.beta.cdf` / `.ppf`, agreeing
    // with mpmath's `betainc` (40 digits) to the last digit printed here.

    #[test]
    fn cdf_matches_scipy() {
        for (x, a, b, expect) in [
            (0.3, 0.6, 0.6, 0.35252651177214367),
            (0.9, 0.6, 0.6, 0.8239527456539625),
            (0.5, 2.0, 3.0, 0.6875),
            (0.01, 0.6, 0.6, 0.04360371488475065),
            (0.2, 5.0, 1.5, 0.0007906635744439764),
        ] {
            let got = cdf(x, a, b);
            assert!(
                (got - expect).abs() < 1e-13,
                "I_{x}({a}, {b}) = {got}, scipy {expect}"
            );
        }
        assert_eq!(cdf(0.0, 0.6, 0.6), 0.0);
        assert_eq!(cdf(1.0, 0.6, 0.6), 1.0);
    }

    #[test]
    fn quantile_matches_scipy() {
        for (p, a, b, expect) in [
            (0.75, 0.6, 0.6, 0.824319621347305),
            (0.25, 0.6, 0.6, 0.17568037865269498),
            (0.05, 0.6, 0.6, 0.012554456873611399),
            (0.999, 0.6, 0.6, 0.9999814412614826),
            (0.5, 2.0, 3.0, 0.3857275681323895),
            (0.1, 5.0, 1.5, 0.5499636648398719),
        ] {
            let got = quantile(p, a, b);
            assert!(
                (got - expect).abs() < 1e-12,
                "ppf({p}; {a}, {b}) = {got}, scipy {expect}"
            );
        }
        assert_eq!(quantile(0.0, 0.6, 0.6), 0.0);
        assert_eq!(quantile(1.0, 0.6, 0.6), 1.0);
        assert!((quantile(0.5, 0.6, 0.6) - 0.5).abs() < 1e-15, "symmetric");
    }

    #[test]
    fn ln_gamma_knows_factorials_and_half() {
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-13);
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-13);
        assert!(ln_gamma(1.0).abs() < 1e-14 && ln_gamma(2.0).abs() < 1e-14);
    }
}
