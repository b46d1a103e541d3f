//! An infilling benchmark from HumanEval's canonical solutions: one line, or a span of two to
//! four lines, is removed from the body; the model writes it back given the code before (the
//! prompt and the body above) and after (the body below); the problem's tests judge the whole.
//! Which lines go is fixed by the task id, so every run asks the same questions.

use crate::humaneval::Problem;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Span {
    SingleLine,
    MultiLine,
}

#[derive(Clone, Debug)]
pub struct InfillTask {
    pub task_id: String,
    pub span: Span,
    pub prefix: String,
    pub suffix: String,
    /// The lines removed (for reference; never shown to the model).
    pub removed: String,
}

/// FNV-1a: a fixed choice per task id, the same on every machine and run.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The single-line and the multi-line task of a problem (a body of one line has no multi-line
/// task; a body with no non-blank line, none).
pub fn tasks(problem: &Problem) -> Vec<InfillTask> {
    let lines: Vec<&str> = problem.canonical_solution.split_inclusive('\n').collect();
    let code: Vec<usize> = (0..lines.len())
        .filter(|&i| !lines[i].trim().is_empty())
        .collect();
    let mut out = Vec::new();
    let h = fnv(&problem.task_id);
    let make = |span, from: usize, to: usize| InfillTask {
        task_id: problem.task_id.clone(),
        span,
        prefix: format!("{}{}", problem.prompt, lines[..from].concat()),
        suffix: lines[to..].concat(),
        removed: lines[from..to].concat(),
    };
    if let Some(&line) = code.get((h % code.len().max(1) as u64) as usize) {
        out.push(make(Span::SingleLine, line, line + 1));
    }
    if code.len() >= 2 {
        let len = (2 + (h >> 16) % 3).min(code.len() as u64) as usize;
        let first = ((h >> 32) % (code.len() - len + 1) as u64) as usize;
        out.push(make(
            Span::MultiLine,
            code[first],
            code[first + len - 1] + 1,
        ));
    }
    out
}

/// The middle a model wrote, as it is judged: a single-line task keeps its first line.
pub fn middle(span: Span, generated: &str) -> String {
    match span {
        Span::SingleLine => match generated.find('\n') {
            Some(i) => generated[..=i].to_string(),
            None => format!("{generated}\n"),
        },
        Span::MultiLine => {
            if generated.ends_with('\n') {
                generated.to_string()
            } else {
                format!("{generated}\n")
            }
        }
    }
}

/// The program that judges a filled middle.
pub fn program(problem: &Problem, task: &InfillTask, middle: &str) -> String {
    format!(
        "{}{}{}\n\n{}\n\ncheck({})\n",
        task.prefix, middle, task.suffix, problem.test, problem.entry_point
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem() -> Problem {
        Problem {
            task_id: "Demo/0".into(),
            prompt: "def f(x):\n    \"\"\"Triple, plus one.\"\"\"\n".into(),
            canonical_solution: "    y = x * 3\n\n    y = y + 1\n    return y\n".into(),
            test: "def check(f):\n    assert f(1) == 4\n".into(),
            entry_point: "f".into(),
        }
    }

    #[test]
    fn putting_the_removed_lines_back_gives_the_canonical_program() {
        let p = problem();
        let tasks = tasks(&p);
        assert_eq!(tasks.len(), 2);
        for t in &tasks {
            assert!(!t.removed.trim().is_empty());
            assert_eq!(
                format!("{}{}{}", t.prefix, t.removed, t.suffix),
                format!("{}{}", p.prompt, p.canonical_solution)
            );
        }
        assert_eq!(tasks[0].span, Span::SingleLine);
        assert_eq!(tasks[0].removed.lines().count(), 1);
        assert!(
            tasks[1]
                .removed
                .lines()
                .filter(|l| !l.trim().is_empty())
                .count()
                >= 2
        );
    }

    #[test]
    fn a_single_line_middle_keeps_its_first_line() {
        assert_eq!(
            middle(Span::SingleLine, "    y = 1\n    z = 2\n"),
            "    y = 1\n"
        );
        assert_eq!(middle(Span::SingleLine, "    y = 1"), "    y = 1\n");
        assert_eq!(middle(Span::MultiLine, "    a\n    b"), "    a\n    b\n");
    }
}
