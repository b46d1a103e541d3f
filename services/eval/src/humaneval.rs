//! HumanEval (Chen et al., 2021): 164 Python functions, each a prompt (signature and
//! docstring), a canonical body, and tests. A completion is cut at the next top-level statement
//! and run, after the prompt, against the problem's `check` function.

use std::io::Read;
use std::path::Path;

#[derive(Clone, Debug, serde::Deserialize)]
pub struct Problem {
    pub task_id: String,
    pub prompt: String,
    pub canonical_solution: String,
    pub test: String,
    pub entry_point: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}, line {line}: {source}")]
    Parse {
        path: String,
        line: usize,
        source: serde_json::Error,
    },
}

/// Where a completion ends: the usual stop sequences of HumanEval evaluations (the next
/// top-level definition, main guard, print or comment).
pub const STOP_SEQUENCES: [&str; 5] = ["\ndef", "\nclass", "\nif __name__", "\nprint", "\n#"];

/// The problems of a `HumanEval.jsonl` file, gzipped (`.gz`) or not.
pub fn load(path: &Path) -> Result<Vec<Problem>, LoadError> {
    let name = path.display().to_string();
    let read_err = |source| LoadError::Read {
        path: name.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut text = String::new();
    if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(file).read_to_string(&mut text)
    } else {
        std::io::BufReader::new(file).read_to_string(&mut text)
    }
    .map_err(read_err)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| LoadError::Parse {
                path: name.clone(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

/// The completion up to the first stop sequence.
pub fn truncate(completion: &str) -> &str {
    let cut = STOP_SEQUENCES
        .iter()
        .filter_map(|s| completion.find(s))
        .min()
        .unwrap_or(completion.len());
    &completion[..cut]
}

/// The program that judges `completion`: the prompt, the completion, the tests, the check.
pub fn program(problem: &Problem, completion: &str) -> String {
    format!(
        "{}{}\n\n{}\n\ncheck({})\n",
        problem.prompt, completion, problem.test, problem.entry_point
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completion_ends_at_the_next_top_level_statement() {
        let c = "    return a + b\n\n\ndef other():\n    pass\n";
        assert_eq!(truncate(c), "    return a + b\n\n");
        assert_eq!(truncate("    return 1\n# note\nx = 2"), "    return 1");
        assert_eq!(truncate("    return 1\n"), "    return 1\n");
        // Nested definitions and comments are kept: only column 0 ends it.
        assert_eq!(
            truncate("    def h():\n        # c\n        return 1\n"),
            "    def h():\n        # c\n        return 1\n"
        );
    }
}
