//! Where the pages' keys and values live: per layer, one K and one V buffer of
//! `[num_pages, page_tokens, kv_heads, head_dim]` f32, the layout `paged_attention` reads and the
//! CUDA kernels use, in host memory or (with a CUDA model) on the device. A committed block's
//! K/V rows are written once, through its block table.

use candle_core::{DType, Device};
use rayon::prelude::*;
use sdlm_kernels::{AttentionShape, KernelError};

use super::block_table::TableView;
use super::device_pages::DevicePages;
use crate::error::Result;

pub struct KvStorage {
    shape: AttentionShape,
    pages: Pages,
}

enum Pages {
    Host { k: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
    // Boxed: the device's handles are several times the host variant's size.
    Device(Box<DevicePages>),
}

impl KvStorage {
    /// Bytes one token of `model` takes across all layers (K and V) in the storage
    /// [`KvStorage::on`] makes for it: f32 host pages for the CPU, pages in the model's dtype on
    /// a GPU.
    pub fn bytes_per_token(model: &crate::Model) -> usize {
        let c = model.config();
        let elem = match model.device() {
            Device::Cpu => std::mem::size_of::<f32>(),
            _ => model.dtype().size_in_bytes(),
        };
        2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * elem
    }

    /// Storage in host memory for `num_pages` pages in each of `layers` layers.
    pub fn new(layers: usize, num_pages: usize, shape: AttentionShape) -> Self {
        let elems = num_pages * shape.page_elems();
        Self {
            shape,
            pages: Pages::Host {
                k: (0..layers).map(|_| vec![0.0; elems]).collect(),
                v: (0..layers).map(|_| vec![0.0; elems]).collect(),
            },
        }
    }

    /// Storage where `device`'s model runs: host memory (f32) for the CPU, device memory in
    /// the model's `dtype` for a GPU.
    pub fn on(
        device: &Device,
        dtype: DType,
        layers: usize,
        num_pages: usize,
        shape: AttentionShape,
    ) -> Result<Self> {
        Ok(
            match DevicePages::new(device, dtype, layers, num_pages * shape.page_elems())? {
                Some(pages) => Self {
                    shape,
                    pages: Pages::Device(Box::new(pages)),
                },
                None => Self::new(layers, num_pages, shape),
            },
        )
    }

    pub fn shape(&self) -> &AttentionShape {
        &self.shape
    }

    /// One layer's K and V pages, when they are in host memory.
    pub fn layer(&self, layer: usize) -> Option<(&[f32], &[f32])> {
        match &self.pages {
            Pages::Host { k, v } => Some((k.get(layer)?, v.get(layer)?)),
            Pages::Device(_) => None,
        }
    }

    /// The pages on the device, when they are there.
    pub(crate) fn on_device(&mut self) -> Option<&mut DevicePages> {
        match &mut self.pages {
            Pages::Device(d) => Some(d.as_mut()),
            Pages::Host { .. } => None,
        }
    }

    /// Writes the K/V rows (`[n, kv_heads, head_dim]` each) of the table's tokens
    /// `start..start + n` in `layer`; those tokens must already be committed to the table.
    /// Host pages only (device pages are written by [`DevicePages::attend_and_commit`]).
    pub fn write(
        &mut self,
        layer: usize,
        table: TableView<'_>,
        start: usize,
        k: &[f32],
        v: &[f32],
    ) -> std::result::Result<(), KernelError> {
        let row = self.shape.num_kv_heads * self.shape.head_dim;
        let n = k.len() / row.max(1);
        let slots = slots(table, start, n, self.shape.page_size)?;
        let Pages::Host { k: kp, v: vp } = &mut self.pages else {
            return Err(KernelError::Unsupported {
                what: "KV storage",
                detail: "host rows cannot be written into pages on the device".into(),
            });
        };
        let layers = kp.len();
        match (kp.get_mut(layer), vp.get_mut(layer)) {
            (Some(kp), Some(vp)) => sdlm_kernels::reference::kv_scatter(row, k, v, &slots, kp, vp),
            _ => Err(KernelError::OutOfRange {
                field: "layer",
                value: layer as i64,
                limit: format!("the storage has {layers} layers"),
            }),
        }
    }

    /// Writes token t's K/V rows of every layer (`kv[layer]`: k and v `[tokens, kv_heads,
    /// head_dim]`) into slot `slots[t]` (page × page_tokens + offset; -1 skips the token), the
    /// layers side by side on rayon's workers: a 16-sequence round of the shipped model spent
    /// 55 µs writing its commits on one core while the other waited (2-core Xeon). Host pages
    /// only.
    pub fn write_slots(
        &mut self,
        slots: &[i32],
        kv: &[(Vec<f32>, Vec<f32>)],
    ) -> std::result::Result<(), KernelError> {
        let row = self.shape.num_kv_heads * self.shape.head_dim;
        let Pages::Host { k: kp, v: vp } = &mut self.pages else {
            return Err(KernelError::Unsupported {
                what: "KV storage",
                detail: "host rows cannot be written into pages on the device".into(),
            });
        };
        if kv.len() != kp.len() {
            return Err(KernelError::OutOfRange {
                field: "layers",
                value: kv.len() as i64,
                limit: format!("the storage has {} layers", kp.len()),
            });
        }
        kp.par_iter_mut()
            .zip(vp.par_iter_mut())
            .zip(kv)
            .try_for_each(|((kp, vp), (k, v))| {
                sdlm_kernels::reference::kv_scatter(row, k, v, slots, kp, vp)
            })
    }
}

/// The slots (page × page_tokens + offset) of the table's tokens `start..start + n`, which must
/// be committed to it.
pub(crate) fn slots(
    table: TableView<'_>,
    start: usize,
    n: usize,
    page_tokens: usize,
) -> std::result::Result<Vec<i32>, KernelError> {
    (start..start + n)
        .map(|i| {
            let (page, offset) =
                table
                    .slot(i, page_tokens)
                    .ok_or_else(|| KernelError::OutOfRange {
                        field: "start",
                        value: i as i64,
                        limit: format!("the table holds {} committed tokens", table.len),
                    })?;
            Ok((page as usize * page_tokens + offset) as i32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{BlockTable, PagePool};

    #[test]
    fn rows_land_in_the_pages_of_the_table_and_nowhere_else() {
        let shape = AttentionShape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 8,
            page_size: 4,
        };
        let pool = PagePool::new(8, 4);
        let _other = pool.allocate(); // so the table's pages are not simply 0, 1, ...
        let mut table = BlockTable::new();
        table.commit(&pool, &[1, 2, 3, 4, 5, 6]).unwrap();
        let mut storage = KvStorage::new(2, pool.total(), shape);
        let k: Vec<f32> = (0..6 * 8).map(|x| x as f32).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        storage.write(1, table.view(), 0, &k, &v).unwrap();
        let (kp, vp) = storage.layer(1).unwrap();
        for i in 0..6 {
            let (page, offset) = table.slot(i, 4).unwrap();
            let at = (page as usize * 4 + offset) * 8;
            assert_eq!(&kp[at..at + 8], &k[i * 8..][..8]);
            assert_eq!(&vp[at..at + 8], &v[i * 8..][..8]);
        }
        let written = kp.iter().filter(|&&x| x != 0.0).count();
        assert_eq!(
            written,
            6 * 8 - 1,
            "every row once (the first value is 0.0)"
        );
        assert!(storage.layer(0).unwrap().0.iter().all(|&x| x == 0.0));
        // Tokens not committed to the table are refused, naming the argument.
        let err = storage
            .write(0, table.view(), 5, &k[..16], &v[..16])
            .unwrap_err();
        assert!(err.to_string().contains("start"), "{err}");
    }

    #[test]
    fn every_layer_gets_its_rows_in_the_given_slots_and_a_skipped_token_goes_nowhere() {
        let shape = AttentionShape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 8,
            page_size: 4,
        };
        let mut storage = KvStorage::new(3, 4, shape);
        let slots = [9, -1, 2];
        // Layer l's token t holds 100 l + 10 t + 1 + (its index in the row) / 100 (v negated).
        let kv: Vec<(Vec<f32>, Vec<f32>)> = (0..3)
            .map(|l| {
                let k: Vec<f32> = (0..3 * 8)
                    .map(|i| (100 * l + 10 * (i / 8) + 1) as f32 + (i % 8) as f32 / 100.0)
                    .collect();
                let v = k.iter().map(|x| -x).collect();
                (k, v)
            })
            .collect();
        storage.write_slots(&slots, &kv).unwrap();
        for (l, (k, v)) in kv.iter().enumerate() {
            let (kp, vp) = storage.layer(l).unwrap();
            for (t, &slot) in slots.iter().enumerate().filter(|(_, &s)| s >= 0) {
                let at = slot as usize * 8;
                assert_eq!(&kp[at..at + 8], &k[t * 8..][..8], "layer {l} token {t}");
                assert_eq!(&vp[at..at + 8], &v[t * 8..][..8], "layer {l} token {t}");
            }
            let written = kp.iter().filter(|&&x| x != 0.0).count();
            assert_eq!(
                written,
                2 * 8,
                "layer {l}: two rows, the skipped token's nowhere"
            );
        }
        // A layer count that is not the storage's is refused, naming it.
        let err = storage.write_slots(&slots, &kv[..2]).unwrap_err();
        assert!(err.to_string().contains("layers"), "{err}");
    }
}
