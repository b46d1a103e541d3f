//! Whether generated Python parses: the completion is cut at the end of the first top-level
//! definition (where the next line at column 0 starts), then parsed with tree-sitter-python; a
//! tree with an ERROR or MISSING node does not count.

/// prompt + completion, cut after the first top-level `def`/`class` (and its decorators).
pub fn first_definition(prompt: &str, completion: &str) -> String {
    let full = format!("{prompt}{completion}");
    let mut out = String::new();
    let mut in_def = false;
    for line in full.split_inclusive('\n') {
        let top_level = !line.starts_with([' ', '\t', '\n', '\r']) && !line.trim().is_empty();
        if in_def && top_level {
            break;
        }
        if top_level
            && (line.starts_with("def ")
                || line.starts_with("class ")
                || line.starts_with("async def "))
        {
            in_def = true;
        }
        out.push_str(line);
    }
    out
}

pub fn parses(source: &str) -> bool {
    let mut parser = tree_sitter::Parser::new();
    if parser
        .set_language(&tree_sitter_python::LANGUAGE.into())
        .is_err()
    {
        return false;
    }
    match parser.parse(source, None) {
        Some(tree) => !tree.root_node().has_error(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_the_next_top_level_line() {
        let cut = first_definition("def f(x):\n", "    return x\n\nprint(f(1))\n");
        assert_eq!(cut, "def f(x):\n    return x\n\n");
    }

    #[test]
    fn good_and_broken_python() {
        assert!(parses("def f(x):\n    return x + 1\n"));
        assert!(!parses("def f(x):\n    return (x +\n"));
        assert!(!parses("def f(x) return x\n"));
    }
}
