//! Packing tokenized examples into fixed-length rows, and the padded no-packing path.
//!
//! Packing is best-fit decreasing: examples sorted by length (longest first, ties by index, so the result is
//! deterministic) each go into the open row with the least free space that still fits them, or a new row.
//! Every row carries per-document `position_ids` (restarting at 0 for each document) and `doc_boundaries`
//! (cumulative offsets, like flash-attention's `cu_seqlens`), so attention can be kept within a document.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::tokenize::{TokenizedExample, IGNORE_INDEX};

/// One packed row of exactly `seq_len` tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedRow {
    /// Token ids, padded with `pad_id` after the last document.
    pub input_ids: Vec<u32>,
    /// Labels (`-100` on padding and on non-loss tokens).
    pub labels: Vec<i64>,
    /// Position within each document (0, 1, …, restarting per document); padding continues from 0.
    pub position_ids: Vec<u32>,
    /// Document start offsets plus the end of the last document: `[0, l1, l1 + l2, …, used]`.
    pub doc_boundaries: Vec<u32>,
    /// Indices (into the input slice) of the documents in this row, in order.
    pub example_indices: Vec<usize>,
}

impl PackedRow {
    /// Real (non-padding) tokens.
    pub fn used(&self) -> usize {
        *self.doc_boundaries.last().unwrap_or(&0) as usize
    }
}

/// Packed rows plus packing efficiency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PackedBatch {
    /// The rows.
    pub rows: Vec<PackedRow>,
    /// Row length.
    pub seq_len: usize,
    /// Real tokens / (rows × seq_len).
    pub efficiency: f64,
}

/// Packs `examples` into rows of `seq_len` tokens with best-fit decreasing. An example longer than `seq_len` is
/// an error (truncate when tokenizing).
pub fn pack(examples: &[TokenizedExample], seq_len: usize, pad_id: u32) -> Result<PackedBatch> {
    if seq_len == 0 {
        return Err(DataError::Pack("seq_len must be > 0".into()));
    }
    if let Some((i, e)) = examples.iter().enumerate().find(|(_, e)| e.len() > seq_len) {
        return Err(DataError::Pack(format!(
            "example {i} has {} tokens, more than seq_len {seq_len}; set max_length <= seq_len when tokenizing",
            e.len()
        )));
    }
    let mut order: Vec<usize> = (0..examples.len()).filter(|&i| !examples[i].is_empty()).collect();
    order.sort_by(|&a, &b| examples[b].len().cmp(&examples[a].len()).then(a.cmp(&b)));
    // free space -> rows with that much free space (smallest row index first)
    let mut by_free: BTreeMap<usize, std::collections::BTreeSet<usize>> = BTreeMap::new();
    let mut bins: Vec<(Vec<usize>, usize)> = Vec::new(); // (examples, used)
    for i in order {
        let len = examples[i].len();
        let found = by_free.range(len..).next().map(|(&free, set)| (free, *set.iter().next().expect("non-empty")));
        let b = match found {
            Some((free, b)) => {
                let set = by_free.get_mut(&free).expect("present");
                set.remove(&b);
                if set.is_empty() {
                    by_free.remove(&free);
                }
                b
            }
            None => {
                bins.push((Vec::new(), 0));
                bins.len() - 1
            }
        };
        bins[b].0.push(i);
        bins[b].1 += len;
        let free = seq_len - bins[b].1;
        if free > 0 {
            by_free.entry(free).or_default().insert(b);
        }
    }
    let mut rows = Vec::with_capacity(bins.len());
    let mut used_total = 0usize;
    for (docs, _) in bins {
        let mut input_ids = Vec::with_capacity(seq_len);
        let mut labels = Vec::with_capacity(seq_len);
        let mut position_ids = Vec::with_capacity(seq_len);
        let mut doc_boundaries = vec![0u32];
        for &i in &docs {
            let e = &examples[i];
            input_ids.extend_from_slice(&e.input_ids);
            labels.extend_from_slice(&e.labels);
            position_ids.extend(0..e.len() as u32);
            doc_boundaries.push(input_ids.len() as u32);
        }
        used_total += input_ids.len();
        let pad = seq_len - input_ids.len();
        input_ids.extend(std::iter::repeat_n(pad_id, pad));
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        position_ids.extend(0..pad as u32);
        rows.push(PackedRow { input_ids, labels, position_ids, doc_boundaries, example_indices: docs });
    }
    let efficiency = if rows.is_empty() { 0.0 } else { used_total as f64 / (rows.len() * seq_len) as f64 };
    Ok(PackedBatch { rows, seq_len, efficiency })
}

/// One padded row (no packing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaddedRow {
    /// Token ids, right-padded with `pad_id`.
    pub input_ids: Vec<u32>,
    /// Labels, `-100` on padding.
    pub labels: Vec<i64>,
    /// 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<u8>,
}

/// Right-pads a batch to its longest example, or to `pad_to` when given (examples longer than `pad_to` are an
/// error). Returns the rows and the efficiency (real tokens / padded tokens).
pub fn pad(examples: &[TokenizedExample], pad_id: u32, pad_to: Option<usize>) -> Result<(Vec<PaddedRow>, f64)> {
    let longest = examples.iter().map(|e| e.len()).max().unwrap_or(0);
    let width = match pad_to {
        Some(w) if w < longest => {
            return Err(DataError::Pack(format!("an example has {longest} tokens, more than pad_to {w}")))
        }
        Some(w) => w,
        None => longest,
    };
    let mut real = 0usize;
    let rows: Vec<PaddedRow> = examples
        .iter()
        .map(|e| {
            real += e.len();
            let p = width - e.len();
            let mut input_ids = e.input_ids.clone();
            input_ids.extend(std::iter::repeat_n(pad_id, p));
            let mut labels = e.labels.clone();
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, p));
            let mut attention_mask = vec![1u8; e.len()];
            attention_mask.extend(std::iter::repeat_n(0u8, p));
            PaddedRow { input_ids, labels, attention_mask }
        })
        .collect();
    let total = rows.len() * width;
    Ok((rows, if total == 0 { 0.0 } else { real as f64 / total as f64 }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(len: usize, tag: u32) -> TokenizedExample {
        TokenizedExample {
            input_ids: (0..len as u32).map(|i| tag * 1000 + i).collect(),
            labels: (0..len as i64).map(|i| if i % 2 == 0 { IGNORE_INDEX } else { tag as i64 * 1000 + i }).collect(),
        }
    }

    #[test]
    fn best_fit_decreasing_places_each_example_in_the_tightest_row() {
        // Sorted: 6(a) 5(b) 4(c) 3(d) 2(e) 2(f) into rows of 8:
        // 6 -> r0 (free 2); 5 -> r1 (free 3); 4 -> r2 (free 4); 3 -> r1 (tightest fit: free 3 -> 0);
        // 2 -> r0 (free 2 -> 0); 2 -> r2 (free 4 -> 2).
        let xs = vec![ex(3, 1), ex(6, 2), ex(2, 3), ex(5, 4), ex(4, 5), ex(2, 6)];
        let p = pack(&xs, 8, 0).unwrap();
        let rows: Vec<Vec<usize>> = p.rows.iter().map(|r| r.example_indices.clone()).collect();
        assert_eq!(rows, vec![vec![1, 2], vec![3, 0], vec![4, 5]]);
        assert!((p.efficiency - 22.0 / 24.0).abs() < 1e-12);
        let r = &p.rows[2];
        assert_eq!(r.doc_boundaries, vec![0, 4, 6]);
        assert_eq!(r.position_ids, vec![0, 1, 2, 3, 0, 1, 0, 1]);
        assert_eq!(&r.input_ids[..6], &[5000, 5001, 5002, 5003, 6000, 6001]);
        assert_eq!(&r.input_ids[6..], &[0, 0]);
        assert_eq!(&r.labels[4..], &[IGNORE_INDEX, 6001, IGNORE_INDEX, IGNORE_INDEX]);
    }

    #[test]
    fn packing_keeps_every_token_exactly_once() {
        let mut g = crate::rng::SplitMix64::new(3);
        let xs: Vec<_> = (0..500).map(|i| ex(1 + g.below(100) as usize, i)).collect();
        let p = pack(&xs, 128, 7).unwrap();
        let mut seen = vec![0; xs.len()];
        for r in &p.rows {
            assert_eq!(r.input_ids.len(), 128);
            assert_eq!(r.labels.len(), 128);
            assert_eq!(r.position_ids.len(), 128);
            for (k, &i) in r.example_indices.iter().enumerate() {
                seen[i] += 1;
                let (a, b) = (r.doc_boundaries[k] as usize, r.doc_boundaries[k + 1] as usize);
                assert_eq!(&r.input_ids[a..b], &xs[i].input_ids[..]);
                assert_eq!(&r.labels[a..b], &xs[i].labels[..]);
            }
        }
        assert!(seen.iter().all(|&c| c == 1));
        let total: usize = xs.iter().map(|x| x.len()).sum();
        // BFD is within 11/9 OPT + 6/9 bins; a lower bound on OPT is ceil(total / 128).
        let lower = total.div_ceil(128);
        assert!(p.rows.len() as f64 <= 11.0 / 9.0 * lower as f64 + 1.0, "{} rows vs >= {lower}", p.rows.len());
        assert!(p.efficiency > 0.9, "{}", p.efficiency);
    }

    #[test]
    fn overlong_examples_are_an_error_and_padding_masks() {
        assert!(pack(&[ex(9, 1)], 8, 0).is_err());
        let (rows, eff) = pad(&[ex(2, 1), ex(4, 2)], 9, None).unwrap();
        assert_eq!(rows[0].input_ids, vec![1000, 1001, 9, 9]);
        assert_eq!(rows[0].attention_mask, vec![1, 1, 0, 0]);
        assert_eq!(rows[0].labels, vec![IGNORE_INDEX, 1001, IGNORE_INDEX, IGNORE_INDEX]);
        assert!((eff - 0.75).abs() < 1e-12);
        assert!(pad(&[ex(5, 1)], 0, Some(4)).is_err());
        assert_eq!(pad(&[ex(2, 1)], 0, Some(6)).unwrap().0[0].input_ids.len(), 6);
    }
}
