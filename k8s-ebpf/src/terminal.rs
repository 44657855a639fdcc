//! Text for people's terminals: strings that other people choose (process names,
//! certificate subjects and SANs, what a probed server answered) with every control
//! character made visible, so a hostile listener cannot clear the screen, move the
//! cursor or forge table rows. JSON output is escaped by the serializer and does not go
//! through here.

use std::{borrow::Cow, fmt::Write as _};

/// `s` with control characters written as escapes: C0 (`\x1b`, with `\t`, `\n`, `\r` by
/// name), DEL (`\x7f`), C1 (`\u{9b}`: a one-character CSI on some terminals), and the
/// invisible format characters that reorder or hide text (bidi overrides and isolates,
/// zero-width characters, line and paragraph separators). A backslash is doubled so an
/// escape in the output always means an escaped character, never a literal one.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c == '\\' || is_control(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c.is_ascii_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if is_control(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// C0, DEL, C1, and the Unicode format characters that change how a line reads.
fn is_control(c: char) -> bool {
    c.is_control() // C0, DEL and C1 (Unicode category Cc)
        || matches!(
            c,
            '\u{061c}'                  // Arabic letter mark
                | '\u{200b}'..='\u{200f}' // zero-width space/joiners, LRM, RLM
                | '\u{2028}'..='\u{202e}' // line/paragraph separators, bidi embeddings and overrides
                | '\u{2060}'..='\u{2069}' // word joiner, invisible operators, bidi isolates
                | '\u{feff}' // zero-width no-break space
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        for s in ["kubelet", "kube-apiserver", "CN=etcd, O=système", ""] {
            assert!(matches!(escape(s), Cow::Borrowed(b) if b == s), "{s:?}");
        }
    }

    #[test]
    fn control_characters_become_visible() {
        assert_eq!(escape("\x1b[2Jevil"), "\\x1b[2Jevil");
        assert_eq!(escape("a\rb\nc\td"), "a\\rb\\nc\\td");
        assert_eq!(escape("\0\x07\x7f"), "\\x00\\x07\\x7f");
        // C1: U+009B is CSI on terminals that take 8-bit controls.
        assert_eq!(escape("x\u{9b}31m"), "x\\u{9b}31m");
        // Bidi override and zero-width space: text that reads differently than it is.
        assert_eq!(escape("a\u{202e}b\u{200b}c"), "a\\u{202e}b\\u{200b}c");
        // A literal backslash cannot pass for an escape.
        assert_eq!(escape("\\x1b"), "\\\\x1b");
    }

    #[test]
    fn nothing_left_is_a_control_character() {
        let every: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        let out = escape(&every);
        assert!(!out.chars().any(is_control), "{out:?}");
    }
}
