//! CPU kernels: the packed-panel GEMM, paged attention, vectorizable math,
//! per-op timing and the machine's measured limits. They know slices, not
//! models: the step that drives them is `engine::host`.

pub mod attn;
pub mod gemm;
pub mod limits;
pub mod math;
pub mod profile;
pub mod quant;

/// An output pointer that may cross threads because every task of a
/// parallel kernel writes disjoint elements of the output.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the kernels' tasks write disjoint parts of the output (see
// `gemm::matmul_xwt`, `quant::matmul_xwt`).
unsafe impl Send for OutPtr {}
// SAFETY: as above; the pointer itself is only copied.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}
