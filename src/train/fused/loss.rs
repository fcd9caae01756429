//! Cross-entropy of next-token logits, turned in place into its gradient.

/// For logits rows (`vocab` wide) and their target ids: returns Σ −log softmax(row)[target]
/// and overwrites each row with `scale · (softmax(row) − onehot(target))`.
pub(crate) fn cross_entropy(logits: &mut [f32], vocab: usize, targets: &[u32], scale: f32) -> f64 {
    let mut nll = 0f64;
    for (row, &target) in logits.chunks_exact_mut(vocab).zip(targets) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let picked = row[target as usize];
        let mut sum = 0f64;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += f64::from(*v);
        }
        nll += sum.ln() + f64::from(max) - f64::from(picked);
        let inv = (1.0 / sum) as f32 * scale;
        for v in row.iter_mut() {
            *v *= inv;
        }
        row[target as usize] -= scale;
    }
    nll
}

/// A completion token as the policy head saw it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TokenStat {
    /// log softmax(logits / T)[target].
    pub logp: f32,
    /// The entropy of softmax(logits / T).
    pub entropy: f32,
}

/// For logits rows and their targets, at temperature `t`: pushes each row's [`TokenStat`]
/// into `stats`, overwrites the row with the gradient `coef(row, logp) · ∂logp/∂logits`
/// (`= −coef/t · (softmax − onehot)`), and returns Σ −logp.
pub(crate) fn policy(
    logits: &mut [f32],
    vocab: usize,
    targets: &[u32],
    t: f32,
    coef: &(dyn Fn(usize, f64) -> f64 + Sync),
    stats: &mut Vec<TokenStat>,
) -> f64 {
    let mut nll = 0f64;
    let inv_t = 1.0 / t;
    for (r, (row, &target)) in logits.chunks_exact_mut(vocab).zip(targets).enumerate() {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * inv_t;
        let mut sum = 0f64;
        for v in row.iter_mut() {
            *v = (*v * inv_t - max).exp();
            sum += f64::from(*v);
        }
        let lse = sum.ln() + f64::from(max);
        let picked = f64::from(row[target as usize]).ln() + f64::from(max);
        let logp = picked - lse;
        let mut entropy = 0f64;
        let inv_sum = 1.0 / sum;
        for v in row.iter() {
            let p = f64::from(*v) * inv_sum;
            if p > 0.0 {
                entropy -= p * p.ln();
            }
        }
        stats.push(TokenStat {
            logp: logp as f32,
            entropy: entropy as f32,
        });
        nll -= logp;
        let scale = (-coef(r, logp) / f64::from(t)) as f32;
        let inv = inv_sum as f32 * scale;
        for v in row.iter_mut() {
            *v *= inv;
        }
        row[target as usize] -= scale;
    }
    nll
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_logits_cost_log_vocab_and_push_the_target_up() {
        let mut logits = vec![0f32; 4];
        let nll = cross_entropy(&mut logits, 4, &[2], 1.0);
        assert!((nll - 4f64.ln()).abs() < 1e-9);
        assert_eq!(logits, [0.25, 0.25, -0.75, 0.25]);
    }

    #[test]
    fn the_policy_head_at_t_one_with_coef_minus_one_is_cross_entropy() {
        let raw = [0.3f32, -1.2, 2.0, 0.5, 1.0, 0.0, -0.5, 0.25];
        let (mut ce, mut pg) = (raw.to_vec(), raw.to_vec());
        let nll = cross_entropy(&mut ce, 4, &[2, 0], 1.0);
        let mut stats = Vec::new();
        let minus = policy(&mut pg, 4, &[2, 0], 1.0, &|_, _| -1.0, &mut stats);
        assert!((nll - minus).abs() < 1e-6);
        for (a, b) in ce.iter().zip(&pg) {
            assert!((a - b).abs() < 1e-6, "{ce:?} vs {pg:?}");
        }
        assert!((f64::from(stats[0].logp) + nll - f64::from(-stats[1].logp)).abs() < 1e-5);
    }

    #[test]
    fn the_policy_head_divides_by_the_temperature_and_reports_the_entropy() {
        // Uniform logits: logp = −ln 4, entropy ln 4, whatever the temperature.
        let mut rows = vec![1f32; 4];
        let mut stats = Vec::new();
        policy(&mut rows, 4, &[1], 0.5, &|_, _| 1.0, &mut stats);
        assert!((f64::from(stats[0].logp) + 4f64.ln()).abs() < 1e-6);
        assert!((f64::from(stats[0].entropy) - 4f64.ln()).abs() < 1e-6);
        // Gradient of logp in logits: (onehot − 1/4) / T with T = 0.5.
        assert_eq!(rows, [-0.5, 1.5, -0.5, -0.5]);
        // A finite difference of logp through the temperature.
        let z = [0.2f32, -0.4, 1.1];
        let logp = |z: &[f32]| {
            let mut r = z.to_vec();
            let mut s = Vec::new();
            policy(&mut r, 3, &[2], 0.7, &|_, _| 0.0, &mut s);
            f64::from(s[0].logp)
        };
        let mut grad = z.to_vec();
        policy(&mut grad, 3, &[2], 0.7, &|_, _| 1.0, &mut Vec::new());
        for j in 0..3 {
            let (mut up, mut down) = (z, z);
            up[j] += 1e-2;
            down[j] -= 1e-2;
            let numeric = (logp(&up) - logp(&down)) / 2e-2;
            assert!(
                (numeric - f64::from(grad[j])).abs() < 1e-3,
                "{j}: {numeric} vs {}",
                grad[j]
            );
        }
    }
}
