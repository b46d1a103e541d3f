//! `sdlm train` as a user runs it: the smoke preset end to end on this machine's CPython standard
//! library, the exported model served by `sdlm generate`, Ctrl-C, and refused input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn sdlm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdlm"))
        .args(args)
        .output()
        .expect("sdlm runs")
}

fn last_json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdlm-train-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn the_smoke_preset_trains_exports_and_serves() {
    let out = temp("smoke");
    let report = last_json(&sdlm(&[
        "train",
        "--preset",
        "smoke",
        "--out",
        s(&out),
        "--json",
    ]));
    assert_eq!(report["finished"], true);
    assert_eq!(report["steps"], 40);
    let eval = &report["final_eval"];
    let bpb = eval["ar_bits_per_byte"].as_f64().unwrap();
    // Untrained, a 384-token vocabulary costs about log2(384) ≈ 8.6 bits per token, over 3
    // bits per byte; 40 steps must beat that and stay finite.
    assert!(bpb.is_finite() && bpb < 4.5, "held-out AR {bpb} bits/byte");
    assert!(eval["diffusion_bits_per_byte"]
        .as_f64()
        .unwrap()
        .is_finite());
    for file in [
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "loss.png",
        "summary.json",
        "files.txt",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    for field in [
        "step",
        "lr",
        "loss",
        "mask_loss",
        "edit_loss",
        "tokens_per_s",
        "levenshtein",
    ] {
        assert!(!first[field].is_null(), "log rows have no {field}");
    }
    // The last fifth is the edit stage: edits logged, and their distance within the count.
    let rows: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let stage2: Vec<&serde_json::Value> = rows.iter().filter(|r| r["stage"] == 2).collect();
    assert_eq!(stage2.len(), 8);
    assert!(stage2
        .iter()
        .all(|r| r["levenshtein"].as_u64() <= r["edits"].as_u64()));

    // The model serves: diffusion is the default for a model with a mask token.
    let model = out.join("model");
    let gen = last_json(&sdlm(&[
        "generate",
        "--model",
        s(&model),
        "--max-new-tokens",
        "16",
        "--json",
        "def add(a, b):\n",
    ]));
    assert!(gen["tokens"].as_u64().unwrap() >= 1);
    assert!(gen["forward_passes"].as_u64().unwrap() >= 1);

    // A finished run directory is not overwritten by a new run.
    let again = sdlm(&["train", "--preset", "smoke", "--out", s(&out)]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn ctrl_c_checkpoints_and_resume_continues() {
    let out = temp("interrupt");
    let child = Command::new(env!("CARGO_BIN_EXE_sdlm"))
        .args([
            "train",
            "--preset",
            "smoke",
            "--steps",
            "100000",
            "--out",
            s(&out),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = out.join("log.jsonl");
    let deadline = Instant::now() + Duration::from_secs(300);
    while std::fs::read_to_string(&log).map_or(0, |t| t.lines().count()) < 2 {
        assert!(
            Instant::now() < deadline,
            "no training steps within 5 minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // SIGINT, as Ctrl-C in a terminal sends.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(rc, 0);
    let done = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/state.json")).unwrap())
            .unwrap();
    let stopped = state["step"].as_u64().unwrap();
    assert!((2..100000).contains(&stopped));
    let resumed = last_json(&sdlm(&[
        "train",
        "--out",
        s(&out),
        "--resume",
        "--session-steps",
        "1",
        "--json",
    ]));
    assert_eq!(resumed["steps"].as_u64(), Some(stopped + 1));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bad_input_is_refused_by_name() {
    let out = temp("bad");
    let e = sdlm(&["train", "--preset", "huge", "--out", s(&out)]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("preset \"huge\""));
    let e = sdlm(&["train", "--out", s(&out), "--resume"]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("no run to resume"));
    let e = sdlm(&[
        "train",
        "--preset",
        "smoke",
        "--steps",
        "0",
        "--out",
        s(&out),
    ]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("steps"));
    let e = sdlm(&[
        "train",
        "--preset",
        "smoke",
        "--corpus",
        "/nonexistent-corpus",
        "--out",
        s(&out),
    ]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("/nonexistent-corpus"));
    // Step reduction decodes with the model it starts from: none given, or one of another shape.
    let e = sdlm(&[
        "train",
        "--preset",
        "tiny-code-step-reduction",
        "--out",
        s(&out),
    ]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("--init"));
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/sdlm-tiny-code");
    let e = sdlm(&[
        "train",
        "--preset",
        "smoke",
        "--init",
        s(&shipped),
        "--out",
        s(&out),
    ]);
    assert!(!e.status.success());
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(err.contains("vocab_size is 8192"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}
