//! The learning-rate schedule: linear warmup from 0, then constant or cosine decay to
//! `min_lr_ratio · lr` at the last step (the shape of transformers' `cosine` schedule with a
//! floor).

use serde::Deserialize;

/// How the learning rate moves after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Constant at the peak.
    Constant,
    /// Half a cosine from the peak down to the floor.
    Cosine,
}

/// A schedule over `total` optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// The peak learning rate.
    pub lr: f64,
    /// Steps of linear warmup.
    pub warmup: usize,
    /// All optimizer steps.
    pub total: usize,
    /// The decay after warmup.
    pub decay: Decay,
    /// The floor as a share of the peak.
    pub min_lr_ratio: f64,
}

impl Schedule {
    /// The learning rate of optimizer step `step` (0-based).
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        match self.decay {
            Decay::Constant => self.lr,
            Decay::Cosine => {
                let span = self.total.saturating_sub(self.warmup).max(1);
                let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
                let floor = self.lr * self.min_lr_ratio;
                floor + 0.5 * (self.lr - floor) * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_the_floor() {
        let s = Schedule {
            lr: 1.0,
            warmup: 4,
            total: 14,
            decay: Decay::Cosine,
            min_lr_ratio: 0.1,
        };
        assert_eq!(
            (0..4).map(|i| s.at(i)).collect::<Vec<_>>(),
            [0.25, 0.5, 0.75, 1.0]
        );
        assert!((s.at(4) - 1.0).abs() < 1e-12);
        // Half way through the decay: the midpoint of peak and floor.
        assert!((s.at(9) - 0.55).abs() < 1e-12);
        assert!((s.at(14) - 0.1).abs() < 1e-12);
        assert!(s.at(100) >= 0.1);
        let constant = Schedule {
            decay: Decay::Constant,
            ..s
        };
        assert_eq!(constant.at(10), 1.0);
    }
}
