//! `sdlm batch --target ADDR --input prompts.jsonl --output results.jsonl`: an offline job over
//! the Generation API. Each input line is `{"id": ..., "prompt": "...", "params": {...}}`
//! (params optional, with the fields of `sdlm generate`). Results are appended to the output as
//! soon as each finishes, one JSON object per line, each written with a single `write` to a file
//! opened for appending, so killing the job (even with SIGKILL) leaves only whole lines and loses
//! none that finished. Run again, it skips every id already in the output (and drops a torn last
//! line, should the machine itself have failed mid-write). Transient gRPC errors are retried with
//! exponential backoff; a permanent error (bad input, a parameter out of range) becomes that
//! line's result.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use sdlm_proto::v1::{DecodingParams as WireParams, Mode as WireMode};
use tonic::Code;

use crate::completer::{self, Completer, Source};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    source: Source,
    /// JSON lines: {"id": ..., "prompt": "...", "params": {...}}.
    #[arg(long)]
    input: PathBuf,
    /// Results, appended; ids already here are skipped.
    #[arg(long)]
    output: PathBuf,
    /// Requests in flight.
    #[arg(long, default_value_t = 4, value_parser = crate::cluster::at_least_one)]
    concurrency: usize,
    /// Attempts per line for transient errors (unavailable, resource exhausted, ...).
    #[arg(long, default_value_t = 6, value_parser = crate::cluster::at_least_one)]
    attempts: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// One input line, parsed or not.
struct Line {
    /// The id as JSON text (`"a"` and `1` are different ids); `#line N` when it has none.
    key: String,
    id: serde_json::Value,
    request: Result<(String, WireParams), String>,
}

/// The optional params of an input line (the fields of `sdlm generate`).
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LineParams {
    max_new_tokens: Option<u32>,
    mode: Option<String>,
    block_size: Option<u32>,
    threshold: Option<f32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    seed: Option<u64>,
    #[serde(default)]
    stop: Vec<String>,
    refine: Option<bool>,
}

impl LineParams {
    fn wire(self) -> Result<WireParams, String> {
        let mode = match self.mode.as_deref() {
            None => None,
            Some("autoregressive" | "ar") => Some(WireMode::Autoregressive as i32),
            Some("diffusion") => Some(WireMode::Diffusion as i32),
            Some(other) => {
                return Err(format!(
                    "params.mode is {other:?}; it must be \"autoregressive\" or \"diffusion\""
                ))
            }
        };
        Ok(WireParams {
            max_new_tokens: self.max_new_tokens,
            mode,
            block_size: self.block_size,
            threshold: self.threshold,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop: self.stop,
            refine: self.refine,
            ..WireParams::default()
        })
    }
}

fn parse_line(number: usize, text: &str) -> Line {
    let fallback = || format!("#line {number}");
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return Line {
                key: fallback(),
                id: serde_json::Value::Null,
                request: Err(format!("line {number} is not JSON: {e}")),
            }
        }
    };
    let id = value.get("id").cloned().unwrap_or(serde_json::Value::Null);
    let key = match &id {
        serde_json::Value::String(_) | serde_json::Value::Number(_) => id.to_string(),
        _ => fallback(),
    };
    let request = (|| {
        if !matches!(
            id,
            serde_json::Value::String(_) | serde_json::Value::Number(_)
        ) {
            return Err(format!(
                "line {number}: id is missing; it must be a string or a number"
            ));
        }
        let prompt = value
            .get("prompt")
            .and_then(|p| p.as_str())
            .ok_or_else(|| format!("line {number}: prompt is missing; it must be a string"))?;
        let params: LineParams = match value.get("params") {
            None | Some(serde_json::Value::Null) => LineParams::default(),
            Some(p) => serde_json::from_value(p.clone())
                .map_err(|e| format!("line {number}: params: {e}"))?,
        };
        Ok((prompt.to_string(), params.wire()?))
    })();
    Line { key, id, request }
}

/// Keys of the complete results in `output`; a torn last line is cut off.
fn finished(output: &Path) -> anyhow::Result<HashSet<String>> {
    let mut done = HashSet::new();
    let Ok(bytes) = std::fs::read(output) else {
        return Ok(done);
    };
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if whole < bytes.len() {
        let file = std::fs::OpenOptions::new().write(true).open(output)?;
        file.set_len(whole as u64)
            .with_context(|| format!("cutting the torn last line of {}", output.display()))?;
    }
    for line in bytes[..whole].split(|&b| b == b'\n') {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
            if let Some(key) = v.get("key").and_then(|k| k.as_str()) {
                done.insert(key.to_string());
            }
        }
    }
    Ok(done)
}

/// The output file; each result goes out in one `write` (O_APPEND), never buffered.
struct Output(Mutex<std::fs::File>);

impl Output {
    fn append(&self, mut record: serde_json::Value, key: &str) -> anyhow::Result<()> {
        record["key"] = key.into();
        let mut line = serde_json::to_vec(&record)?;
        line.push(b'\n');
        let mut file = self
            .0
            .lock()
            .map_err(|_| anyhow::anyhow!("output lock poisoned"))?;
        file.write_all(&line).context("appending a result")
    }
}

fn transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::DeadlineExceeded
            | Code::Unknown
    )
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let input = std::fs::File::open(&args.input)
        .with_context(|| format!("opening --input {}", args.input.display()))?;
    let done = finished(&args.output)?;
    let mut seen = HashSet::new();
    let mut todo = Vec::new();
    for (i, text) in std::io::BufReader::new(input).lines().enumerate() {
        let text = text.with_context(|| format!("reading {}", args.input.display()))?;
        if text.trim().is_empty() {
            continue;
        }
        let line = parse_line(i + 1, &text);
        // One result per id: the first line with an id wins; later ones are reported and skipped.
        if !seen.insert(line.key.clone()) {
            eprintln!(
                "line {}: id {} repeats an earlier line; skipped",
                i + 1,
                line.key
            );
            continue;
        }
        if !done.contains(&line.key) {
            todo.push(line);
        }
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.output)
        .with_context(|| format!("opening --output {}", args.output.display()))?;
    let output = Arc::new(Output(Mutex::new(file)));
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(todo.len() as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} lines, {per_sec}, ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    eprintln!(
        "{} lines to run, {} already in {}",
        todo.len(),
        done.len(),
        args.output.display()
    );
    crate::cluster::runtime()?.block_on(async {
        let completer = Completer::start(&args.source).await?;
        let limit = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
        let mut tasks = Vec::new();
        for line in todo {
            let permit = Arc::clone(&limit).acquire_owned().await?;
            let (client, output, bar) = (completer.client(), Arc::clone(&output), bar.clone());
            let attempts = args.attempts;
            tasks.push(tokio::spawn(async move {
                let record = run_line(client, &line, attempts).await;
                let written = output.append(record, &line.key);
                bar.inc(1);
                drop(permit);
                written
            }));
        }
        for t in tasks {
            t.await??;
        }
        anyhow::Ok(())
    })?;
    bar.finish();
    Ok(())
}

async fn run_line(
    mut client: sdlm_proto::v1::generation_client::GenerationClient<tonic::transport::Channel>,
    line: &Line,
    attempts: usize,
) -> serde_json::Value {
    let (prompt, params) = match &line.request {
        Ok(r) => r.clone(),
        Err(message) => {
            return serde_json::json!({
                "id": line.id,
                "error": {"code": "invalid_input", "message": message},
            })
        }
    };
    let mut delay = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        match completer::generate(&mut client, prompt.clone(), params.clone()).await {
            Ok(c) => {
                return serde_json::json!({
                    "id": line.id,
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                    "completion_tokens": c.tokens,
                    "forward_passes": c.forwards,
                    "attempts": attempt,
                })
            }
            Err(status) if transient(status.code()) && attempt < attempts => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
                attempt += 1;
            }
            Err(status) => {
                return serde_json::json!({
                    "id": line.id,
                    "error": {
                        "code": sdlm_runtime::status_label(status.code()),
                        "message": status.message(),
                    },
                    "attempts": attempt,
                })
            }
        }
    }
}
