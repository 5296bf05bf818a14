//! `y = x Wᵀ` over a frozen quantised matrix as a differentiable candle op: the forward runs the
//! block kernels (the same arithmetic as inference), the backward passes the input gradient
//! `dx = dy W` through the blocks ([`QuantMatrix::matmul_transposed`]). The matrix itself gets
//! no gradient: a quantised base is frozen, and what trains on it are adapters (LoRA), whose
//! gradients need exactly this input gradient from every layer after them.

use super::layers::{project, DENSE_GEMM_ROWS};
use crate::kernels::QuantMatrix;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use std::sync::Arc;

/// The op over one quantised `[out, in]` matrix; its argument is `x` as `[rows, in]`.
pub(crate) struct QuantLinear(pub(crate) Arc<QuantMatrix>);

impl QuantLinear {
    /// `x Wᵀ` for `x` of shape `[rows, in]`, differentiable with respect to `x`.
    pub(crate) fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(QuantLinear(self.0.clone()))
    }
}

impl CustomOp1 for QuantLinear {
    fn name(&self) -> &'static str {
        "quant-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(values) = storage else {
            candle_core::bail!("quant-linear takes f32 activations")
        };
        let &[rows, cols] = layout.dims() else {
            candle_core::bail!("quant-linear takes [rows, in], not {:?}", layout.dims())
        };
        if cols != self.0.cols() {
            candle_core::bail!(
                "quant-linear: {cols} inputs for a matrix of {}",
                self.0.cols()
            )
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("quant-linear takes a contiguous input")
        };
        let mut out = project(&[&self.0], &values[start..end], rows, DENSE_GEMM_ROWS)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let y = out.pop().unwrap_or_default();
        Ok((CpuStorage::F32(y), Shape::from((rows, self.0.rows()))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let rows = arg.dim(0)?;
        let dy: Vec<f32> = grad_res.flatten_all()?.to_vec1()?;
        let dx = self
            .0
            .matmul_transposed(&dy, rows)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::values;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Var};

    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let num = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
        let den = b.sqr().unwrap().sum_all().unwrap();
        (num.to_scalar::<f32>().unwrap() / den.to_scalar::<f32>().unwrap()).sqrt()
    }

    /// Forward and input gradient through the op equal the dense product's on the
    /// dequantised matrix, at decode and prefill row counts, for every block format.
    #[test]
    fn the_input_gradient_flows_through_the_blocks() {
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for rows in [3, 40] {
                let (out, inp) = (48, 96);
                let w = Tensor::from_vec(values(out * inp, 5), (out, inp), &dev).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let dense = q.dequantize(&dev).unwrap();
                let qm = Arc::new(QuantMatrix::from_qtensor(&q).unwrap().unwrap());
                let x = Var::from_tensor(
                    &Tensor::from_vec(values(rows * inp, 9), (rows, inp), &dev).unwrap(),
                )
                .unwrap();
                let c = Tensor::from_vec(values(rows * out, 11), (rows, out), &dev).unwrap();
                let y = QuantLinear(qm).apply(x.as_tensor()).unwrap();
                let want_y = x.as_tensor().matmul(&dense.t().unwrap()).unwrap();
                assert!(rel(&y, &want_y) <= 1e-5, "{dtype:?} forward x {rows}");
                let grads = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
                let gx = grads.get(x.as_tensor()).expect("a gradient for x");
                let want = c.matmul(&dense).unwrap();
                let r = rel(gx, &want);
                assert!(r <= 1e-5, "{dtype:?} input gradient x {rows}: {r}");
            }
        }
    }
}
