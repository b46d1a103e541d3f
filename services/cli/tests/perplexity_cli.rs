//! `sdlm perplexity` as a user runs it: the real binary on a fixture model and a text file.

use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn sdlm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sdlm"))
        .args(args)
        .output()
        .expect("sdlm runs")
}

#[test]
fn json_line_reports_every_token_after_the_first() {
    let text = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n".repeat(3);
    let file = std::env::temp_dir().join(format!("sdlm-ppl-{}.py", std::process::id()));
    std::fs::write(&file, &text).unwrap();
    let model = fixture("llama-sharded-f32");
    let out = sdlm(&[
        "perplexity",
        "--model",
        model.to_str().unwrap(),
        "--file",
        file.to_str().unwrap(),
        "--context",
        "32",
        "--stride",
        "16",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    // The fixture's tokenizer has one token per character.
    assert_eq!(last["scored_tokens"], text.len() - 1);
    let mean = last["mean_nll"].as_f64().unwrap();
    assert!(mean.is_finite() && mean > 0.0);
    let bpb = last["bits_per_byte"].as_f64().unwrap();
    let want_bpb =
        mean * (text.len() - 1) as f64 / std::f64::consts::LN_2 / (text.len() - 1) as f64;
    assert!((bpb - want_bpb).abs() < 1e-9, "{bpb} vs {want_bpb}");
    assert!(last["tokens_per_second"].as_f64().unwrap() > 0.0);
}

#[test]
fn missing_file_is_named() {
    let model = fixture("llama-sharded-f32");
    let out = sdlm(&[
        "perplexity",
        "--model",
        model.to_str().unwrap(),
        "--file",
        "/nonexistent.py",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent.py"), "{stderr}");
}
