use crate::error::{check_len, KernelError};
use crate::Element;

/// Copies token t's K/V rows (`row_elems` = kv heads × head_dim each) into cache slot
/// `slots[t]` (page × page_size + offset); a slot of -1 skips the token.
pub fn kv_scatter<T: Element>(
    row_elems: usize,
    k_block: &[T],
    v_block: &[T],
    slots: &[i32],
    k_pages: &mut [T],
    v_pages: &mut [T],
) -> Result<(), KernelError> {
    check_len("k_block", k_block.len(), slots.len() * row_elems)?;
    check_len("v_block", v_block.len(), slots.len() * row_elems)?;
    check_len("v_pages", v_pages.len(), k_pages.len())?;
    let num_slots = k_pages.len() / row_elems.max(1);
    for (t, &slot) in slots.iter().enumerate() {
        if slot == -1 {
            continue;
        }
        if slot < 0 || slot as usize >= num_slots {
            return Err(KernelError::OutOfRange {
                field: "slots",
                value: slot as i64,
                limit: format!("the pages hold {num_slots} slots (or -1 to skip)"),
            });
        }
        let dst = slot as usize * row_elems;
        k_pages[dst..dst + row_elems].copy_from_slice(&k_block[t * row_elems..][..row_elems]);
        v_pages[dst..dst + row_elems].copy_from_slice(&v_block[t * row_elems..][..row_elems]);
    }
    Ok(())
}
