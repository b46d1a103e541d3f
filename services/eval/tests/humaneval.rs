//! The HumanEval harness on the real problems (scripts/fetch-humaneval.sh): every canonical
//! solution passes its tests in the sandbox and a body that returns nothing fails them, and
//! every infilling task passes with the removed lines put back, so a failure in an evaluation is
//! the model's, not the harness's.

use std::path::PathBuf;

use sdlm_eval::{humaneval, infill, Limits, Problem, Sandbox, Verdict};

fn problems() -> Vec<Problem> {
    let cache = std::env::var_os("SDLM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/sdlm"));
    let path = cache.join("humaneval/HumanEval.jsonl.gz");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-humaneval.sh",
        path.display()
    );
    humaneval::load(&path).unwrap()
}

/// Runs the programs on two threads; the task ids whose verdict is not `want`.
fn misjudged(sandbox: &Sandbox, programs: &[(String, String)], want: Verdict) -> Vec<String> {
    let half = programs.len().div_ceil(2);
    std::thread::scope(|scope| {
        let handles: Vec<_> = programs
            .chunks(half.max(1))
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .filter(|(_, p)| sandbox.run_python(p).unwrap().verdict != want)
                        .map(|(id, _)| id.clone())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

#[test]
fn canonical_solutions_pass_and_empty_bodies_fail() {
    let problems = problems();
    assert_eq!(problems.len(), 164);
    let sandbox = Sandbox::new(Limits::default()).unwrap();
    let canonical: Vec<(String, String)> = problems
        .iter()
        .map(|p| {
            (
                p.task_id.clone(),
                humaneval::program(p, &p.canonical_solution),
            )
        })
        .collect();
    assert_eq!(
        misjudged(&sandbox, &canonical, Verdict::Passed),
        Vec::<String>::new()
    );
    // A body that does nothing: every problem's tests catch it.
    let empty: Vec<(String, String)> = problems
        .iter()
        .map(|p| {
            (
                p.task_id.clone(),
                humaneval::program(p, "    return None\n"),
            )
        })
        .collect();
    assert_eq!(
        misjudged(&sandbox, &empty, Verdict::Failed),
        Vec::<String>::new()
    );
}

#[test]
fn every_infilling_task_passes_with_its_lines_put_back() {
    let problems = problems();
    let sandbox = Sandbox::new(Limits::default()).unwrap();
    let mut programs = Vec::new();
    let (mut single, mut multi) = (0, 0);
    for p in &problems {
        for t in infill::tasks(p) {
            match t.span {
                infill::Span::SingleLine => single += 1,
                infill::Span::MultiLine => multi += 1,
            }
            let middle = infill::middle(t.span, &t.removed);
            programs.push((
                format!("{} {:?}", t.task_id, t.span),
                infill::program(p, &t, &middle),
            ));
        }
    }
    eprintln!("{single} single-line and {multi} multi-line tasks");
    assert_eq!(single, 164);
    let with_two_lines = problems
        .iter()
        .filter(|p| {
            p.canonical_solution
                .lines()
                .filter(|l| !l.trim().is_empty())
                .count()
                >= 2
        })
        .count();
    assert_eq!(multi, with_two_lines);
    assert_eq!(
        misjudged(&sandbox, &programs, Verdict::Passed),
        Vec::<String>::new()
    );
}
