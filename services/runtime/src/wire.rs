//! Decoding parameters on the wire between gateway, scheduler and worker: the gateway resolves
//! every default for the model and sends them whole, so a worker decodes exactly what the
//! gateway validated.

use sdlm_engine::decode::{DecodingParams, Mode};
use sdlm_proto::v1::ResolvedParams;

pub fn to_wire(p: &DecodingParams) -> ResolvedParams {
    ResolvedParams {
        max_new_tokens: clamp_u32(p.max_new_tokens),
        diffusion: p.mode == Mode::Diffusion,
        block_size: clamp_u32(p.block_size),
        threshold: p.threshold,
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: clamp_u32(p.top_k),
        seed: p.seed,
        refine: p.refine,
        edit_threshold: p.edit_threshold,
        max_edits_per_block: p.max_edits_per_block.map(clamp_u32),
        max_steps_per_block: p.max_steps_per_block.map(clamp_u32),
    }
}

/// The engine's parameters from the wire; stop strings stay with the gateway (they are matched
/// on text), so none travel.
pub fn from_wire(p: &ResolvedParams) -> DecodingParams {
    DecodingParams {
        mode: if p.diffusion {
            Mode::Diffusion
        } else {
            Mode::Autoregressive
        },
        block_size: p.block_size as usize,
        threshold: p.threshold,
        max_new_tokens: p.max_new_tokens as usize,
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: p.top_p,
        seed: p.seed,
        stop_token_ids: Vec::new(),
        stop: Vec::new(),
        refine: p.refine,
        edit_threshold: p.edit_threshold,
        max_edits_per_block: p.max_edits_per_block.map(|n| n as usize),
        max_steps_per_block: p.max_steps_per_block.map(|n| n as usize),
    }
}

fn clamp_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_survive_the_wire() {
        let p = DecodingParams {
            mode: Mode::Diffusion,
            block_size: 8,
            threshold: 0.7,
            max_new_tokens: 99,
            temperature: 0.5,
            top_k: 3,
            top_p: 0.9,
            seed: 42,
            refine: true,
            edit_threshold: 0.8,
            max_edits_per_block: Some(2),
            max_steps_per_block: Some(5),
            ..DecodingParams::default()
        };
        assert_eq!(from_wire(&to_wire(&p)), p);
    }
}
