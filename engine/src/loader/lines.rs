//! Line finders over a pipeline file's YAML text: serde_yaml gives no
//! positions for a value that parsed but fails a later check, so the loader
//! finds the line of a key or of a stage item itself, to put `file:line` in
//! its errors. Heuristic by design: a miss gives an error without a line,
//! never a wrong error.

/// 1-based line of the first top-level `key:`.
pub(super) fn find_key_line(text: &str, key: &str) -> Option<usize> {
    let key = key.trim_end_matches(':');
    text.lines()
        .position(|l| {
            let t = l.trim_start();
            t.strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with(':'))
        })
        .map(|i| i + 1)
}

/// 1-based line of `key:` among the lines after the top-level `section:`.
pub(super) fn find_key_line_after(text: &str, section: &str, key: &str) -> Option<usize> {
    let start = text.lines().position(|l| l.trim_end() == format!("{section}:"))?;
    let rest: String = text.lines().skip(start + 1).collect::<Vec<_>>().join("\n");
    find_key_line(&rest, key).map(|l| l + start + 1)
}

/// 1-based lines where each item of the top-level `stages:` list starts.
pub(super) fn stage_item_lines(text: &str) -> Vec<usize> {
    let mut lines = Vec::new();
    let mut in_stages = false;
    let mut indent: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let ind = line.len() - trimmed.len();
        if !in_stages {
            if ind == 0 && trimmed.trim_end() == "stages:" {
                in_stages = true;
            }
            continue;
        }
        if ind == 0 && !trimmed.starts_with('-') {
            break;
        }
        if trimmed.starts_with("- ") || trimmed == "-" {
            match indent {
                None => {
                    indent = Some(ind);
                    lines.push(i + 1);
                }
                Some(x) if x == ind => lines.push(i + 1),
                _ => {}
            }
        }
    }
    lines
}

/// For an inline script in the stage starting at `stage_line`: the number to
/// add to a script line to get the YAML line.
pub(super) fn inline_script_offset(text: &str, stage_line: usize) -> usize {
    for (i, line) in text.lines().enumerate().skip(stage_line.saturating_sub(1)) {
        let t = line.trim_start().trim_start_matches("- ");
        if let Some(rest) = t.strip_prefix("script:") {
            let rest = rest.trim();
            let block = rest.starts_with('|') || rest.starts_with('>');
            return if block { i + 1 } else { i };
        }
    }
    stage_line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_lines_found() {
        let text = "event_type: X\nstages:\n  - plugin: script\n    script: |\n      1\n  - plugin: deliver\ndestinations: {}\n";
        assert_eq!(stage_item_lines(text), vec![3, 6]);
        assert_eq!(inline_script_offset(text, 3), 4);
    }
}
