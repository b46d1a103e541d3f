//! Launches of the row-wise kernels: kv_scatter, residual_rmsnorm, rope.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{to_i32, CudaElement, CudaKernels};
use crate::error::check_len;
use crate::reference::RopeTable;
use crate::KernelError;

/// Threads per row for the row-wise kernels (RMSNorm's THREADS in rmsnorm.cu).
const ROW_THREADS: u32 = 256;

/// A [`RopeTable`] on the device.
pub struct DeviceRopeTable {
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    head_dim: usize,
    max_position: usize,
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn vector_multiple<T: CudaElement>(field: &'static str, elems: usize) -> Result<(), KernelError> {
    let per_vec = 16 / std::mem::size_of::<T>();
    if elems.is_multiple_of(per_vec) {
        Ok(())
    } else {
        Err(KernelError::Unsupported {
            what: field,
            detail: format!("{elems} elements; the kernel moves 16-byte vectors, so it must be a multiple of {per_vec}"),
        })
    }
}

impl CudaKernels {
    /// See [`crate::reference::kv_scatter`]. The slots are on the device; `num_tokens` of them.
    /// Slot values must be -1 or below the pages' slot count (the engine's allocator hands them
    /// out; the kernel does not re-check them).
    pub fn kv_scatter<T: CudaElement>(
        &self,
        row_elems: usize,
        k_block: &CudaSlice<T>,
        v_block: &CudaSlice<T>,
        slots: &CudaSlice<i32>,
        k_pages: &mut CudaSlice<T>,
        v_pages: &mut CudaSlice<T>,
    ) -> Result<(), KernelError> {
        vector_multiple::<T>("kv row", row_elems)?;
        check_len("k_block", k_block.len(), slots.len() * row_elems)?;
        check_len("v_block", v_block.len(), slots.len() * row_elems)?;
        check_len("v_pages", v_pages.len(), k_pages.len())?;
        if slots.is_empty() {
            return Ok(());
        }
        let f = self.function(&format!("kv_scatter_{}", T::NAME))?;
        let row = to_i32("row_elems", row_elems)?;
        let mut launch = self.stream.launch_builder(f);
        launch
            .arg(k_block)
            .arg(v_block)
            .arg(k_pages)
            .arg(v_pages)
            .arg(slots)
            .arg(&row);
        // SAFETY: matches kv_scatter_* in kv_scatter.cu; block lengths checked above.
        unsafe { launch.launch(rows_cfg(slots.len())) }?;
        Ok(())
    }

    /// See [`crate::reference::residual_rmsnorm`].
    pub fn residual_rmsnorm<T: CudaElement>(
        &self,
        hidden: usize,
        x: &CudaSlice<T>,
        residual: &mut CudaSlice<T>,
        weight: &CudaSlice<T>,
        eps: f32,
        out: &mut CudaSlice<T>,
    ) -> Result<(), KernelError> {
        vector_multiple::<T>("hidden", hidden)?;
        check_len("weight", weight.len(), hidden)?;
        check_len("residual", residual.len(), x.len())?;
        check_len("out", out.len(), x.len())?;
        if hidden == 0 || !x.len().is_multiple_of(hidden) {
            return Err(KernelError::Length {
                field: "x",
                actual: x.len(),
                expected: hidden,
            });
        }
        let f = self.function(&format!("residual_rmsnorm_{}", T::NAME))?;
        let h = to_i32("hidden", hidden)?;
        let mut launch = self.stream.launch_builder(f);
        launch
            .arg(x)
            .arg(residual)
            .arg(weight)
            .arg(out)
            .arg(&h)
            .arg(&eps);
        // SAFETY: matches residual_rmsnorm_* in rmsnorm.cu; all four buffers hold rows × hidden.
        unsafe { launch.launch(rows_cfg(x.len() / hidden)) }?;
        Ok(())
    }

    pub fn upload_rope_table(&self, table: &RopeTable) -> Result<DeviceRopeTable, KernelError> {
        Ok(DeviceRopeTable {
            cos: self.stream.clone_htod(&table.cos)?,
            sin: self.stream.clone_htod(&table.sin)?,
            head_dim: table.head_dim,
            max_position: table.max_position,
        })
    }

    /// See [`crate::reference::rope_inplace`]. Rows whose position is outside the table are left
    /// unchanged (the reference refuses them; check positions where they come from).
    pub fn rope_inplace<T: CudaElement>(
        &self,
        x: &mut CudaSlice<T>,
        positions: &CudaSlice<i32>,
        table: &DeviceRopeTable,
        num_heads: usize,
    ) -> Result<(), KernelError> {
        check_len("x", x.len(), positions.len() * num_heads * table.head_dim)?;
        if positions.is_empty() {
            return Ok(());
        }
        let f = self.function(&format!("rope_{}", T::NAME))?;
        let ints = [
            to_i32("num_heads", num_heads)?,
            to_i32("head_dim", table.head_dim)?,
            to_i32("max_position", table.max_position)?,
        ];
        let mut launch = self.stream.launch_builder(f);
        launch.arg(x).arg(positions).arg(&table.cos).arg(&table.sin);
        for v in &ints {
            launch.arg(v);
        }
        // SAFETY: matches rope_* in rope.cu; x holds tokens × heads × head_dim.
        unsafe { launch.launch(rows_cfg(positions.len())) }?;
        Ok(())
    }
}
