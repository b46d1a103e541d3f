//! Launches of the confidence selection kernels (confidence.cu).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{to_i32, CudaElement, CudaKernels};
use crate::KernelError;

/// Must match THREADS in confidence.cu.
const ROW_THREADS: u32 = 512;
const SELECT_THREADS: u32 = 256;

/// Per row: arg max token and its probability; per position: whether to unmask it now.
pub struct SelectionOutputs {
    pub tokens: CudaSlice<i32>,
    pub confidence: CudaSlice<f32>,
    pub unmask: CudaSlice<u8>,
}

impl SelectionOutputs {
    pub fn new(kernels: &CudaKernels, rows: usize) -> Result<Self, KernelError> {
        let s = kernels.stream();
        let rows = rows.max(1);
        Ok(Self {
            tokens: s.alloc_zeros(rows)?,
            confidence: s.alloc_zeros(rows)?,
            unmask: s.alloc_zeros(rows)?,
        })
    }
}

impl CudaKernels {
    /// See [`crate::reference::row_confidence`]; fills `tokens` and `confidence` for every row of
    /// `logits` (`[rows, vocab]`).
    pub fn row_confidence<T: CudaElement>(
        &self,
        logits: &CudaSlice<T>,
        vocab: usize,
        temperature: f32,
        outputs: &mut SelectionOutputs,
    ) -> Result<(), KernelError> {
        if vocab == 0 || !logits.len().is_multiple_of(vocab) {
            return Err(KernelError::Length {
                field: "logits",
                actual: logits.len(),
                expected: vocab,
            });
        }
        if !(temperature >= 0.0 && temperature.is_finite()) {
            return Err(KernelError::Unsupported {
                what: "temperature",
                detail: format!("{temperature}; it must be a finite number >= 0"),
            });
        }
        let rows = logits.len() / vocab;
        if outputs.tokens.len() < rows {
            return Err(KernelError::Length {
                field: "outputs.tokens",
                actual: outputs.tokens.len(),
                expected: rows,
            });
        }
        if rows == 0 {
            return Ok(());
        }
        let f = self.function(&format!("row_confidence_{}", T::NAME))?;
        let v = to_i32("vocab", vocab)?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(f);
        launch
            .arg(logits)
            .arg(&v)
            .arg(&temperature)
            .arg(&mut outputs.tokens)
            .arg(&mut outputs.confidence);
        // SAFETY: matches row_confidence_* in confidence.cu; outputs hold at least `rows`.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// See [`crate::reference::select_unmask`]: reads `outputs.confidence`, writes
    /// `outputs.unmask`. `block_starts` (host) must rise from 0 to at most the rows held.
    pub fn select_unmask(
        &self,
        masked: &CudaSlice<u8>,
        block_starts: &[i32],
        min_unmask: &[i32],
        threshold: f32,
        outputs: &mut SelectionOutputs,
    ) -> Result<(), KernelError> {
        let blocks = block_starts.len().saturating_sub(1);
        crate::error::check_len("min_unmask", min_unmask.len(), blocks)?;
        let rows = outputs.confidence.len().min(masked.len());
        let rising = block_starts.first() == Some(&0)
            && block_starts.windows(2).all(|w| w[0] <= w[1])
            && block_starts.last().is_some_and(|&e| e as usize <= rows);
        if !rising {
            return Err(KernelError::OutOfRange {
                field: "block_starts",
                value: block_starts.last().copied().unwrap_or(-1) as i64,
                limit: format!("must rise from 0 to at most {rows} rows"),
            });
        }
        if blocks == 0 {
            return Ok(());
        }
        let s = &self.stream;
        let starts = s.clone_htod(block_starts)?;
        let mins = s.clone_htod(min_unmask)?;
        let f = self.function("select_unmask")?;
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (SELECT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = s.launch_builder(f);
        launch
            .arg(&outputs.confidence)
            .arg(masked)
            .arg(&starts)
            .arg(&mins)
            .arg(&threshold)
            .arg(&mut outputs.unmask);
        // SAFETY: matches select_unmask in confidence.cu; block_starts checked above.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }
}
