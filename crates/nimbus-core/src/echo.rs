//! Repeating user input in error messages, briefly: an error names what it refuses by a
//! short prefix of it, never by the whole input (a 10 KB session key must not come back
//! as a 10 KB message).

use std::fmt;

/// Most characters of one piece of user input repeated in an error message.
pub const MAX_ECHO_CHARS: usize = 64;

/// `input` quoted as Rust's `{:?}` would, cut to its first [`MAX_ECHO_CHARS`] characters
/// with its size added when longer: `"abc"`, or `"aaaa…"… (10240 bytes)`.
pub fn echo(input: &str) -> Echo<'_> {
    Echo(input)
}

/// See [`echo`].
#[derive(Clone, Copy)]
pub struct Echo<'a>(&'a str);

impl fmt::Display for Echo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(MAX_ECHO_CHARS) {
            None => write!(f, "{:?}", self.0),
            Some((end, _)) => write!(f, "{:?}… ({} bytes)", &self.0[..end], self.0.len()),
        }
    }
}

impl fmt::Debug for Echo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `text` (a message that may embed input, such as a parser's) cut to `max_chars`
/// characters, with `…` where it was cut.
pub fn cut(text: &str, max_chars: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max_chars) {
        None => text.into(),
        Some((end, _)) => format!("{}…", &text[..end]).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_quoted_whole() {
        assert_eq!(echo("prod").to_string(), "\"prod\"");
        assert_eq!(echo("a\"b\n").to_string(), r#""a\"b\n""#);
    }

    #[test]
    fn long_input_is_cut_to_a_prefix_with_its_size() {
        let long = "é".repeat(5000);
        let shown = echo(&long).to_string();
        assert!(shown.starts_with(&format!("\"{}\"…", "é".repeat(MAX_ECHO_CHARS))));
        assert!(shown.ends_with("(10000 bytes)"), "{shown}");
        assert!(shown.len() < 200);
        assert_eq!(echo(&"x".repeat(MAX_ECHO_CHARS)).to_string().len(), 66);
    }

    #[test]
    fn messages_are_cut_on_character_boundaries() {
        assert_eq!(cut("abc", 3), "abc");
        assert_eq!(cut("abcd", 3), "abc…");
        assert_eq!(cut("ééé", 2), "éé…");
    }
}
