//! Outside text made safe to print. File names, CRIU's log lines and a service's output are
//! written by others; shown raw on an operator's terminal, their control characters could set
//! its title, erase lines or forge a verdict. Every such text passes through here first.
//!
//! Escaped: the C0 controls, DEL and the C1 controls (U+0080..U+009F: 8-bit CSI/OSC on some
//! terminals), shown as `\x1b` (ASCII) or `\u{9b}`, and the bidirectional overrides and
//! isolates, which reorder what the reader sees (`\u{202e}`). The backslash itself is left alone,
//! so escaping is idempotent: text escaped at its source can pass another layer unchanged.

use std::borrow::Cow;
use std::fmt::Write;

/// Whether `c` is shown escaped.
fn unsafe_char(c: char) -> bool {
    // `is_control` is Unicode's Cc: C0, DEL and C1.
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every control character escaped, newlines too: for one line of a message.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if unsafe_char(c) && (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if unsafe_char(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A multi-line text (CRIU's error block, an error message with quoted lines) with each line
/// escaped and the line breaks kept: a `\r` or an escape sequence inside a line cannot reach the
/// terminal, while the block still reads as lines.
pub fn escape_lines(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c != '\n' && unsafe_char(c)) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.split('\n').map(escape_controls).collect::<Vec<_>>().join("\n"))
}

/// A JSON document with DEL, C1 and the bidi controls written as `\uXXXX` (serde_json already
/// escapes C0). They can occur only inside JSON strings, so the document stays valid and means
/// the same.
pub fn escape_json(json: &str) -> Cow<'_, str> {
    if !json.chars().any(unsafe_char) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if unsafe_char(c) && !c.is_ascii_whitespace() {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_codes_and_bidi_overrides_are_shown_not_obeyed() {
        let name = "/tmp/a\u{1b}]0;pwned\u{7}\u{1b}[2K\rOK checkpoint\u{9b}x\u{7f}\u{202e}gpj.exe";
        let shown = escape_controls(name);
        assert_eq!(shown, "/tmp/a\\x1b]0;pwned\\x07\\x1b[2K\\rOK checkpoint\\u{9b}x\\x7f\\u{202e}gpj.exe");
        assert!(!shown.chars().any(unsafe_char));
        assert_eq!(escape_controls(&shown), shown, "idempotent");
        assert!(matches!(escape_controls("plain: é ü 日本"), Cow::Borrowed(_)));
    }

    #[test]
    fn lines_keep_their_breaks() {
        assert_eq!(escape_lines("first\n  (0.1) Error: a\u{1b}[2K\rb\n"), "first\n  (0.1) Error: a\\x1b[2K\\rb\n");
        assert!(matches!(escape_lines("a\nb\n"), Cow::Borrowed(_)));
    }

    #[test]
    fn json_stays_valid_and_means_the_same() {
        let value = serde_json::json!({ "error": "a\u{1b}b\u{9b}c\u{7f}\u{202e}" });
        let text = serde_json::to_string_pretty(&value).unwrap();
        let safe = escape_json(&text);
        assert!(!safe.chars().any(|c| unsafe_char(c) && c != '\n'), "{safe}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&safe).unwrap(), value);
    }

    proptest::proptest! {
        #[test]
        fn nothing_unsafe_gets_through(s in "\\PC*|[\\x00-\\x{a0}\\x{202a}-\\x{202e}a-z\\n\\r]*") {
            proptest::prop_assert!(!escape_controls(&s).chars().any(unsafe_char));
            proptest::prop_assert!(!escape_lines(&s).chars().any(|c| c != '\n' && unsafe_char(c)));
            let once = escape_controls(&s).into_owned();
            proptest::prop_assert_eq!(escape_controls(&once), once.as_str());
        }
    }
}
