//! `sdlm eval` end to end on the bundled model (in-process, through the same API as a client):
//! HumanEval and infilling runs write one judged line per sample and end with a JSON summary
//! whose rates are the share of passing lines.

use std::process::Command;

use sdlm_system_tests::*;

fn eval(suite: &str, out: &std::path::Path) -> (serde_json::Value, Vec<serde_json::Value>) {
    let model = model_dir();
    let run = Command::new(sdlm())
        .args(["eval", suite, "--model"])
        .arg(&model)
        .args(["--limit", "3", "--max-new-tokens", "24", "--json", "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    let summary = serde_json::from_str(stdout.lines().last().expect("a summary line")).unwrap();
    let samples = std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (summary, samples)
}

fn share_passing(samples: &[&serde_json::Value]) -> f64 {
    let passed = samples.iter().filter(|s| s["passed"] == true).count();
    passed as f64 / samples.len() as f64
}

#[test]
fn humaneval_reports_pass_at_1_from_its_judged_samples() {
    let dir = TempDir::new("eval-humaneval");
    let (summary, samples) = eval("humaneval", &dir.0.join("samples.jsonl"));
    assert_eq!(summary["problems"], 3);
    assert_eq!(samples.len(), 3);
    for s in &samples {
        assert!(["passed", "failed", "timed_out"].contains(&s["verdict"].as_str().unwrap()));
    }
    let all: Vec<&serde_json::Value> = samples.iter().collect();
    assert_eq!(summary["pass_at_1"].as_f64().unwrap(), share_passing(&all));
    assert!(summary["tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(summary["tokens_per_forward"].as_f64().unwrap() > 0.0);
}

#[test]
fn infill_reports_single_and_multi_line_rates() {
    let dir = TempDir::new("eval-infill");
    let (summary, samples) = eval("infill", &dir.0.join("samples.jsonl"));
    let of = |span: &str| -> Vec<&serde_json::Value> {
        samples.iter().filter(|s| s["span"] == span).collect()
    };
    let (single, multi) = (of("single_line"), of("multi_line"));
    assert_eq!(single.len(), 3);
    assert_eq!(summary["single_line_tasks"], 3);
    assert_eq!(
        summary["multi_line_tasks"].as_u64().unwrap() as usize,
        multi.len()
    );
    assert_eq!(
        summary["single_line_pass_rate"].as_f64().unwrap(),
        share_passing(&single)
    );
    assert_eq!(
        summary["multi_line_pass_rate"].as_f64().unwrap(),
        share_passing(&multi)
    );
}
