//! The real numbers the multistep solvers' coefficients are computed in (DESIGN.md section 4,
//! "Starting solver and teacher"): plain `f64` for the training-free solvers of
//! [`crate::solvers`], and [`TensorScalar`], a 0-d `f64` tensor that carries autograd, for a GGDM
//! sampler's start-solver base at its learned grid. The coefficient formulas (noise levels from
//! `abar`, the DPM-Solver++ and UniPC weights) are written once over [`SolverScalar`] and serve
//! both, so the differentiable base is the solver itself rather than a second copy of its math.
//!
//! Arithmetic with an `f64` on the right (`x + 1.0`, `x * 0.5`) is part of the trait; the formulas
//! keep constants on the right so that the `f64` path performs the same operations, in the same
//! order, as the hand-written `f64` code it replaced (the results are bit for bit the same).

use std::ops::{Add, Div, Mul, Neg, Sub};
use tch::{Kind, Tensor};

/// A real number the solver formulas can be evaluated in.
pub trait SolverScalar:
    Clone
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + Add<f64, Output = Self>
    + Sub<f64, Output = Self>
    + Mul<f64, Output = Self>
    + Div<f64, Output = Self>
{
    /// `value` as a constant (no gradient path) of the same kind, and on the same device, as `self`.
    fn constant_like(&self, value: f64) -> Self;
    /// The value as a plain number, detached (for decisions such as a pivot choice).
    fn value(&self) -> f64;
    /// Square root.
    fn sqrt(&self) -> Self;
    /// Natural logarithm.
    fn ln(&self) -> Self;
    /// `e^x - 1`, accurate for small `x`.
    fn exp_m1(&self) -> Self;
    /// `1 / x`.
    fn recip(&self) -> Self;
    /// `x^n` for a small non-negative integer power.
    fn powi(&self, n: i32) -> Self;
}

impl SolverScalar for f64 {
    fn constant_like(&self, value: f64) -> Self {
        value
    }
    fn value(&self) -> f64 {
        *self
    }
    fn sqrt(&self) -> Self {
        f64::sqrt(*self)
    }
    fn ln(&self) -> Self {
        f64::ln(*self)
    }
    fn exp_m1(&self) -> Self {
        f64::exp_m1(*self)
    }
    fn recip(&self) -> Self {
        f64::recip(*self)
    }
    fn powi(&self, n: i32) -> Self {
        f64::powi(*self, n)
    }
}

/// A 0-d `f64` tensor as a [`SolverScalar`]: every operation is a tensor operation, so gradients
/// flow through the solver formulas to whatever the value was computed from (a GGDM sampler's
/// grid logits).
#[derive(Debug)]
pub struct TensorScalar(pub Tensor);

impl Clone for TensorScalar {
    fn clone(&self) -> Self {
        TensorScalar(self.0.shallow_clone())
    }
}

macro_rules! tensor_scalar_binary_ops {
    ($($trait:ident $method:ident),*) => {$(
        impl $trait for TensorScalar {
            type Output = TensorScalar;
            fn $method(self, rhs: TensorScalar) -> TensorScalar {
                TensorScalar((&self.0).$method(&rhs.0))
            }
        }
        impl $trait<f64> for TensorScalar {
            type Output = TensorScalar;
            fn $method(self, rhs: f64) -> TensorScalar {
                TensorScalar((&self.0).$method(rhs))
            }
        }
    )*};
}

tensor_scalar_binary_ops!(Add add, Sub sub, Mul mul, Div div);

impl Neg for TensorScalar {
    type Output = TensorScalar;
    fn neg(self) -> TensorScalar {
        TensorScalar(-&self.0)
    }
}

impl SolverScalar for TensorScalar {
    fn constant_like(&self, value: f64) -> Self {
        TensorScalar(Tensor::full([] as [i64; 0], value, (Kind::Double, self.0.device())))
    }
    fn value(&self) -> f64 {
        self.0.double_value(&[])
    }
    fn sqrt(&self) -> Self {
        TensorScalar(self.0.sqrt())
    }
    fn ln(&self) -> Self {
        TensorScalar(self.0.log())
    }
    fn exp_m1(&self) -> Self {
        TensorScalar(self.0.expm1())
    }
    fn recip(&self) -> Self {
        TensorScalar(self.0.reciprocal())
    }
    fn powi(&self, n: i32) -> Self {
        // Repeated products: `pow`'s gradient `n x^(n-1)` would be 0 * inf at x = 0 for n = 0.
        let mut power = self.constant_like(1.0);
        for _ in 0..n {
            power = power * self.clone();
        }
        power
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_scalar_matches_f64_and_differentiates() {
        let x = Tensor::from(0.3f64).set_requires_grad(true);
        let t = TensorScalar(x.shallow_clone());
        let y = ((t.clone() * t.clone() + 1.0).sqrt().recip().ln() - t.exp_m1() / 2.0 + t.powi(3)) * -1.5;
        let plain = -1.5 * ((0.3f64 * 0.3 + 1.0).sqrt().recip().ln() - 0.3f64.exp_m1() / 2.0 + 0.3f64.powi(3));
        assert!((y.value() - plain).abs() < 1e-15, "{} vs {plain}", y.value());
        y.0.backward();
        // d/dx of -1.5 (-0.5 ln(1 + x^2) - (e^x - 1) / 2 + x^3)
        let expected = -1.5 * (-0.3 / (1.0 + 0.09) - 0.3f64.exp() / 2.0 + 3.0 * 0.09);
        assert!((x.grad().double_value(&[]) - expected).abs() < 1e-14);
        let constant = t.constant_like(2.5);
        assert_eq!(constant.value(), 2.5);
        assert!(!constant.0.requires_grad());
        assert_eq!(t.powi(0).value(), 1.0);
    }
}
