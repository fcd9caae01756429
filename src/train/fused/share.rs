//! Which examples of a shard share the start of their prompt, so that it runs once: a GRPO
//! group's rollouts repeat their case's prompt, and only the guideline line near its end
//! differs between them. The shared start becomes a prefix sequence with no loss of its own,
//! which each member continues from where it ends; the arithmetic is the same as running
//! every example alone, up to rounding. Examples share only if they show the same image (or
//! none): image tokens are one id whatever the image.

use super::step::Seq;
use crate::train::batch::{Example, ImageRows};

/// The fewest tokens worth sharing: a shorter common start (`Question:` and little else) is
/// two cases, not one.
pub(crate) const MIN_SHARED: usize = 8;

/// The part of an example's tokens that may be shared: its prompt but the last token (whose
/// output is the first prediction in the loss, and so each example's own).
fn shareable(e: &Example) -> &[u32] {
    &e.tokens[..e.prompt_len.saturating_sub(1).min(e.tokens.len())]
}

fn common_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Token sequences that share their first `shared` tokens.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Cluster {
    pub shared: usize,
    /// Indices into the sequences given, in order.
    pub members: Vec<usize>,
}

/// Groups `starts` in order of their first member: each joins the cluster it shares most with
/// among those of its own `kind` (the image it shows), if that is at least [`MIN_SHARED`]
/// tokens, and the cluster's shared part shrinks to what all its members share. A sequence
/// alone is a cluster of one (its `shared` is then its length).
pub(crate) fn clusters(starts: &[&[u32]], kind: &[usize]) -> Vec<Cluster> {
    let mut clusters: Vec<Cluster> = Vec::new();
    for (i, own) in starts.iter().enumerate() {
        let best = clusters
            .iter()
            .enumerate()
            .filter(|(_, cluster)| kind[cluster.members[0]] == kind[i])
            .map(|(c, cluster)| {
                let first = starts[cluster.members[0]];
                (common_len(&first[..cluster.shared], own), c)
            })
            .filter(|&(len, _)| len >= MIN_SHARED)
            .max_by_key(|&(len, c)| (len, std::cmp::Reverse(c)));
        match best {
            Some((len, c)) => {
                clusters[c].shared = len;
                clusters[c].members.push(i);
            }
            None => clusters.push(Cluster {
                shared: own.len(),
                members: vec![i],
            }),
        }
    }
    clusters
}

/// For each image, the index of the first one that is the same image (or none).
pub(crate) fn image_kinds(images: &[Option<&ImageRows>]) -> Vec<usize> {
    (0..images.len())
        .map(|i| {
            (0..=i)
                .find(|&j| ImageRows::same(images[j], images[i]))
                .unwrap_or(i)
        })
        .collect()
}

/// The rows of `image` that the image tokens (`image_token`) of `tokens[from..to]` take.
fn image_rows<'a>(
    image: Option<&'a ImageRows>,
    image_token: Option<u32>,
    tokens: &[u32],
    from: usize,
    to: usize,
) -> &'a [f32] {
    let (Some(image), Some(id)) = (image, image_token) else {
        return &[];
    };
    let count = |range: &[u32]| range.iter().filter(|&&t| t == id).count() * image.width;
    let before = count(&tokens[..from]);
    &image.values[before..before + count(&tokens[from..to])]
}

/// The sequences [`super::step::pass`] runs for `examples`: the shared prefixes first, then
/// every example with a target in order (so that the loss's rows keep the examples' order),
/// each continuing its prefix if it has one. An example without a target has no loss and no
/// gradient (candle's exact zeros) and is left out. Each sequence carries the image rows its
/// tokens equal to `image_token` take.
pub(crate) fn sequences<'a>(examples: &[&'a Example], image_token: Option<u32>) -> Vec<Seq<'a>> {
    // Position i predicts token i + 1, in the loss when that token is past the prompt.
    let with_targets: Vec<&Example> = examples
        .iter()
        .copied()
        .filter(|e| e.prompt_len.saturating_sub(1) < e.tokens.len().saturating_sub(1))
        .collect();
    let starts: Vec<&[u32]> = with_targets.iter().map(|&e| shareable(e)).collect();
    let images: Vec<Option<&ImageRows>> = with_targets.iter().map(|e| e.image.as_ref()).collect();
    let clusters = clusters(&starts, &image_kinds(&images));
    let mut cluster_of = vec![0; with_targets.len()];
    for (c, cluster) in clusters.iter().enumerate() {
        for &i in &cluster.members {
            cluster_of[i] = c;
        }
    }
    let mut seqs = Vec::with_capacity(clusters.len() + with_targets.len());
    // Per cluster: its prefix sequence's index and length, if it has one.
    let mut prefix_of = vec![None; clusters.len()];
    for (c, cluster) in clusters.iter().enumerate() {
        if cluster.members.len() > 1 {
            let first = with_targets[cluster.members[0]];
            let prefix = &starts[cluster.members[0]][..cluster.shared];
            prefix_of[c] = Some((seqs.len(), prefix.len()));
            seqs.push(Seq {
                inputs: prefix,
                first: prefix.len(),
                targets: &[],
                parent: None,
                image: image_rows(first.image.as_ref(), image_token, prefix, 0, prefix.len()),
            });
        }
    }
    for (e, c) in with_targets.into_iter().zip(cluster_of) {
        let t = e.tokens.len() - 1;
        let first = e.prompt_len.saturating_sub(1).min(t);
        let (parent, start) = match prefix_of[c] {
            Some((index, len)) => (Some(index), len),
            None => (None, 0),
        };
        seqs.push(Seq {
            inputs: &e.tokens[start..t],
            first: first - start,
            targets: &e.tokens[first + 1..],
            parent,
            image: image_rows(e.image.as_ref(), image_token, &e.tokens, start, t),
        });
    }
    seqs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(prompt: &[u32], completion: &[u32]) -> Example {
        Example::new(None, prompt, completion, 2)
    }

    #[test]
    fn a_groups_common_start_runs_once() {
        let case: Vec<u32> = (10..20).collect();
        let with = |line: u32, extra: u32| {
            let mut p = case.clone();
            p.extend([line, 7]);
            example(&p, &[extra, 3])
        };
        let other: Vec<u32> = (10..13).chain(40..50).collect();
        let examples = [
            with(5, 30),
            example(&other, &[31]),
            with(6, 32),
            with(5, 33),
            Example {
                tokens: vec![10, 11],
                prompt_len: 2,
                image: None,
            },
        ];
        let refs: Vec<&Example> = examples.iter().collect();
        let seqs = sequences(&refs, None);
        // One prefix (the ten case tokens), then the four examples with targets in order (the
        // last has no target).
        assert_eq!(seqs.len(), 5);
        assert_eq!(seqs[0].inputs, &case[..]);
        assert_eq!((seqs[0].first, seqs[0].targets.len()), (10, 0));
        for (s, extra) in [(&seqs[1], 30), (&seqs[3], 32), (&seqs[4], 33)] {
            assert_eq!(s.parent, Some(0));
            // The rest of the prompt, then the completion but its last token.
            assert_eq!(s.inputs.len(), 4);
            assert_eq!(s.inputs[2], extra);
            assert_eq!(s.first, 1, "the loss starts at the prompt's last token");
            assert_eq!(s.targets, &[extra, 3, 2]);
        }
        // Three shared tokens are too few: the other case stands alone.
        assert_eq!(seqs[2].parent, None);
        assert_eq!(seqs[2].inputs.len(), 14);
        assert_eq!(seqs[2].targets, &[31, 2]);
    }

    #[test]
    fn lone_examples_are_unchanged() {
        let examples = [
            example(&(0..12).collect::<Vec<_>>(), &[5]),
            example(&[1], &[2]),
        ];
        let refs: Vec<&Example> = examples.iter().collect();
        let seqs = sequences(&refs, None);
        assert_eq!(seqs.len(), 2);
        assert!(seqs.iter().all(|s| s.parent.is_none()));
        assert_eq!((seqs[0].inputs.len(), seqs[0].first), (13, 11));
        assert_eq!((seqs[1].inputs.len(), seqs[1].first), (2, 0));
    }
}
