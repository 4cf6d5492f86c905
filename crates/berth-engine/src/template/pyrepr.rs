//! Values printed as Python prints them, since chat templates were written for jinja2:
//! `{{ tool }}` or `{{ tool|string }}` of a dict gives `{'type': 'function', ...}`, `{{ none }}`
//! gives `None`, `{{ true }}` gives `True`. minijinja would print JSON-like text and lowercase.

use minijinja::value::{Value, ValueKind};

/// How deep a value may nest before printing stops descending (templates are untrusted).
const MAX_DEPTH: usize = 128;

/// `str(value)`. Stops descending past [`MAX_DEPTH`], and stops writing once the text is longer
/// than a prompt may be (a list holding itself twice, thirty times over, would print 2^30 items;
/// the renderer's output cap then refuses the result).
pub fn python_str(v: &Value) -> String {
    match v.kind() {
        ValueKind::String => v.as_str().unwrap_or_default().to_string(),
        ValueKind::Undefined => String::new(),
        _ => {
            let mut out = String::new();
            python_repr(&mut out, v, 0);
            out
        }
    }
}

/// `repr(value)`, appended to `out`.
fn python_repr(out: &mut String, v: &Value, depth: usize) {
    if out.len() > super::MAX_RENDERED_BYTES {
        return;
    }
    if depth > MAX_DEPTH {
        out.push_str("...");
        return;
    }
    match v.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
        ValueKind::Number => match f64::try_from(v.clone()) {
            Ok(f) if f.is_nan() => out.push_str("nan"),
            Ok(f) if f.is_infinite() => out.push_str(if f > 0.0 { "inf" } else { "-inf" }),
            Ok(f) => out.push_str(&super::tojson::python_float(f)),
            Err(_) => out.push_str(&v.to_string()),
        },
        ValueKind::String => out.push_str(&repr_str(v.as_str().unwrap_or_default())),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            if let Ok(items) = v.try_iter() {
                for (i, item) in items.enumerate() {
                    if out.len() > super::MAX_RENDERED_BYTES {
                        return;
                    }
                    if i > 0 {
                        out.push_str(", ");
                    }
                    python_repr(out, &item, depth + 1);
                }
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(keys) = v.try_iter() {
                for (i, key) in keys.enumerate() {
                    if out.len() > super::MAX_RENDERED_BYTES {
                        return;
                    }
                    if i > 0 {
                        out.push_str(", ");
                    }
                    python_repr(out, &key, depth + 1);
                    out.push_str(": ");
                    python_repr(out, &v.get_item(&key).unwrap_or_default(), depth + 1);
                }
            }
            out.push('}');
        }
        _ => out.push_str(&v.to_string()),
    }
}

/// Python's `repr(str)`: single quotes unless the text holds one and no double quote.
fn repr_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_like_python() {
        let v = Value::from_serialize(serde_json::json!({"a": [1, 2.5, true, null, "it's"], "b": "x\ny"}));
        assert_eq!(python_str(&v), r#"{'a': [1, 2.5, True, None, "it's"], 'b': 'x\ny'}"#);
        assert_eq!(python_str(&Value::from("plain")), "plain");
        assert_eq!(python_str(&Value::from(())), "None");
    }

    #[test]
    fn stops_at_the_prompt_limit() {
        let mut v = Value::from(vec![Value::from("x")]);
        for _ in 0..40 {
            v = Value::from(vec![v.clone(), v]);
        }
        let text = python_str(&v);
        assert!(text.len() <= crate::template::MAX_RENDERED_BYTES + 1024, "{}", text.len());
    }
}
