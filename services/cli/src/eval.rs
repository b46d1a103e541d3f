//! `sdlm eval humaneval|infill`: completes HumanEval problems (or fills lines removed from their
//! canonical solutions) through the Generation API, runs each result against the problem's tests
//! in the sandbox, and reports pass rates with tokens/s and tokens per forward. Every sample and
//! its verdict is written as a JSON line to `--out`; with `--json` the summary is the last line
//! of standard output.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use sdlm_engine::decode::Mode;
use sdlm_eval::humaneval::{self, Problem};
use sdlm_eval::infill::{self, Span};
use sdlm_eval::{passk, Limits, Sandbox, Verdict};
use sdlm_proto::v1::DecodingParams as WireParams;

use crate::completer::{self, Completer, Source};

#[derive(clap::Subcommand)]
pub enum Suite {
    /// HumanEval pass@k by execution.
    Humaneval(Args),
    /// Single- and multi-line infilling of HumanEval's canonical solutions, by execution.
    Infill(Args),
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    source: Source,
    /// HumanEval.jsonl(.gz) (default: where scripts/fetch-humaneval.sh puts it).
    #[arg(long)]
    problems: Option<PathBuf>,
    /// The first N problems only.
    #[arg(long)]
    limit: Option<usize>,
    /// Completions per problem (humaneval); pass@k is reported for k = 1 and k = samples.
    #[arg(long, default_value_t = 1, value_parser = crate::cluster::at_least_one)]
    samples: usize,
    /// Default: the model's (diffusion when it has a mask token).
    #[arg(long)]
    mode: Option<Mode>,
    #[arg(long)]
    block_size: Option<u32>,
    #[arg(long)]
    threshold: Option<f32>,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: u32,
    /// Sampling temperature (default 0, greedy; 0.8 when --samples > 1).
    #[arg(long)]
    temperature: Option<f32>,
    /// Requests in flight.
    #[arg(long, default_value_t = 1, value_parser = crate::cluster::at_least_one)]
    concurrency: usize,
    /// Wall-clock seconds each program may run.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Where every sample and its result go, one JSON object per line.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the summary as one JSON object (the last line).
    #[arg(long)]
    json: bool,
}

/// One request to make and judge.
struct Job {
    problem: usize,
    sample: usize,
    kind: Kind,
}

enum Kind {
    Complete,
    Infill(infill::InfillTask),
}

/// What one job came to.
struct Judged {
    problem: usize,
    span: Option<Span>,
    passed: bool,
    tokens: u32,
    forwards: u32,
    record: serde_json::Value,
}

pub fn run(suite: Suite) -> anyhow::Result<()> {
    let (args, infilling) = match suite {
        Suite::Humaneval(a) => (a, false),
        Suite::Infill(a) => (a, true),
    };
    let path = match &args.problems {
        Some(p) => p.clone(),
        None => default_problems()?,
    };
    let mut problems = humaneval::load(&path)?;
    problems.truncate(args.limit.unwrap_or(problems.len()));
    let sandbox = Arc::new(Sandbox::new(Limits {
        wall: std::time::Duration::from_secs(args.timeout),
        cpu_seconds: args.timeout,
        ..Limits::default()
    })?);
    let jobs: Vec<Job> = if infilling {
        problems
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                infill::tasks(p).into_iter().map(move |t| Job {
                    problem: i,
                    sample: 0,
                    kind: Kind::Infill(t),
                })
            })
            .collect()
    } else {
        (0..problems.len())
            .flat_map(|i| {
                (0..args.samples).map(move |s| Job {
                    problem: i,
                    sample: s,
                    kind: Kind::Complete,
                })
            })
            .collect()
    };
    let suite = if infilling { "infill" } else { "humaneval" };
    let out_path = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/eval/{suite}-samples.jsonl")));
    if let Some(dir) = out_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let out = std::fs::File::create(&out_path)
        .with_context(|| format!("creating {}", out_path.display()))?;
    let out = Arc::new(Mutex::new(out));
    eprintln!(
        "{} {} jobs over {} problems; sandbox: {}",
        suite,
        jobs.len(),
        problems.len(),
        sandbox.isolation().describe()
    );
    let params = wire_params(&args);
    let problems = Arc::new(problems);
    let judged = crate::cluster::runtime()?.block_on(async {
        let completer = Completer::start(&args.source).await?;
        // Throughput counts from here: loading the model is not generation.
        let start = Instant::now();
        let run = Run {
            problems: &problems,
            sandbox: &sandbox,
            out: &out,
            total: jobs.len(),
        };
        let judged = run_jobs(&completer, jobs, &run, params, args.concurrency).await?;
        anyhow::Ok((judged, start.elapsed().as_secs_f64()))
    })?;
    let (judged, seconds) = judged;
    report(
        &args, suite, &problems, &judged, seconds, &out_path, &sandbox,
    )
}

fn default_problems() -> anyhow::Result<PathBuf> {
    let cache = std::env::var_os("SDLM_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("sdlm")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sdlm")))
        .context("no cache directory: set SDLM_CACHE or give --problems")?;
    let path = cache.join("humaneval/HumanEval.jsonl.gz");
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: run scripts/fetch-humaneval.sh, or give --problems",
        path.display()
    );
    Ok(path)
}

fn wire_params(args: &Args) -> WireParams {
    let temperature = args
        .temperature
        .unwrap_or(if args.samples > 1 { 0.8 } else { 0.0 });
    WireParams {
        max_new_tokens: Some(args.max_new_tokens),
        mode: args.mode.map(|m| match m {
            Mode::Autoregressive => sdlm_proto::v1::Mode::Autoregressive as i32,
            Mode::Diffusion => sdlm_proto::v1::Mode::Diffusion as i32,
        }),
        block_size: args.block_size,
        threshold: args.threshold,
        temperature: Some(temperature),
        ..WireParams::default()
    }
}

/// What every job of a run shares.
struct Run<'a> {
    problems: &'a Arc<Vec<Problem>>,
    sandbox: &'a Arc<Sandbox>,
    /// The samples file: each judged sample is appended as it finishes.
    out: &'a Arc<Mutex<std::fs::File>>,
    total: usize,
}

async fn run_jobs(
    completer: &Completer,
    jobs: Vec<Job>,
    run: &Run<'_>,
    params: WireParams,
    concurrency: usize,
) -> anyhow::Result<Vec<Judged>> {
    let limit = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for job in jobs {
        let permit = Arc::clone(&limit).acquire_owned().await?;
        let (mut client, problems, sandbox) = (
            completer.client(),
            Arc::clone(run.problems),
            Arc::clone(run.sandbox),
        );
        let (out, done, total) = (Arc::clone(run.out), Arc::clone(&done), run.total);
        let mut params = params.clone();
        params.seed = Some(job.sample as u64);
        tasks.push(tokio::spawn(async move {
            let judged = judge(&mut client, job, problems, sandbox, params).await?;
            drop(permit);
            let mut file = out
                .lock()
                .map_err(|_| anyhow::anyhow!("the samples file's lock is poisoned"))?;
            writeln!(file, "{}", judged.record)?;
            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
            eprintln!(
                "{n}/{total} {} {}",
                judged.record["task_id"], judged.record["verdict"]
            );
            anyhow::Ok(judged)
        }));
    }
    let mut judged = Vec::new();
    for t in tasks {
        judged.push(t.await??);
    }
    Ok(judged)
}

async fn judge(
    client: &mut sdlm_proto::v1::generation_client::GenerationClient<tonic::transport::Channel>,
    job: Job,
    problems: Arc<Vec<Problem>>,
    sandbox: Arc<Sandbox>,
    mut params: WireParams,
) -> anyhow::Result<Judged> {
    let problem = &problems[job.problem];
    let span = match &job.kind {
        Kind::Complete => None,
        Kind::Infill(task) => Some(task.span),
    };
    let answer = match &job.kind {
        Kind::Complete => {
            params.stop = humaneval::STOP_SEQUENCES
                .iter()
                .map(|s| s.to_string())
                .collect();
            completer::generate(client, problem.prompt.clone(), params).await
        }
        Kind::Infill(task) => {
            completer::infill(client, task.prefix.clone(), task.suffix.clone(), params).await
        }
    };
    // A request that fails is that sample's result (it counts as not passing), not the run's end.
    let completion = match answer {
        Ok(c) => c,
        Err(status) => {
            return Ok(Judged {
                problem: job.problem,
                span,
                passed: false,
                tokens: 0,
                forwards: 0,
                record: serde_json::json!({
                    "task_id": problem.task_id,
                    "sample": job.sample,
                    "span": span,
                    "verdict": "error",
                    "passed": false,
                    "error": format!("{:?}: {}", status.code(), status.message()),
                }),
            })
        }
    };
    let (program, shown) = match &job.kind {
        Kind::Complete => {
            let body = humaneval::truncate(&completion.text).to_string();
            (humaneval::program(problem, &body), body)
        }
        Kind::Infill(task) => {
            let middle = infill::middle(task.span, &completion.text);
            (infill::program(problem, task, &middle), middle)
        }
    };
    let outcome = tokio::task::spawn_blocking(move || sandbox.run_python(&program)).await??;
    let passed = outcome.verdict == Verdict::Passed;
    let stderr_tail: String = {
        let lines: Vec<&str> = outcome.stderr.lines().collect();
        lines[lines.len().saturating_sub(3)..].join("\n")
    };
    Ok(Judged {
        problem: job.problem,
        span,
        passed,
        tokens: completion.tokens,
        forwards: completion.forwards,
        record: serde_json::json!({
            "task_id": problem.task_id,
            "sample": job.sample,
            "span": span,
            "completion": shown,
            "verdict": outcome.verdict,
            "passed": passed,
            "tokens": completion.tokens,
            "forward_passes": completion.forwards,
            "finish_reason": completion.finish_reason,
            "seconds": outcome.seconds,
            "stderr_tail": stderr_tail,
        }),
    })
}

fn report(
    args: &Args,
    suite: &str,
    problems: &[Problem],
    judged: &[Judged],
    seconds: f64,
    out_path: &std::path::Path,
    sandbox: &Sandbox,
) -> anyhow::Result<()> {
    let tokens: u64 = judged.iter().map(|j| j.tokens as u64).sum();
    let forwards: u64 = judged.iter().map(|j| j.forwards as u64).sum();
    let rate = |span: Option<Span>| {
        let chosen: Vec<&Judged> = judged.iter().filter(|j| j.span == span).collect();
        let passed = chosen.iter().filter(|j| j.passed).count();
        (passed as f64 / chosen.len().max(1) as f64, chosen.len())
    };
    let mut summary = serde_json::json!({
        "suite": suite,
        "problems": problems.len(),
        "samples": judged.len(),
        "mode": args.mode.map(|m| format!("{m:?}").to_lowercase()).unwrap_or_else(|| "model default".into()),
        "block_size": args.block_size,
        "threshold": args.threshold,
        "max_new_tokens": args.max_new_tokens,
        "tokens_per_second": tokens as f64 / seconds.max(1e-9),
        "tokens_per_forward": tokens as f64 / forwards.max(1) as f64,
        "completion_tokens": tokens,
        "wall_seconds": seconds,
        "samples_file": out_path.display().to_string(),
        "sandbox": sandbox.isolation(),
    });
    if suite == "infill" {
        let (single, n1) = rate(Some(Span::SingleLine));
        let (multi, n2) = rate(Some(Span::MultiLine));
        summary["single_line_pass_rate"] = single.into();
        summary["single_line_tasks"] = n1.into();
        summary["multi_line_pass_rate"] = multi.into();
        summary["multi_line_tasks"] = n2.into();
    } else {
        let per_problem: Vec<(usize, usize)> = (0..problems.len())
            .map(|i| {
                let mine = judged.iter().filter(|j| j.problem == i);
                let n = mine.clone().count();
                (n, mine.filter(|j| j.passed).count())
            })
            .collect();
        summary["pass_at_1"] = passk::mean_pass_at_k(&per_problem, 1).into();
        if args.samples > 1 {
            summary[format!("pass_at_{}", args.samples)] =
                passk::mean_pass_at_k(&per_problem, args.samples).into();
        }
    }
    if args.json {
        println!("{summary}");
    } else {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}
