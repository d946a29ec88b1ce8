//! Counter-based random numbers: the uniform used for a sampled token is a pure function of
//! (request seed, sample index, step), so a sequence's samples never depend on what it is batched with
//! or on libtorch's global generator.

/// SplitMix64's finaliser (Steele, Lea & Flood 2014): a bijective 64-bit mixer.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const G: u64 = 0x9e37_79b9_7f4a_7c15;
const STEP: u64 = 0xd1b5_4a32_d192_ed03;
const UNIT: f64 = 1.0 / (1u64 << 53) as f64;

/// 64 random bits for (`seed`, `sample`, `step`).
#[inline]
pub fn bits(seed: u64, sample: u64, step: u64) -> u64 {
    mix64(row_key(seed, sample) ^ step.wrapping_mul(STEP).wrapping_add(G))
}

/// The part of [`bits`] that depends on (`seed`, `sample`) only: one per sequence.
#[inline]
pub fn row_key(seed: u64, sample: u64) -> u64 {
    let a = mix64(seed.wrapping_add(G));
    mix64(a ^ sample.wrapping_mul(G).wrapping_add(0x632b_e59b_d9b4_e019))
}

/// A uniform number in (0, 1] (53 random bits) for (`seed`, `sample`, `step`).
#[inline]
pub fn uniform(seed: u64, sample: u64, step: u64) -> f64 {
    ((bits(seed, sample, step) >> 11) + 1) as f64 * UNIT
}

/// [`uniform`] computed on the device, with no host value per step: `keys` int64 `[B]` holds each row's
/// [`row_key`] (as the same 64 bits), `step` an int64 tensor broadcastable to it; returns float64 `[B]`,
/// equal bit for bit to `uniform(seed, sample, step)`. Int64 tensor arithmetic wraps like `u64`'s; the
/// logical right shifts are arithmetic shifts with the copied sign bits masked off.
pub fn uniform_tensor(keys: &tch::Tensor, step: &tch::Tensor) -> tch::Tensor {
    let shr = |z: &tch::Tensor, k: i64| z.bitwise_right_shift_tensor_scalar(k).bitwise_and((1i64 << (64 - k)) - 1);
    let xor_shr = |z: tch::Tensor, k: i64| z.bitwise_xor_tensor(&shr(&z, k));
    let mix = |z: tch::Tensor| {
        let z = xor_shr(z, 30) * 0xbf58_476d_1ce4_e5b9u64 as i64;
        let z = xor_shr(z, 27) * 0x94d0_49bb_1331_11ebu64 as i64;
        xor_shr(z, 31)
    };
    let bits = mix(keys.bitwise_xor_tensor(&(step * STEP as i64 + G as i64)));
    (shr(&bits, 11) + 1).to_kind(tch::Kind::Double) * UNIT
}

/// The seed used for a request that does not set one: a mix of the engine seed and the request's position
/// in the `generate` call.
pub fn default_request_seed(engine_seed: u64, request_index: usize) -> u64 {
    mix64(engine_seed ^ mix64(request_index as u64 ^ 0x5851_f42d_4c95_7f2d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_in_range_and_roughly_uniform() {
        let n = 100_000u64;
        let mut sum = 0.0;
        let mut buckets = [0usize; 10];
        for i in 0..n {
            let u = uniform(7, i % 13, i / 13);
            assert!(u > 0.0 && u <= 1.0);
            sum += u;
            buckets[((u * 10.0) as usize).min(9)] += 1;
        }
        let mean = sum / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        for b in buckets {
            assert!((b as f64 - 10_000.0).abs() < 600.0, "bucket {b}");
        }
    }

    #[test]
    fn the_device_uniform_equals_the_host_one_bit_for_bit() {
        let (seeds, samples) = ([0u64, 7, u64::MAX, 0x8000_0000_0000_0001], [0u64, 1, 5, 1 << 40]);
        let rows: Vec<(u64, u64)> = seeds.iter().flat_map(|&s| samples.iter().map(move |&j| (s, j))).collect();
        let keys: Vec<i64> = rows.iter().map(|&(s, j)| row_key(s, j) as i64).collect();
        let keys = tch::Tensor::from_slice(&keys);
        for step in [0u64, 1, 2, 511, 1 << 33, u64::MAX] {
            let got: Vec<f64> = Vec::try_from(uniform_tensor(&keys, &tch::Tensor::from_slice(&[step as i64]))).unwrap();
            for (&(s, j), g) in rows.iter().zip(got) {
                assert_eq!(g.to_bits(), uniform(s, j, step).to_bits(), "seed {s} sample {j} step {step}");
            }
        }
    }

    #[test]
    fn streams_differ_by_seed_sample_and_step() {
        assert_eq!(uniform(1, 2, 3), uniform(1, 2, 3));
        assert_ne!(uniform(1, 2, 3), uniform(2, 2, 3));
        assert_ne!(uniform(1, 2, 3), uniform(1, 3, 3));
        assert_ne!(uniform(1, 2, 3), uniform(1, 2, 4));
        assert_ne!(default_request_seed(0, 0), default_request_seed(0, 1));
    }
}
