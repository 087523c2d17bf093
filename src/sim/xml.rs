//! Just enough XML reading for SOAP envelopes and Bulk API 1.0 job requests.
//!
//! The allowed crates include no XML parser, and the sim only needs element names, their depth
//! and the text of a few leaf elements. [`scan`] checks well-formedness (tags nest and close,
//! one root) and lists the start tags; namespaces are reduced to local names, which is how
//! Salesforce itself accepts any prefix. A DOCTYPE is refused, as Salesforce refuses it.

/// A start (or empty-element) tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tag<'a> {
    /// The name without its namespace prefix.
    pub(super) local: &'a str,
    /// 0 for the root element.
    pub(super) depth: usize,
    /// Byte offset just past the tag's `>`, where its text starts.
    pub(super) end: usize,
    /// `<x/>`: the element has no content.
    pub(super) empty: bool,
}

/// The start tags of a well-formed document, in document order.
pub(super) fn scan(xml: &str) -> Result<Vec<Tag<'_>>, String> {
    let mut tags = Vec::new();
    let mut open: Vec<&str> = Vec::new();
    let mut at = 0;
    while let Some(offset) = xml[at..].find('<') {
        let start = at + offset;
        let rest = &xml[start..];
        if open.is_empty() && !tags.is_empty() && !xml[at..start].trim().is_empty() {
            return Err("Content is not allowed after the root element".into());
        }
        let skip = |terminator: &str| {
            rest.find(terminator)
                .map(|end| start + end + terminator.len())
                .ok_or_else(|| format!("Unterminated {}", &rest[..rest.len().min(9)]))
        };
        if rest.starts_with("<?") {
            at = skip("?>")?;
            continue;
        }
        if rest.starts_with("<!--") {
            at = skip("-->")?;
            continue;
        }
        if rest.starts_with("<![CDATA[") {
            if open.is_empty() {
                return Err("CDATA outside the root element".into());
            }
            at = skip("]]>")?;
            continue;
        }
        if rest.starts_with("<!") {
            return Err("DOCTYPE is not allowed".into());
        }
        let close = tag_end(rest).ok_or("Unterminated tag")?;
        let inner = &rest[1..close];
        at = start + close + 1;
        if let Some(name) = inner.strip_prefix('/') {
            let name = name.trim_end();
            match open.pop() {
                Some(expected) if expected == name => continue,
                Some(expected) => {
                    return Err(format!(
                        "The element type \"{expected}\" must be terminated by the matching end-tag \"</{expected}>\""
                    ))
                }
                None => return Err(format!("Unexpected end tag </{name}>")),
            }
        }
        if open.is_empty() && !tags.is_empty() {
            return Err("Only one root element is allowed".into());
        }
        let (inner, empty) = match inner.strip_suffix('/') {
            Some(inner) => (inner, true),
            None => (inner, false),
        };
        let name = inner
            .split(|c: char| c.is_ascii_whitespace())
            .next()
            .unwrap_or("");
        if !valid_name(name) {
            return Err(format!("Invalid element name {name:?}"));
        }
        tags.push(Tag {
            local: name.rsplit(':').next().unwrap_or(name),
            depth: open.len(),
            end: at,
            empty,
        });
        if !empty {
            open.push(name);
        }
    }
    if !xml[at..].trim().is_empty() && open.is_empty() {
        return Err("Content is not allowed outside the root element".into());
    }
    if let Some(unclosed) = open.last() {
        return Err(format!("Premature end of file: <{unclosed}> is not closed"));
    }
    if tags.is_empty() {
        return Err("Premature end of file".into());
    }
    Ok(tags)
}

/// Index of the `>` closing the tag that starts `text`, skipping quoted attribute values.
fn tag_end(text: &str) -> Option<usize> {
    let mut quote = None;
    for (i, c) in text.char_indices().skip(1) {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => return Some(i),
            (None, '<') => return None,
            _ => {}
        }
    }
    None
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_alphabetic() || c == '_');
    first_ok
        && name.matches(':').count() <= 1
        && !name.ends_with(':')
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
}

/// The text directly inside `tag` (up to its first child or end), unescaped and trimmed.
pub(super) fn text<'a>(xml: &'a str, tag: &Tag<'a>) -> String {
    if tag.empty {
        return String::new();
    }
    let rest = &xml[tag.end..];
    let raw = &rest[..rest.find('<').unwrap_or(rest.len())];
    super::util::xml_unescape(raw.trim())
}

/// The text of the first element named `local` (any prefix), if there is one.
pub(super) fn first_text(xml: &str, tags: &[Tag<'_>], local: &str) -> Option<String> {
    tags.iter()
        .find(|tag| tag.local == local)
        .map(|tag| text(xml, tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_a_soap_envelope() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- a comment -->
<se:Envelope xmlns:se="http://schemas.xmlsoap.org/soap/envelope/" a='x>y'>
  <se:Header><DebuggingHeader/></se:Header>
  <se:Body><login xmlns="urn:partner.soap.sforce.com"><username>a&amp;b</username><password><![CDATA[p<w]]></password></login></se:Body>
</se:Envelope>"#;
        let tags = scan(xml).unwrap();
        let names: Vec<(&str, usize)> = tags.iter().map(|t| (t.local, t.depth)).collect();
        assert_eq!(
            names,
            vec![
                ("Envelope", 0),
                ("Header", 1),
                ("DebuggingHeader", 2),
                ("Body", 1),
                ("login", 2),
                ("username", 3),
                ("password", 3)
            ]
        );
        assert_eq!(first_text(xml, &tags, "username").as_deref(), Some("a&b"));
    }

    #[test]
    fn refuses_broken_documents() {
        for bad in [
            "",
            "just text",
            "<a>",
            "<a></b>",
            "</a>",
            "<a/><b/>",
            "<a><b></a></b>",
            "<a attr=\"unterminated></a>",
            "<!DOCTYPE x [<!ENTITY e \"boom\">]><a>&e;</a>",
            "<1a/>",
            "<a:/>",
            "<a/>trailing",
            "<a><!-- never closed </a>",
        ] {
            assert!(scan(bad).is_err(), "accepted {bad:?}");
        }
    }
}
