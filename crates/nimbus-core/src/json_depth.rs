//! The nesting depth of JSON text, found by one scan of its bytes: no parse, no allocation.
//!
//! Every JSON body the server accepts is held to [`MAX_JSON_DEPTH`](crate::limits::MAX_JSON_DEPTH)
//! levels of arrays and objects before it is parsed or handed to a function: deeper text
//! would pass a parser that skips values without recursing (as an invocation event does)
//! and then exhaust the recursion of the worker that decodes it.

/// The byte offset of the bracket that opens the first array or object nested more than
/// `max` levels deep in `text`, or `None` when `text` nests at most `max` levels.
///
/// Brackets inside strings do not count. The text need not be valid JSON: whatever the
/// parser makes of it afterwards, it never sees more than `max` open brackets at once.
pub fn too_deep_at(text: &[u8], max: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Some(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'"' => i = string_end(text, i + 1),
            _ => {}
        }
        i += 1;
    }
    None
}

/// The index of the quote that closes the string whose text starts at `from` (or the end
/// of `text` if it is never closed), skipping escaped characters. Most strings are short
/// keys and values: their first bytes are looked at one by one, the rest of a longer one
/// is searched with `memchr` (measured: faster than either alone on both kinds).
fn string_end(text: &[u8], mut from: usize) -> usize {
    let short = text.len().min(from + 16);
    while from < short {
        match text[from] {
            b'"' => return from,
            b'\\' => from += 2,
            _ => from += 1,
        }
    }
    if from >= text.len() {
        return text.len();
    }
    while let Some(offset) = memchr::memchr2(b'"', b'\\', &text[from..]) {
        let at = from + offset;
        if text[at] == b'"' {
            return at;
        }
        from = at + 2;
        if from >= text.len() {
            break;
        }
    }
    text.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn depth_counts_arrays_and_objects() {
        assert_eq!(too_deep_at(b"1", 0), None);
        assert_eq!(too_deep_at(b"[]", 0), Some(0));
        assert_eq!(too_deep_at(b"[]", 1), None);
        assert_eq!(too_deep_at(br#"{"a":[{"b":[]}]}"#, 4), None);
        assert_eq!(too_deep_at(br#"{"a":[{"b":[]}]}"#, 3), Some(11));
        assert_eq!(too_deep_at(nested(100).as_bytes(), 100), None);
        assert_eq!(too_deep_at(nested(101).as_bytes(), 100), Some(100));
        // Siblings do not add up.
        let wide = format!("[{}]", vec![nested(99); 1000].join(","));
        assert_eq!(too_deep_at(wide.as_bytes(), 100), None);
    }

    #[test]
    fn brackets_in_strings_do_not_count() {
        assert_eq!(too_deep_at(br#"["[[[[", "{{{{"]"#, 1), None);
        assert_eq!(too_deep_at(br#"["\"[[[", "\\", ["x"]]"#, 1), Some(16));
        assert_eq!(too_deep_at(br#"["\\\"[[["]"#, 1), None);
        assert_eq!(too_deep_at(br#"{"k\"[": [1]}"#, 1), Some(9));
        // Escapes on each side of where the scan of a long string changes pace.
        for pad in 10..24 {
            let text = format!(
                r#"["{}\"[[[ {} \\", [1]]"#,
                "x".repeat(pad),
                "y".repeat(pad)
            );
            let inner = text.rfind("[1]").unwrap();
            assert_eq!(too_deep_at(text.as_bytes(), 1), Some(inner), "{text}");
            assert_eq!(too_deep_at(text.as_bytes(), 2), None, "{text}");
        }
    }

    #[test]
    fn broken_text_ends_the_scan_without_panicking() {
        assert_eq!(too_deep_at(b"\"unterminated [[[", 0), None);
        assert_eq!(too_deep_at(b"\"ends in a backslash\\", 0), None);
        assert_eq!(too_deep_at(b"]]]][", 1), None);
        assert_eq!(too_deep_at(b"]]]][[", 1), Some(5));
    }
}
