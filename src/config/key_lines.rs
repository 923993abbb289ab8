//! Finds the line of a key path in YAML text. serde_yaml's values carry no positions, and
//! semantic errors (a missing user, say) are found after parsing, so the line is looked up
//! in the text: block-style mappings, which is what service files are.

/// 1-based line of `path` (e.g. `["criu", "config"]`), or of the deepest ancestor found.
pub fn line_of(text: &str, path: &[&str]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = None;
    let (mut from, mut to, mut min_indent) = (0usize, lines.len(), 0usize);
    for key in path {
        let mut hit = None;
        for (i, raw) in lines.iter().enumerate().take(to).skip(from) {
            let indent = raw.len() - raw.trim_start().len();
            let body = raw.trim_start();
            if body.is_empty() || body.starts_with('#') {
                continue;
            }
            if indent < min_indent && i > from {
                break;
            }
            let key_part = body.split(':').next().unwrap_or("").trim().trim_matches(|c| c == '"' || c == '\'');
            if indent >= min_indent && key_part == *key && body.contains(':') {
                hit = Some((i, indent));
                break;
            }
        }
        let (i, indent) = hit?;
        found = Some(i + 1);
        // The children are the following lines indented deeper than this key.
        let end = lines
            .iter()
            .enumerate()
            .skip(i + 1)
            .find(|(_, l)| {
                let b = l.trim_start();
                !b.is_empty() && !b.starts_with('#') && l.len() - b.len() <= indent
            })
            .map(|(j, _)| j)
            .unwrap_or(lines.len());
        from = i + 1;
        to = end;
        min_indent = indent + 1;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::line_of;

    const DOC: &str = "# a service\ncommand: [\"/bin/true\"]\nuser: nobody\ncriu:\n  # why\n  config: fast\n  options: []\nkill_port: 7000\n";

    #[test]
    fn finds_top_level_and_nested_keys() {
        assert_eq!(line_of(DOC, &["command"]), Some(2));
        assert_eq!(line_of(DOC, &["kill_port"]), Some(8));
        assert_eq!(line_of(DOC, &["criu", "config"]), Some(6));
        assert_eq!(line_of(DOC, &["criu", "options"]), Some(7));
    }

    #[test]
    fn missing_keys_have_no_line() {
        assert_eq!(line_of(DOC, &["group"]), None);
        assert_eq!(line_of(DOC, &["criu", "nope"]), None);
    }
}
