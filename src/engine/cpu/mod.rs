//! CPU kernels: the packed-panel GEMM, paged attention, vectorizable math,
//! per-op timing and the machine's measured limits. They know slices, not
//! models: the step that drives them is `engine::host`.

pub mod attn;
pub mod gemm;
pub mod limits;
pub mod math;
pub mod profile;
pub mod quant;
