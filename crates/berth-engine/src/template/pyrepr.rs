//! Values printed as Python prints them, since chat templates were written for jinja2:
//! `{{ tool }}` or `{{ tool|string }}` of a dict gives `{'type': 'function', ...}`, `{{ none }}`
//! gives `None`, `{{ true }}` gives `True`. minijinja would print JSON-like text and lowercase.

use minijinja::value::{Value, ValueKind};

/// How deep a value may nest before printing stops descending (templates are untrusted).
const MAX_DEPTH: usize = 128;

/// `str(value)`.
pub fn python_str(v: &Value) -> String {
    match v.kind() {
        ValueKind::String => v.as_str().unwrap_or_default().to_string(),
        ValueKind::Undefined => String::new(),
        _ => python_repr(v, 0),
    }
}

/// `repr(value)`.
fn python_repr(v: &Value, depth: usize) -> String {
    if depth > MAX_DEPTH {
        return "...".to_string();
    }
    match v.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".to_string(),
        ValueKind::Bool => if v.is_true() { "True" } else { "False" }.to_string(),
        ValueKind::Number if v.is_integer() => v.to_string(),
        ValueKind::Number => match f64::try_from(v.clone()) {
            Ok(f) if f.is_nan() => "nan".to_string(),
            Ok(f) if f.is_infinite() => if f > 0.0 { "inf" } else { "-inf" }.to_string(),
            Ok(f) => super::tojson::python_float(f),
            Err(_) => v.to_string(),
        },
        ValueKind::String => repr_str(v.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<String> =
                v.try_iter().map(|it| it.map(|x| python_repr(&x, depth + 1)).collect()).unwrap_or_default();
            format!("[{}]", items.join(", "))
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter().map(|it| it.collect()).unwrap_or_default();
            let items: Vec<String> = keys
                .iter()
                .map(|k| {
                    let item = v.get_item(k).unwrap_or_default();
                    format!("{}: {}", python_repr(k, depth + 1), python_repr(&item, depth + 1))
                })
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        _ => v.to_string(),
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
}
