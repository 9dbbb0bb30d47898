//! Storage conversion launchers (see convert.cu): `Memory::copy` between an fp32 and a bf16
//! view.

use cudarc::driver::PushKernelArg;

use super::cost::{self, LaunchCost};
use super::{Cuda, DevMut, DevRef, KernelSource, dev_err, grid_for};
use crate::{Dtype, Result};

const TO_BF16: &str = "convert_f32_to_bf16";
const TO_F32: &str = "convert_bf16_to_f32";

pub(crate) const SOURCE: KernelSource =
    KernelSource { file: "convert.cu", code: include_str!("convert.cu"), kernels: &[TO_BF16, TO_F32] };

/// One conversion of `n` elements: each read once at the source's size, written once at the
/// destination's; one rounding an element.
pub(crate) fn convert_cost(n: usize, to: Dtype) -> LaunchCost {
    let n = n as u64;
    let name = if to == Dtype::Bf16 { TO_BF16 } else { TO_F32 };
    LaunchCost::kernel(name, n * (cost::size(Dtype::F32) + cost::size(Dtype::Bf16)), n)
}

impl Cuda {
    /// `dst = src` for views of equal length and different dtypes.
    pub(crate) fn launch_convert(&self, src: DevRef<'_>, dst: DevMut<'_>) -> Result<()> {
        let name = if dst.dtype == Dtype::Bf16 { TO_BF16 } else { TO_F32 };
        let n = src.len as i64;
        self.note(convert_cost(src.len, dst.dtype));
        let mut l = self.stream().launch_builder(self.func(name)?);
        l.arg(&dst.ptr).arg(&src.ptr).arg(&n);
        // SAFETY: callers checked the lengths; the dtypes pick the entry point; dst exclusive.
        unsafe { l.launch(grid_for(src.len, 256)) }.map(drop).map_err(dev_err)
    }
}
