//! `tojson` as Hugging Face's chat templates expect it: Python's `json.dumps` with transformers'
//! defaults (`ensure_ascii=False`) and its keyword arguments (`indent`, `separators`, `sort_keys`,
//! `ensure_ascii`). minijinja's own `tojson` writes compact JSON with HTML escapes, which changes
//! the prompt a model was trained on.

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Error, ErrorKind};

/// How deep a value may nest before `tojson` refuses it (templates are untrusted).
const MAX_DEPTH: usize = 128;

struct Style {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

pub fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.kind() {
            ValueKind::Number => Some(" ".repeat(i64::try_from(v.clone()).unwrap_or(0).clamp(0, 64) as usize)),
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: indent must be a number or a string")),
        },
    };
    // Python's defaults: ", " and ": ", or "," and ": " once there is an indent.
    let (item_sep, key_sep) = match separators.filter(|s| !s.is_none() && !s.is_undefined()) {
        Some(s) => {
            let parts: Vec<Value> = s.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] => (a.as_str().unwrap_or(",").to_string(), b.as_str().unwrap_or(":").to_string()),
                _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be two strings")),
            }
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let style = Style {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    write(&mut out, value, &style, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write(out: &mut String, v: &Value, style: &Style, depth: usize) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(Error::new(ErrorKind::InvalidOperation, "tojson: the value nests too deeply"));
    }
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(out, v),
        ValueKind::String | ValueKind::Bytes => write_string(out, v.as_str().unwrap_or_default(), style.ensure_ascii),
        // Python's json.dumps refuses a generator (what `map` and `select` return in jinja2).
        ValueKind::Iterable => {
            return Err(Error::new(ErrorKind::InvalidOperation, "Object of type generator is not JSON serializable"));
        }
        ValueKind::Seq | ValueKind::Plain => {
            let items: Vec<Value> = v.try_iter()?.collect();
            write_container(out, '[', ']', items.len(), style, depth, |out, i| {
                write(out, &items[i], style, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if style.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            write_container(out, '{', '}', keys.len(), style, depth, |out, i| {
                let key = &keys[i];
                match key.as_str() {
                    Some(k) => write_string(out, k, style.ensure_ascii),
                    // Python writes numbers and booleans as keys in quotes.
                    None => write_string(out, &key.to_string(), style.ensure_ascii),
                }
                out.push_str(&style.key_sep);
                let item = v.get_item(key)?;
                write(out, &item, style, depth + 1)
            })?;
        }
        _ => write_string(out, &v.to_string(), style.ensure_ascii),
    }
    Ok(())
}

fn write_container(
    out: &mut String,
    open: char,
    close: char,
    len: usize,
    style: &Style,
    depth: usize,
    mut item: impl FnMut(&mut String, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..len {
        // Shared values can repeat exponentially (a list holding itself twice, thirty times over).
        if out.len() > super::MAX_RENDERED_BYTES {
            return Err(Error::new(ErrorKind::InvalidOperation, "tojson: the value is larger than a prompt may be"));
        }
        if i > 0 {
            out.push_str(&style.item_sep);
        }
        if let Some(indent) = &style.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        item(out, i)?;
    }
    if let Some(indent) = &style.indent {
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// Numbers as Python prints them: integers as they are, floats with a decimal point or exponent.
fn write_number(out: &mut String, v: &Value) {
    if v.is_integer() {
        out.push_str(&v.to_string());
        return;
    }
    match f64::try_from(v.clone()) {
        Ok(f) if f.is_nan() => out.push_str("NaN"),
        Ok(f) if f.is_infinite() => out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" }),
        Ok(f) => out.push_str(&python_float(f)),
        Err(_) => out.push_str(&v.to_string()),
    }
}

/// Python's `repr(float)`: the shortest round-trip digits, `1.0` not `1`, exponents past 1e16.
pub(super) fn python_float(f: f64) -> String {
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Rust's `{:e}` gives `1e20`, Python `1e+20`.
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        return format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    let s = format!("{f}");
    if s.contains('.') { s } else { format!("{s}.0") }
}

fn write_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && !c.is_ascii() => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::Environment;

    fn render(src: &str, ctx: serde_json::Value) -> String {
        let mut env = Environment::new();
        env.add_filter("tojson", tojson);
        env.render_str(src, ctx).unwrap()
    }

    #[test]
    fn writes_what_pythons_json_dumps_writes() {
        let ctx = serde_json::json!({"x": {"b": 1, "a": [1.5, "é\n", null, true], "c": 1e20, "d": 2.0}});
        assert_eq!(
            render("{{ x|tojson }}", ctx.clone()),
            r#"{"b": 1, "a": [1.5, "é\n", null, true], "c": 1e+20, "d": 2.0}"#
        );
        assert_eq!(
            render("{{ x|tojson(indent=2) }}", ctx.clone()),
            "{\n  \"b\": 1,\n  \"a\": [\n    1.5,\n    \"é\\n\",\n    null,\n    true\n  ],\n  \"c\": 1e+20,\n  \"d\": 2.0\n}"
        );
        assert_eq!(
            render("{{ x|tojson(separators=(',', ':'), sort_keys=true) }}", ctx.clone()),
            r#"{"a":[1.5,"é\n",null,true],"b":1,"c":1e+20,"d":2.0}"#
        );
        assert_eq!(render("{{ x.a[1]|tojson(ensure_ascii=true) }}", ctx), r#""\u00e9\n""#);
        assert_eq!(render("{{ {}|tojson }}{{ []|tojson(indent=4) }}", serde_json::json!({})), "{}[]");
    }
}
