//! `sdlm generate` as a user runs it: the real binary on a fixture model.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn sdlm(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdlm"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sdlm runs");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn last_json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn json_reports_the_completion_and_its_counters() {
    let model = fixture("llama-sharded-f32");
    let out = sdlm(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--max-new-tokens",
            "12",
            "--json",
            "def f(x):",
        ],
        None,
    );
    let j = last_json(&out);
    assert_eq!(j["tokens"], 12);
    assert_eq!(j["finish_reason"], "length");
    assert_eq!(j["mode"], "autoregressive");
    assert_eq!(j["forward_passes"], 12);
    assert!(j["elapsed_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn prompt_from_standard_input_matches_the_argument() {
    let model = fixture("llama-sharded-f32");
    let m = model.to_str().unwrap();
    let a = last_json(&sdlm(
        &[
            "generate",
            "--model",
            m,
            "--max-new-tokens",
            "8",
            "--json",
            "def f(x):",
        ],
        None,
    ));
    let b = last_json(&sdlm(
        &["generate", "--model", m, "--max-new-tokens", "8", "--json"],
        Some("def f(x):"),
    ));
    assert_eq!(a["text"], b["text"]);
}

#[test]
fn bad_parameters_are_named() {
    let model = fixture("llama-sharded-f32");
    // `generate --model M FLAG VALUE x` fails with an error naming `names`.
    let refused = |flag: &str, value: &str, names: &str| {
        let out = sdlm(
            &[
                "generate",
                "--model",
                model.to_str().unwrap(),
                flag,
                value,
                "x",
            ],
            None,
        );
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(names), "{err}");
    };
    refused("--threshold", "0", "threshold");
    refused("--device", "tpu", "device: \"tpu\"");
    refused("--matmul-precision", "fp8", "matmul_precision");
    refused("--dtype", "fp8", "dtype is \"fp8\"");
    // bf16 computation is a GPU setting; the CPU says which flag it has instead.
    refused("--dtype", "bf16", "--matmul-precision bf16");
    let out = sdlm(&["generate", "--model", model.to_str().unwrap(), "x"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("context of 64"));
    let out = sdlm(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--max-new-tokens",
            "8",
            "--mode",
            "diffusion",
            "x",
        ],
        None,
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("mask_token_id"));
}

#[test]
fn a_stop_string_cuts_the_text_before_it() {
    let model = fixture("llama-sharded-f32");
    let m = model.to_str().unwrap();
    let full = last_json(&sdlm(
        &[
            "generate",
            "--model",
            m,
            "--max-new-tokens",
            "24",
            "--json",
            "def f(x):",
        ],
        None,
    ));
    let text = full["text"].as_str().unwrap().to_string();
    // A two-character piece whose first occurrence is past the start.
    let chars: Vec<char> = text.chars().collect();
    let stop: String = (2..chars.len() - 1)
        .map(|k| chars[k..k + 2].iter().collect::<String>())
        .find(|s: &String| text.find(s.as_str()).is_some_and(|i| i > 0))
        .expect("a repeated-free piece");
    let cut = last_json(&sdlm(
        &[
            "generate",
            "--model",
            m,
            "--max-new-tokens",
            "24",
            "--json",
            "--stop",
            &stop,
            "def f(x):",
        ],
        None,
    ));
    assert_eq!(
        cut["text"].as_str().unwrap(),
        &text[..text.find(stop.as_str()).unwrap()]
    );
    assert_eq!(cut["finish_reason"], "stop_string");
}

#[test]
fn the_shipped_model_generates_by_block_diffusion() {
    // The README's first command, on the model in models/.
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/sdlm-tiny-code");
    let out = sdlm(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--max-new-tokens",
            "40",
            "--json",
            "def parse_header(line):\n",
        ],
        None,
    );
    let v = last_json(&out);
    assert_eq!(v["tokens"].as_u64(), Some(40), "{v}");
    assert!(v["steps"].as_u64().unwrap() >= 2, "{v}");
    assert!(!v["text"].as_str().unwrap().is_empty());
}

#[test]
fn bf16_matmuls_generate_where_the_cpu_has_amx_and_name_what_is_missing_elsewhere() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let amx = cpuinfo.contains(" amx_bf16") && cpuinfo.contains(" amx_tile");
    let model = fixture("llama-sharded-f32");
    let out = sdlm(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--matmul-precision",
            "bf16",
            "--max-new-tokens",
            "8",
            "--json",
            "x",
        ],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    if amx {
        assert!(out.status.success(), "{err}");
        let report = last_json(&out);
        let tokens = report["tokens"].as_u64().unwrap_or(0);
        // Up to 8: the fixture may reach its end-of-text token first.
        assert!((1..=8).contains(&tokens), "{report}");
    } else {
        assert!(!out.status.success());
        assert!(err.contains("AMX-BF16"), "{err}");
    }
}
