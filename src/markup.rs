//! Escaping text for XML and HTML: the SOAP faults the proxy writes, the threshold emails and
//! the status page all put untrusted text (org ids, messages, Salesforce's answers) in markup.

/// Appends `text` to `out` escaped for element content or a quoted attribute, in XML and in
/// HTML alike (`'` becomes `&#39;`, which both read).
///
/// Characters XML 1.0 cannot carry at all (most C0 controls) become U+FFFD rather than producing
/// a document every SOAP client would reject.
pub fn push_escaped(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if c < ' ' || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
}

/// `text` escaped as [`push_escaped`] does.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    push_escaped(&mut out, text);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_drops_invalid_chars() {
        assert_eq!(
            escape("a<b>&\"'\u{1}\tz"),
            "a&lt;b&gt;&amp;&quot;&#39;\u{FFFD}\tz"
        );
    }
}
