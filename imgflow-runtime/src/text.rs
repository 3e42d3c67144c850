//! Quoting untrusted text in messages: an error quotes what it refuses,
//! but never more than a short excerpt of it, so a megabyte-long field is
//! not echoed back (or logged) whole.

/// The most characters of a value an error message quotes.
pub const EXCERPT_CHARS: usize = 48;

/// `text` quoted (as `{:?}` would), cut to its first [`EXCERPT_CHARS`]
/// characters, with its whole length noted when it was cut:
/// `"aaaa…" (33554432 bytes)`.
pub fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_CHARS) {
        None => format!("{text:?}"),
        Some((cut, _)) => {
            let quoted = format!("{:?}", &text[..cut]);
            format!("{}…\" ({} bytes)", &quoted[..quoted.len() - 1], text.len())
        }
    }
}

/// `message` cut to at most `max` bytes (at a character boundary, with
/// `…` at the end when cut): the last bound on what an answer says.
pub fn bounded(mut message: String, max: usize) -> String {
    if message.len() <= max {
        return message;
    }
    let mut cut = max.saturating_sub('…'.len_utf8());
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    message.truncate(cut);
    message.push('…');
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_quoted_whole() {
        assert_eq!(excerpt("blur"), "\"blur\"");
        assert_eq!(excerpt("a\"b"), "\"a\\\"b\"");
    }

    #[test]
    fn long_values_are_cut_with_their_length() {
        let long = "a".repeat(1 << 20);
        let quoted = excerpt(&long);
        assert!(quoted.len() < 100, "{quoted}");
        assert!(quoted.ends_with("…\" (1048576 bytes)"), "{quoted}");
        let wide = "é".repeat(100);
        assert!(excerpt(&wide).starts_with("\"éé"));
    }

    #[test]
    fn messages_are_bounded_at_a_character_boundary() {
        assert_eq!(bounded("short".into(), 10), "short");
        let cut = bounded("é".repeat(600), 512);
        assert!(cut.len() <= 512 && cut.ends_with('…'), "{}", cut.len());
    }
}
