//! Chat templates from `tokenizer.chat_template` (or an artifact's template layer), rendered with
//! minijinja the way Hugging Face renders them (`trim_blocks`, `lstrip_blocks`), with the
//! Python string methods real templates call. Rendering is bounded: fuel caps the work, an output
//! cap the size, minijinja's own limit the recursion.

use std::fmt;
use std::io::Write;

use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior, Value, context};
use serde::Serialize;

use crate::error::EngineError;

/// The largest rendered prompt (bytes).
pub const MAX_RENDERED_BYTES: usize = 4 << 20;
/// Template instructions one rendering may execute.
const FUEL: u64 = 5_000_000;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: content.to_string() }
    }
}

/// A rendered prompt: its text and which byte ranges came from messages (to be tokenized as plain
/// text, never as special tokens).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedPrompt {
    pub text: String,
    pub content_spans: Vec<std::ops::Range<usize>>,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

fn template_error(e: Error) -> EngineError {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    EngineError::Template(msg)
}

impl ChatTemplate {
    /// Compile a template; syntax errors are reported here, not at the first request.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, EngineError> {
        if source.len() > 1 << 20 {
            return Err(EngineError::Template("the template is larger than 1 MiB".into()));
        }
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Printing an undefined value is an error; testing one (`if tools`) is not.
        env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, format!("the template raised: {msg}")))
        });
        env.add_function("strftime_now", |fmt: String| -> Result<Value, Error> { Ok(Value::from(strftime_now(&fmt))) });
        env.add_template_owned("chat", source.to_string()).map_err(template_error)?;
        Ok(Self { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// Render messages; with `add_generation_prompt`, the opening of the assistant's turn follows.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<RenderedPrompt, EngineError> {
        let template = self.env.get_template("chat").map_err(template_error)?;
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        let mut out = CappedWriter { buf: Vec::new() };
        template.render_captured_to(ctx, &mut out).map_err(template_error)?;
        let text = String::from_utf8(out.buf).map_err(|_| EngineError::Template("output is not UTF-8".into()))?;
        let content_spans = locate_contents(&text, messages);
        Ok(RenderedPrompt { text, content_spans })
    }
}

/// Find each message's content in the rendered text, in order. Templates that transform content
/// (trim it, cut it) may leave a content unfound; then its trimmed form is looked for.
fn locate_contents(text: &str, messages: &[Message]) -> Vec<std::ops::Range<usize>> {
    let mut spans = Vec::new();
    let mut from = 0;
    for m in messages {
        for candidate in [m.content.as_str(), m.content.trim()] {
            if candidate.is_empty() {
                break;
            }
            if let Some(i) = text[from..].find(candidate) {
                spans.push(from + i..from + i + candidate.len());
                from += i + candidate.len();
                break;
            }
        }
    }
    spans
}

struct CappedWriter {
    buf: Vec<u8>,
}

impl Write for CappedWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > MAX_RENDERED_BYTES {
            return Err(std::io::Error::other(format!("the rendered prompt exceeds {MAX_RENDERED_BYTES} bytes")));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `strftime` for the handful of directives chat templates use (Llama 3 prints today's date).
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    #[test]
    fn renders_and_locates_contents() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let r = t.render(&[Message::new("user", "hi <|im_start|>")], true).unwrap();
        assert_eq!(r.text, "<|im_start|>user\nhi <|im_start|><|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(&r.text[r.content_spans[0].clone()], "hi <|im_start|>");
    }

    #[test]
    fn python_string_methods_work() {
        let t =
            ChatTemplate::new("{{ messages[0].content.strip().upper() }}{{ 'x'.startswith('x') }}", "", "").unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  a b ")], false).unwrap().text,
            "A BTrue",
            "Python spelling of booleans"
        );
    }

    #[test]
    fn bad_templates_fail_clearly() {
        let e = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
        assert!(e.to_string().contains("chat template"), "{e}");
        let t = ChatTemplate::new("{{ nope }}", "", "").unwrap();
        assert!(t.render(&[], false).unwrap_err().to_string().contains("undefined"));
        let t = ChatTemplate::new("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "", "").unwrap();
        assert!(t.render(&[], false).is_err(), "runaway recursion is stopped");
        let t = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert!(t.render(&[], false).is_err(), "runaway loops are stopped");
        let t = ChatTemplate::new("{{ raise_exception('only user and assistant roles') }}", "", "").unwrap();
        assert!(t.render(&[], false).unwrap_err().to_string().contains("only user and assistant roles"));
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_785), (2026, 11, 28));
        assert!(!strftime_now("%d %b %Y").contains('%'));
    }
}
