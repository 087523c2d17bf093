//! Positions and key paths: a byte offset of the file mapped back to a line and column, and to
//! the key path (`integration[2].org`) that serde's errors do not name.

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::*;

/// 1-based line and column (in characters) of a byte offset; offsets past the end or inside a
/// multi-byte character are clamped rather than trusted.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

/// toml's messages sometimes span lines; a config error is one line so it greps well.
pub(super) fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

pub(super) enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// The path of the deepest key whose key or value covers byte `pos`.
pub(super) fn key_path_at(tree: &DeTable<'_>, pos: usize) -> Option<String> {
    let mut path = Vec::new();
    find_in_table(tree, pos, &mut path).then(|| render_path(tree, &path))
}

pub(super) fn find_in_table<'a>(
    table: &'a DeTable<'_>,
    pos: usize,
    path: &mut Vec<Segment<'a>>,
) -> bool {
    for (key, value) in table.iter() {
        path.push(Segment::Key(key.get_ref().as_ref()));
        if key.span().contains(&pos) || find_in_value(value, pos, path) {
            return true;
        }
        path.pop();
    }
    false
}

pub(super) fn find_in_value<'a>(
    value: &'a Spanned<DeValue<'_>>,
    pos: usize,
    path: &mut Vec<Segment<'a>>,
) -> bool {
    // Children first: a dotted key's implicit table has no useful span of its own.
    let found_inside = match value.get_ref() {
        DeValue::Table(table) => find_in_table(table, pos, path),
        DeValue::Array(items) => items.iter().enumerate().any(|(i, item)| {
            path.push(Segment::Index(i));
            let found = find_in_value(item, pos, path);
            if !found {
                path.pop();
            }
            found
        }),
        _ => false,
    };
    found_inside || value.span().contains(&pos)
}

/// Renders `org[0].threshold` as `org "acme".threshold` when that org has a valid id, matching
/// the paths `validate` produces; other arrays keep their index.
pub(super) fn render_path(tree: &DeTable<'_>, path: &[Segment<'_>]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < path.len() {
        match &path[i] {
            Segment::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let org_id = match (i, *key, path.get(1)) {
                    (0, "org", Some(Segment::Index(n))) => org_id_at(tree, *n),
                    _ => None,
                };
                if let Some(id) = org_id {
                    out.push_str(&format!("org {id:?}"));
                    i += 2;
                    continue;
                }
                let bare = !key.is_empty()
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
                if bare {
                    out.push_str(key);
                } else {
                    out.push_str(&format!("{key:?}"));
                }
            }
            Segment::Index(n) => out.push_str(&format!("[{n}]")),
        }
        i += 1;
    }
    out
}

pub(super) fn org_id_at<'a>(tree: &'a DeTable<'_>, index: usize) -> Option<&'a str> {
    let orgs = tree.get("org")?.get_ref().as_array()?;
    let org = orgs.get(index)?.get_ref().as_table()?;
    let id = org.get("id")?.get_ref().as_str()?;
    check_id(id).ok().map(|_| id)
}
