//! [`Sampler`]: picks the next token from one row of logits, greedily or by seeded sampling
//! with a temperature and nucleus (top-p) truncation.

use super::lora::unit;
use crate::error::{Error, Result};
use crate::rng::SplitMix;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token (the lowest id among equals).
    Greedy,
    /// A draw from `softmax(logits / temperature)`, restricted to the smallest set of most
    /// likely tokens whose probability reaches `top_p` (1 keeps every token).
    Sample {
        /// Divides the logits; above 0.
        temperature: f64,
        /// The nucleus mass, in (0, 1].
        top_p: f64,
    },
}

/// A token chooser with its own random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    sampling: Sampling,
    rng: SplitMix,
}

impl Sampler {
    /// A sampler drawing from the stream of `seed`; the options are checked.
    pub fn new(sampling: Sampling, seed: u64) -> Result<Self> {
        if let Sampling::Sample { temperature, top_p } = sampling {
            if !(temperature.is_finite() && temperature > 0.0) {
                return Err(Error::ModelInput {
                    message: format!("sampling `temperature` {temperature} must be above 0"),
                });
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(Error::ModelInput {
                    message: format!("sampling `top_p` {top_p} must be in (0, 1]"),
                });
            }
        }
        Ok(Sampler {
            sampling,
            rng: SplitMix::new(seed),
        })
    }

    /// The next token for `logits` (one per vocabulary entry).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() || logits.iter().any(|v| v.is_nan()) {
            return Err(Error::ModelInput {
                message: "logits are empty or hold NaN; no token can be chosen".into(),
            });
        }
        let (temperature, top_p) = match self.sampling {
            Sampling::Greedy => return Ok(argmax(logits)),
            Sampling::Sample { temperature, top_p } => (temperature, top_p),
        };
        let max = logits
            .iter()
            .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
        let weights: Vec<f64> = logits
            .iter()
            .map(|&v| ((f64::from(v) - max) / temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        if top_p >= 1.0 {
            // Every token is kept: draw in id order, without sorting.
            let target = unit(&mut self.rng) * total;
            let mut acc = 0.0;
            for (i, w) in weights.iter().enumerate() {
                acc += w;
                if target < acc {
                    return Ok(i as u32);
                }
            }
            // Rounding can leave the target at the very top of the mass.
            let last = weights.iter().rposition(|&w| w > 0.0).unwrap_or(0);
            return Ok(last as u32);
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        // Most likely first; equal weights by id, so that the draw is reproducible.
        order.sort_by(|&i, &j| weights[j].total_cmp(&weights[i]).then(i.cmp(&j)));
        let mut kept = 0;
        let mut mass = 0.0;
        for &i in &order {
            mass += weights[i];
            kept += 1;
            if mass >= top_p * total {
                break;
            }
        }
        let target = unit(&mut self.rng) * mass;
        let mut acc = 0.0;
        for &i in &order[..kept] {
            acc += weights[i];
            if target < acc {
                return Ok(i as u32);
            }
        }
        // Rounding can leave the target at the very top of the kept mass.
        Ok(order[kept - 1] as u32)
    }
}

/// The index of the largest value, the first among equals.
fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(Sampling::Greedy, 0).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]).unwrap(), 1);
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        // Probabilities ∝ (1, 2, 1) (logits ln 1, ln 2, ln 1 at temperature 1).
        let logits = [0f32, 2f32.ln(), 0.0];
        let mut s = Sampler::new(
            Sampling::Sample {
                temperature: 1.0,
                top_p: 1.0,
            },
            5,
        )
        .unwrap();
        let mut counts = [0usize; 3];
        for _ in 0..8000 {
            counts[s.sample(&logits).unwrap() as usize] += 1;
        }
        let share = counts[1] as f64 / 8000.0;
        assert!((share - 0.5).abs() < 0.03, "{counts:?}");
        assert!(counts[0] > 1700 && counts[2] > 1700, "{counts:?}");
        let draw = |seed| {
            let mut s = Sampler::new(
                Sampling::Sample {
                    temperature: 1.0,
                    top_p: 1.0,
                },
                seed,
            )
            .unwrap();
            (0..32)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(9), draw(9));
        assert_ne!(draw(9), draw(10));
    }

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        // Probabilities 0.6, 0.3, 0.1: top_p 0.8 keeps tokens 0 and 1.
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let mut s = Sampler::new(
            Sampling::Sample {
                temperature: 1.0,
                top_p: 0.8,
            },
            1,
        )
        .unwrap();
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[s.sample(&logits).unwrap() as usize] += 1;
        }
        assert_eq!(counts[2], 0, "{counts:?}");
        assert!(counts[1] > 800, "{counts:?}");
        // A low temperature sharpens towards the maximum.
        let mut cold = Sampler::new(
            Sampling::Sample {
                temperature: 0.01,
                top_p: 1.0,
            },
            1,
        )
        .unwrap();
        assert!((0..100).all(|_| cold.sample(&logits).unwrap() == 0));
    }

    #[test]
    fn bad_options_and_logits_are_refused() {
        let err = Sampler::new(
            Sampling::Sample {
                temperature: 0.0,
                top_p: 1.0,
            },
            0,
        )
        .unwrap_err();
        assert!(err.to_string().contains("`temperature` 0"), "{err}");
        let err = Sampler::new(
            Sampling::Sample {
                temperature: 1.0,
                top_p: 1.5,
            },
            0,
        )
        .unwrap_err();
        assert!(err.to_string().contains("`top_p` 1.5"), "{err}");
        let mut s = Sampler::new(Sampling::Greedy, 0).unwrap();
        assert!(s.sample(&[f32::NAN, 1.0]).is_err());
    }
}
