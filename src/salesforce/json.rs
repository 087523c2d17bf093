//! Byte-level JSON helpers: find where a string or value ends and escape a string for output.
//! The scanner and the OAuth rewriter need spans (to resume on the next chunk, or to splice one
//! value and leave every other byte as it was), which `serde_json` does not give; everything
//! that only needs a typed value parses with `serde_json` instead.

/// Offset just past the JSON whitespace starting at `i`.
pub(super) fn skip_ws(buf: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = buf.get(i) {
        i += 1;
    }
    i
}

/// Offset of the quote closing the string whose opening quote is at `open`, or `None` if the
/// buffer ends first. Escapes are skipped, not decoded.
pub(super) fn string_end(buf: &[u8], open: usize) -> Option<usize> {
    let mut i = open + 1;
    loop {
        let at = i + memchr::memchr2(b'"', b'\\', buf.get(i..)?)?;
        if buf[at] == b'"' {
            return Some(at);
        }
        // A backslash escapes exactly the next byte; `\uXXXX` digits need no special care.
        i = at + 2;
    }
}

/// Offset just past the JSON value starting at `i`. Meant for input already known to be valid
/// JSON (it does not validate); `None` if the buffer ends inside the value.
pub(super) fn value_end(buf: &[u8], i: usize) -> Option<usize> {
    match buf.get(i)? {
        b'"' => string_end(buf, i).map(|end| end + 1),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match buf.get(j)? {
                    b'"' => j = string_end(buf, j)?,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            // A number or literal: runs to the next delimiter.
            let len = buf[i..]
                .iter()
                .position(|&b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(buf.len() - i);
            Some(i + len)
        }
    }
}

/// Appends `text` to `out` as a quoted JSON string.
pub(super) fn push_string(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for &b in text.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b if b < 0x20 => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
            // Every other byte, multi-byte UTF-8 included, is allowed verbatim in a JSON string.
            b => out.push(b),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_end_skips_escapes() {
        let s = br#""a\"b\\" rest"#;
        assert_eq!(string_end(s, 0), Some(7));
        assert_eq!(string_end(br#""unterminated"#, 0), None);
        assert_eq!(string_end(br#""ends in \"#, 0), None);
    }

    #[test]
    fn value_end_handles_nesting_and_strings() {
        let s = br#"{"a":[1,"]}",{"b":2}]} ,"#;
        assert_eq!(value_end(s, 0), Some(22));
        assert_eq!(value_end(b"123,", 0), Some(3));
        assert_eq!(value_end(b"true", 0), Some(4));
        assert_eq!(value_end(b"[1,2", 0), None);
    }

    #[test]
    fn push_string_round_trips_through_serde() {
        let text = "q\"uote\\ new\nline\t\u{1}\u{1f} é ☃";
        let mut out = Vec::new();
        push_string(&mut out, text);
        let back: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, text);
    }
}
