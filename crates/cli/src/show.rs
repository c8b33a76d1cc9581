//! Text that lucos prints but did not write: bundle descriptions, ids and
//! symbol names, module and function names read from guest memory, guest
//! console lines. A bundle maker or the guest chooses those bytes, so they
//! must not reach the operator's terminal as control sequences (an ESC
//! sequence can recolour or clear the screen, an OSC can retitle the window
//! or write to the clipboard, a CR can overwrite a warning already printed).
//! Every such string goes through [`esc`] (or [`esc_lines`], [`json`])
//! before it is printed.

use std::borrow::Cow;
use std::fmt::Write;

/// C0 controls, DEL and the C1 controls (U+0080..U+009F, which some
/// terminals honour in UTF-8: U+009B is CSI).
fn is_control(c: char) -> bool {
    c.is_control()
}

fn escape_char(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if (c as u32) < 0x100 => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
}

fn escape_with(s: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !s.chars().any(|c| is_control(c) && !keep(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_control(c) && !keep(c) {
            escape_char(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `s` with every control character shown as an escape (`\x1b`, `\r`,
/// `\n`, `\x9b`): for one-line fields such as ids, names, descriptions.
pub fn esc(s: &str) -> Cow<'_, str> {
    escape_with(s, |_| false)
}

/// Like [`esc`] but keeps line feeds: for multi-line text (error chains,
/// command output) where a newline is structure, not an attack.
pub fn esc_lines(s: &str) -> Cow<'_, str> {
    escape_with(s, |c| c == '\n')
}

/// JSON for the terminal. serde_json already escapes C0 controls inside
/// strings but leaves DEL and the C1 controls raw; those can only occur
/// inside strings, where `\u00XX` is the same value.
pub fn json(text: String) -> String {
    if !text.chars().any(|c| matches!(c, '\u{7f}'..='\u{9f}')) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if matches!(c, '\u{7f}'..='\u{9f}') {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_untouched_and_borrowed() {
        for s in [
            "",
            "cmdline",
            "Linux version 6.1.0 (gcc 12) #1 SMP",
            "ünï ✓",
        ] {
            assert!(matches!(esc(s), Cow::Borrowed(_)), "{s}");
            assert_eq!(esc(s), s);
        }
    }

    #[test]
    fn controls_are_shown_not_sent() {
        assert_eq!(esc("a\x1b[2Jb"), "a\\x1b[2Jb");
        assert_eq!(esc("\x1b]0;title\x07"), "\\x1b]0;title\\x07");
        assert_eq!(esc("ok\rFAIL"), "ok\\rFAIL");
        assert_eq!(esc("x\ny\tz\0"), "x\\ny\\tz\\x00");
        assert_eq!(esc("del\x7f c1\u{9b}31m"), "del\\x7f c1\\x9b31m");
        for s in ["\x1b\x07\r\x7f\u{9b}\u{85}", "\u{1b}P", "a\u{8d}b"] {
            assert!(!esc(s).chars().any(char::is_control), "{s:?}");
        }
    }

    #[test]
    fn line_feeds_survive_only_in_multi_line_text() {
        assert_eq!(esc_lines("one\ntwo\r\x1b[1m"), "one\ntwo\\r\\x1b[1m");
    }

    #[test]
    fn json_keeps_its_value_and_loses_raw_controls() {
        let v = serde_json::json!({ "d": "esc\x1b cr\r del\x7f csi\u{9b}2J" });
        let text = json(serde_json::to_string(&v).unwrap());
        assert!(!text.chars().any(char::is_control), "{text}");
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, v);
    }
}
