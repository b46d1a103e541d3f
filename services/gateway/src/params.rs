//! The public request's parameters to the engine's `DecodingParams`: a field left unset takes
//! the default `sdlm generate` uses for the model, and everything is validated in the engine's
//! one place, plus the limits only the service has (stop strings, request ids).

use sdlm_engine::decode::{DecodingParams, Mode as EngineMode, ModelLimits};
use sdlm_proto::v1::{DecodingParams as WireParams, Mode};
use tonic::Status;

pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// Resolves and validates `wire` for a prompt of `prompt_tokens` tokens.
pub fn resolve(
    wire: Option<&WireParams>,
    limits: &ModelLimits,
    prompt_tokens: usize,
) -> Result<DecodingParams, Status> {
    let defaults = DecodingParams::for_limits(limits);
    let Some(w) = wire else {
        defaults
            .validate_for(limits, prompt_tokens)
            .map_err(Status::invalid_argument)?;
        return Ok(defaults);
    };
    let mode = match w.mode {
        None => defaults.mode,
        Some(m) => match Mode::try_from(m) {
            Ok(Mode::Unspecified) => defaults.mode,
            Ok(Mode::Autoregressive) => EngineMode::Autoregressive,
            Ok(Mode::Diffusion) => EngineMode::Diffusion,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "mode is {m}; it must be 0 (unspecified), 1 (autoregressive) or 2 (diffusion)"
                )))
            }
        },
    };
    if w.stop.len() > MAX_STOP_STRINGS {
        return Err(Status::invalid_argument(format!(
            "stop has {} strings; at most {MAX_STOP_STRINGS} are allowed",
            w.stop.len()
        )));
    }
    if let Some(long) = w.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(Status::invalid_argument(format!(
            "a stop string is {} bytes; at most {MAX_STOP_BYTES} are allowed",
            long.len()
        )));
    }
    let params = DecodingParams {
        mode,
        block_size: w.block_size.map_or(defaults.block_size, |n| n as usize),
        threshold: w.threshold.unwrap_or(defaults.threshold),
        max_new_tokens: w
            .max_new_tokens
            .map_or(defaults.max_new_tokens, |n| n as usize),
        temperature: w.temperature.unwrap_or(defaults.temperature),
        top_k: w.top_k.map_or(defaults.top_k, |n| n as usize),
        top_p: w.top_p.unwrap_or(defaults.top_p),
        seed: w.seed.unwrap_or(defaults.seed),
        stop_token_ids: Vec::new(),
        stop: w.stop.clone(),
        refine: w.refine.unwrap_or(defaults.refine),
        edit_threshold: w.edit_threshold.unwrap_or(defaults.edit_threshold),
        max_edits_per_block: w.max_edits_per_block.map(|n| n as usize),
        max_steps_per_block: w.max_steps_per_block.map(|n| n as usize),
    };
    params
        .validate_for(limits, prompt_tokens)
        .map_err(Status::invalid_argument)?;
    Ok(params)
}

/// A caller's request id, or a new one.
pub fn request_id(given: Option<&str>) -> Result<String, Status> {
    match given {
        None | Some("") => Ok(format!("req-{:016x}", rand_u64())),
        Some(id) if id.len() > MAX_REQUEST_ID_BYTES => Err(Status::invalid_argument(format!(
            "request_id is {} bytes; at most {MAX_REQUEST_ID_BYTES} are allowed",
            id.len()
        ))),
        Some(id) if id.chars().any(|c| c.is_control()) => Err(Status::invalid_argument(
            "request_id holds a control character",
        )),
        Some(id) => Ok(id.to_string()),
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ModelLimits {
        ModelLimits {
            context: 256,
            vocab_size: 8192,
            has_mask_token: true,
            block_size: Some(8),
        }
    }

    #[test]
    fn unset_fields_take_the_generate_defaults() {
        let p = resolve(Some(&WireParams::default()), &limits(), 10).expect("valid");
        assert_eq!(p, DecodingParams::for_limits(&limits()));
        assert_eq!(resolve(None, &limits(), 10).expect("valid"), p);
        assert_eq!(p.mode, EngineMode::Diffusion);
        assert_eq!(p.block_size, 8);
    }

    #[test]
    fn out_of_range_fields_are_named_with_their_limit() {
        let cases: Vec<(WireParams, &str)> = vec![
            (
                WireParams {
                    block_size: Some(0),
                    ..Default::default()
                },
                "block_size",
            ),
            (
                WireParams {
                    block_size: Some(300),
                    ..Default::default()
                },
                "256",
            ),
            (
                WireParams {
                    threshold: Some(1.5),
                    ..Default::default()
                },
                "threshold",
            ),
            (
                WireParams {
                    top_p: Some(0.0),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                WireParams {
                    temperature: Some(-1.0),
                    ..Default::default()
                },
                "temperature",
            ),
            (
                WireParams {
                    max_new_tokens: Some(0),
                    ..Default::default()
                },
                "max_new_tokens",
            ),
            (
                WireParams {
                    max_new_tokens: Some(250),
                    ..Default::default()
                },
                "context of 256",
            ),
            (
                WireParams {
                    mode: Some(9),
                    ..Default::default()
                },
                "mode",
            ),
            (
                WireParams {
                    stop: vec!["x".repeat(300)],
                    ..Default::default()
                },
                "stop",
            ),
        ];
        for (wire, needle) in cases {
            let e = resolve(Some(&wire), &limits(), 10).expect_err("invalid");
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(
                e.message().contains(needle),
                "{needle:?} not in {:?}",
                e.message()
            );
        }
    }

    #[test]
    fn request_ids_are_bounded() {
        assert!(request_id(None).expect("made").starts_with("req-"));
        assert_eq!(request_id(Some("abc")).expect("kept"), "abc");
        assert!(request_id(Some(&"x".repeat(200))).is_err());
        assert!(request_id(Some("a\nb")).is_err());
    }
}
