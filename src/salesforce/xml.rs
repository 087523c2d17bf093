//! A minimal XML tag tokenizer over byte slices, shared by everything in this module that reads
//! SOAP: the request inspection in `classify`, the response scanner, login rewriting and log
//! redaction. It finds tags and their spans, nothing more: no entity decoding, no namespace
//! resolution (callers match on the local name, so `<limitInfo>` and `<ns:limitInfo>` are the
//! same), no validation. That is enough for the handful of well-known elements we look at, and it
//! works on a prefix of a document, which a full parser would reject.

/// What kind of markup a tag is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TagKind {
    /// `<name ...>`
    Start,
    /// `<name .../>`
    SelfClosing,
    /// `</name>`
    End,
    /// A comment, CDATA section, processing instruction or declaration: skipped by every caller.
    Other,
}

/// One tag found in a buffer.
#[derive(Clone, Copy, Debug)]
pub(super) struct Tag<'a> {
    pub kind: TagKind,
    /// The qualified name as written, prefix included (empty for `TagKind::Other`).
    pub name: &'a [u8],
    /// Offset of the `<`.
    pub start: usize,
    /// Offset just past the closing `>`.
    pub end: usize,
}

impl<'a> Tag<'a> {
    /// The name without its namespace prefix.
    pub fn local_name(&self) -> &'a [u8] {
        local_name(self.name)
    }
}

/// The outcome of looking for the next tag.
#[derive(Clone, Copy, Debug)]
pub(super) enum Step<'a> {
    /// A complete tag.
    Tag(Tag<'a>),
    /// A tag starts at this offset but its end is not in the buffer (yet).
    Incomplete(usize),
    /// No `<` at or after the starting offset.
    NoMore,
}

/// Markup whose content may hold `<` and `>` freely, with its opener and closer.
const RAW_MARKUP: [(&[u8], &[u8]); 3] = [(b"<!--", b"-->"), (b"<![CDATA[", b"]]>"), (b"<?", b"?>")];

/// Finds the next tag at or after `from`.
///
/// Text never contains a raw `<` in well-formed XML (it is escaped as `&lt;`), and neither do
/// attribute values, so the next `<` always starts markup; only comments, CDATA and processing
/// instructions need their own terminator, and quoted attribute values may hold a `>`.
pub(super) fn next_tag(buf: &[u8], from: usize) -> Step<'_> {
    let Some(tail) = buf.get(from..) else {
        return Step::NoMore;
    };
    let Some(offset) = memchr::memchr(b'<', tail) else {
        return Step::NoMore;
    };
    let start = from + offset;
    let rest = &buf[start..];

    for (open, close) in RAW_MARKUP {
        if rest.starts_with(open) {
            return match memchr::memmem::find(&rest[open.len()..], close) {
                Some(at) => Step::Tag(Tag {
                    kind: TagKind::Other,
                    name: &[],
                    start,
                    end: start + open.len() + at + close.len(),
                }),
                None => Step::Incomplete(start),
            };
        }
        if rest.len() < open.len() && open.starts_with(rest) {
            // Too few bytes to tell `<!--` from `<!DOCTYPE` or `<?` from an element.
            return Step::Incomplete(start);
        }
    }

    let (kind, name_start) = match rest.get(1) {
        Some(b'/') => (TagKind::End, 2),
        Some(b'!') => (TagKind::Other, 2),
        _ => (TagKind::Start, 1),
    };
    let name_len = rest[name_start..]
        .iter()
        .position(|&b| b.is_ascii_whitespace() || b == b'/' || b == b'>')
        .unwrap_or(rest.len() - name_start);
    let Some(close) = find_tag_end(rest, name_start + name_len) else {
        return Step::Incomplete(start);
    };
    let name = &rest[name_start..name_start + name_len];
    let kind = match kind {
        TagKind::Start if name.is_empty() => TagKind::Other,
        TagKind::Start if close > 0 && rest[close - 1] == b'/' => TagKind::SelfClosing,
        other => other,
    };
    Step::Tag(Tag {
        kind,
        name: if kind == TagKind::Other { &[] } else { name },
        start,
        end: start + close + 1,
    })
}

/// Offset of the `>` closing a tag, skipping quoted attribute values.
fn find_tag_end(rest: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < rest.len() {
        match rest[i] {
            b'>' => return Some(i),
            quote @ (b'"' | b'\'') => {
                let len = memchr::memchr(quote, &rest[i + 1..])?;
                i += len + 2;
            }
            _ => i += 1,
        }
    }
    None
}

/// The part of a qualified name after its last `:`.
pub(super) fn local_name(name: &[u8]) -> &[u8] {
    match memchr::memrchr(b':', name) {
        Some(colon) => &name[colon + 1..],
        None => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(buf: &[u8]) -> Vec<(TagKind, String)> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Step::Tag(tag) = next_tag(buf, at) {
            out.push((tag.kind, String::from_utf8_lossy(tag.name).into_owned()));
            at = tag.end;
        }
        out
    }

    #[test]
    fn finds_start_end_self_closing_and_skips_markup() {
        let doc =
            br#"<?xml version="1.0"?><!-- <a> --><s:E a='x>y' b="1"><![CDATA[<b>]]><c/></s:E>"#;
        assert_eq!(
            tags(doc),
            vec![
                (TagKind::Other, String::new()),
                (TagKind::Other, String::new()),
                (TagKind::Start, "s:E".to_owned()),
                (TagKind::Other, String::new()),
                (TagKind::SelfClosing, "c".to_owned()),
                (TagKind::End, "s:E".to_owned()),
            ]
        );
    }

    #[test]
    fn reports_incomplete_tags_and_prefixes_of_markup() {
        for partial in [
            &b"<"[..],
            b"<!",
            b"<!-",
            b"<!-- x",
            b"<a b='>",
            b"<ns:limitIn",
        ] {
            assert!(
                matches!(next_tag(partial, 0), Step::Incomplete(0)),
                "{partial:?}"
            );
        }
        assert!(matches!(next_tag(b"text only", 0), Step::NoMore));
        assert!(matches!(next_tag(b"<a>", 10), Step::NoMore));
    }

    #[test]
    fn local_name_strips_prefix() {
        assert_eq!(local_name(b"ns:limitInfo"), b"limitInfo");
        assert_eq!(local_name(b"limitInfo"), b"limitInfo");
        assert_eq!(local_name(b"a:b:c"), b"c");
    }
}
