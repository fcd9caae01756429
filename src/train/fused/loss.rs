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
}
