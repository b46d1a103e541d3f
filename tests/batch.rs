//! `sdlm batch` against a real `sdlm serve`: killed with SIGKILL at (seeded) random moments and
//! started again until it finishes, it leaves exactly one whole result line per input id;
//! lines that cannot run (not JSON, no id, a parameter out of range) get an error result
//! naming the problem instead of stopping the job.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use sdlm_system_tests::*;

fn batch(addr: &str, input: &std::path::Path, output: &std::path::Path) -> Command {
    let mut c = Command::new(sdlm());
    c.args([
        "batch",
        "--target",
        addr,
        "--concurrency",
        "4",
        "--quiet",
        "--input",
    ])
    .arg(input)
    .arg("--output")
    .arg(output)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    c
}

/// Well-formed requests in the job; a bad line and a bad parameter follow them.
const PROMPTS: usize = 120;

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_and_restarted_batch_gives_exactly_one_result_per_id() {
    let _serial = serial().await;
    let dir = TempDir::new("batch");
    let (_serve, addr, _) = serve_bundled(&dir, &[]);
    let input = dir.0.join("prompts.jsonl");
    let output = dir.0.join("results.jsonl");
    // Enough prompts that the job outlasts the last kill's mark and delay at this engine's
    // speed (30 of 8 tokens each finished inside the last delay once decoding got faster).
    let mut lines: Vec<String> = (0..PROMPTS)
        .map(|i| {
            serde_json::json!({
                "id": format!("p{i}"),
                "prompt": format!("def f{i}(x):\n"),
                "params": {"max_new_tokens": 8},
            })
            .to_string()
        })
        .collect();
    lines.push("{not json".into());
    lines
        .push(serde_json::json!({"id": 7, "prompt": "x", "params": {"block_size": 0}}).to_string());
    lines.push(serde_json::json!({"id": "p3", "prompt": "a repeated id"}).to_string());
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();

    // Each run is killed once the output has grown past a mark, after a seeded random delay (a
    // linear congruential generator): mid-job, at reproducible but arbitrary moments.
    let lines_in = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .matches('\n')
            .count()
    };
    let mut seed: u64 = 0x5eed;
    let mut kills = Vec::new();
    for round in 0..4 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = Duration::from_millis((seed >> 33) % 250);
        let mark = 1 + 6 * round;
        let mut child = batch(&addr, &input, &output).spawn().unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(120);
        while lines_in(&output) < mark && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        kills.push((delay, lines_in(&output)));
    }
    eprintln!("kills (delay, lines written by then): {kills:?}");
    let status = batch(&addr, &input, &output).status().unwrap();
    assert!(status.success());

    let text = std::fs::read_to_string(&output).unwrap();
    assert!(text.ends_with('\n'), "the last line is whole");
    let mut count: HashMap<String, usize> = HashMap::new();
    let mut by_key = HashMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("every line is whole JSON");
        let key = v["key"].as_str().expect("a key").to_string();
        *count.entry(key.clone()).or_default() += 1;
        by_key.insert(key, v);
    }
    let mut expected: Vec<String> = (0..PROMPTS).map(|i| format!("\"p{i}\"")).collect();
    expected.extend([format!("#line {}", PROMPTS + 1), "7".to_string()]);
    let mut got: Vec<String> = count.keys().cloned().collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    assert!(count.values().all(|&n| n == 1), "{count:?}");
    // The killed runs did part of the work; the last run resumed after it.
    let before_last = kills.last().map_or(0, |&(_, n)| n);
    assert!(before_last > 0 && before_last < PROMPTS + 2, "{kills:?}");
    for i in 0..PROMPTS {
        let r = &by_key[&format!("\"p{i}\"")];
        assert_eq!(r["completion_tokens"], 8, "{r}");
    }
    let bad = &by_key["7"]["error"];
    assert_eq!(bad["code"], "invalid_argument");
    assert!(
        bad["message"].as_str().unwrap().contains("block_size"),
        "{bad}"
    );
    assert!(
        by_key[&format!("#line {}", PROMPTS + 1)]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not JSON")
    );
}
