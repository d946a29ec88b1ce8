//! Helpers of the algorithms' tests: fixed numbers in, values out, compared to 1e-9.

use tch::Tensor;

/// `v` as a `[b, len / b]` tensor.
pub fn t2(v: &[f64], b: i64) -> Tensor {
    Tensor::from_slice(v).view([b, -1])
}

/// A tensor's values, flattened.
pub fn vals(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.flatten(0, -1)).unwrap()
}

/// Element-wise equality to 1e-9.
pub fn close(a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-9, "{a:?} vs {b:?}");
    }
}
