//! Injectable Gaussian noise (DESIGN.md section 4: "`z_i` pre-drawn standard normal noise").
//!
//! Samplers never call a global RNG: they take a [`NoiseSource`]. [`SeededNoise`] draws on the CPU
//! from a ChaCha8 stream, so the same seed gives the same noise on every device and platform;
//! [`ListNoise`] replays tensors drawn elsewhere (fixtures, `--init-noise`).

use crate::{Error, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use tch::{Device, Kind, Tensor};

/// Something that hands out standard-normal tensors in a fixed order.
pub trait NoiseSource {
    /// The next tensor of the given shape (float32 on `device`).
    fn next(&mut self, shape: &[i64], device: Device) -> Result<Tensor>;
}

/// Deterministic standard-normal noise from a seed, drawn on the CPU.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    rng: ChaCha8Rng,
}

impl SeededNoise {
    /// A stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// A stream for `(seed, stream)`: independent streams for, e.g., training and validation.
    pub fn with_stream(seed: u64, stream: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Self { rng }
    }

    /// `n` standard-normal values.
    pub fn draw_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| StandardNormal.sample(&mut self.rng)).collect()
    }
}

impl NoiseSource for SeededNoise {
    fn next(&mut self, shape: &[i64], device: Device) -> Result<Tensor> {
        let numel: i64 = shape.iter().product();
        if shape.iter().any(|&d| d < 0) {
            return Err(Error::invalid("noise shape", format!("{shape:?}")));
        }
        let values = self.draw_vec(numel as usize);
        Ok(Tensor::from_slice(&values).reshape(shape).to_device(device))
    }
}

/// Replays a fixed list of tensors, in order; asking for more than it holds, or for a different
/// shape, is an error.
#[derive(Debug)]
pub struct ListNoise {
    tensors: std::collections::VecDeque<Tensor>,
    used: usize,
}

impl ListNoise {
    /// Replays `tensors` in order.
    pub fn new(tensors: Vec<Tensor>) -> Self {
        Self { tensors: tensors.into(), used: 0 }
    }
}

impl NoiseSource for ListNoise {
    fn next(&mut self, shape: &[i64], device: Device) -> Result<Tensor> {
        let tensor = self
            .tensors
            .pop_front()
            .ok_or_else(|| Error::invalid("noise", format!("the list of {} noise tensors is exhausted", self.used)))?;
        self.used += 1;
        if tensor.size() != shape {
            return Err(Error::Shape {
                what: format!("noise tensor #{}", self.used),
                expected: format!("{shape:?}"),
                got: tensor.size(),
            });
        }
        Ok(tensor.to_kind(Kind::Float).to_device(device))
    }
}

/// Noise where every sample of a batch has its own stream `(seed, first_index + i)`: sample `i`
/// gets the same noise whatever the batch size or the split of the work across processes.
#[derive(Debug, Clone)]
pub struct PerSampleNoise {
    streams: Vec<SeededNoise>,
}

impl PerSampleNoise {
    /// Streams for samples `first_index .. first_index + batch`.
    pub fn new(seed: u64, first_index: u64, batch: usize) -> Self {
        Self { streams: (0..batch as u64).map(|i| SeededNoise::with_stream(seed, first_index + i)).collect() }
    }
}

impl NoiseSource for PerSampleNoise {
    fn next(&mut self, shape: &[i64], device: Device) -> Result<Tensor> {
        if shape.first().copied() != Some(self.streams.len() as i64) {
            return Err(Error::Shape {
                what: "per-sample noise".into(),
                expected: format!("batch dimension {}", self.streams.len()),
                got: shape.to_vec(),
            });
        }
        let per_sample: i64 = shape[1..].iter().product();
        let mut values = Vec::with_capacity((per_sample as usize) * self.streams.len());
        for stream in &mut self.streams {
            values.extend(stream.draw_vec(per_sample as usize));
        }
        Ok(Tensor::from_slice(&values).reshape(shape).to_device(device))
    }
}
