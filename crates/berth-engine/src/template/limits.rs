//! What a chat template may be before minijinja sees it. minijinja's parser bounds the nesting of
//! statements, but not an expression's: `x|f|f|f…` or `not not not…` with thousands of parts
//! becomes an equally deep syntax tree that compiling, evaluating and dropping walk recursively,
//! overflowing any stack. Real templates' tags have a few dozen parts; a tag is refused past
//! [`MAX_TAG_PARTS`], which keeps every tree shallow enough for the renderer's stack.

/// The largest template source (bytes).
pub const MAX_SOURCE_BYTES: usize = 1 << 20;
/// The most parts (names, literals, operators, brackets) one `{{ }}` or `{% %}` tag may hold.
pub const MAX_TAG_PARTS: usize = 1000;

/// Refuse a template too large, or with a tag too complex, to compile safely.
pub fn check(source: &str) -> Result<(), String> {
    if source.len() > MAX_SOURCE_BYTES {
        return Err(format!("the template is {} bytes; berth accepts at most {MAX_SOURCE_BYTES}", source.len()));
    }
    let b = source.as_bytes();
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] != b'{' {
            i += 1;
            continue;
        }
        match b[i + 1] {
            b'#' => i = find(b, i + 2, b"#}").map_or(b.len(), |end| end + 2),
            b'{' | b'%' => {
                let close: &[u8] = if b[i + 1] == b'{' { b"}}" } else { b"%}" };
                let start = i;
                let (end, parts) = scan_tag(b, i + 2, close);
                if parts > MAX_TAG_PARTS {
                    let line = 1 + b[..start].iter().filter(|&&c| c == b'\n').count();
                    return Err(format!(
                        "the tag on line {line} has more than {MAX_TAG_PARTS} parts (names, operators, filters); berth refuses expressions that deep"
                    ));
                }
                i = end;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

fn find(b: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    b.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|p| from + p)
}

/// Count a tag's parts from `i` (just past its opening) to its `close`; returns where scanning
/// stopped (after the close, or the end) and the count.
fn scan_tag(b: &[u8], mut i: usize, close: &[u8]) -> (usize, usize) {
    let mut parts = 0;
    while i < b.len() {
        let c = b[i];
        if b[i..].starts_with(close) {
            return (i + close.len(), parts);
        }
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        parts += 1;
        if c == b'"' || c == b'\'' {
            i += 1;
            while i < b.len() && b[i] != c {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80) {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    (b.len(), parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_tags_pass_and_deep_ones_do_not() {
        check("{%- if message.role == 'user' or (m.x|length > 2 and not loop.first) -%}{{ '}}' ~ x }}{% endif %}")
            .unwrap();
        let filters = format!("{{{{ x{} }}}}", "|trim".repeat(MAX_TAG_PARTS));
        assert!(check(&filters).unwrap_err().contains("line 1"));
        let nots = format!("a\n{{% if {}x %}}{{% endif %}}", "not ".repeat(MAX_TAG_PARTS + 1));
        assert!(check(&nots).unwrap_err().contains("line 2"));
        // Parts inside strings and comments do not count.
        check(&format!("{{{{ '{}' }}}}{{# {} #}}", "|x".repeat(5000), "|x".repeat(5000))).unwrap();
        assert!(check(&" ".repeat(MAX_SOURCE_BYTES + 1)).is_err());
    }
}
