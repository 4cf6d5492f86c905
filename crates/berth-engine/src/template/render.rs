//! The minijinja side: an environment set up the way Hugging Face renders chat templates
//! (`trim_blocks`, `lstrip_blocks`, the Python string methods, `raise_exception`,
//! `strftime_now`), with fuel bounding the work and a cap on the output. Runs wherever
//! [`super::sandbox`] says: in a worker process, or on a thread of this one.

use std::io::Write;

use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior, Value, context};
use serde::{Deserialize, Serialize};

use super::strftime::strftime_now;

/// The largest rendered prompt (bytes).
pub const MAX_RENDERED_BYTES: usize = 4 << 20;
/// Template instructions one rendering may execute.
const FUEL: u64 = 5_000_000;
/// The stack templates are compiled and rendered on: deep enough for any tag that passed
/// [`super::limits::check`], whatever thread asked.
pub const STACK_BYTES: usize = 64 << 20;

/// One thing to do with a template.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
    /// `None`: only compile (a syntax check).
    pub render: Option<RenderInput>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenderInput {
    /// Messages as the template sees them: `role` and `content`, and whatever else a message of
    /// its API carries (`tool_calls`, `name`, `tool_call_id`, `reasoning_content`, ...).
    pub messages: Vec<serde_json::Value>,
    pub add_generation_prompt: bool,
    /// More variables for the template (`tools`, `enable_thinking`, ...).
    #[serde(default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Templates compiled so far (a worker keeps the few its server uses, so a request renders
/// without compiling again).
#[derive(Default)]
pub struct Renderer {
    /// Most recently used last.
    compiled: Vec<(String, Environment<'static>)>,
}

/// Compiled templates a [`Renderer`] keeps.
const KEPT_TEMPLATES: usize = 8;

impl Renderer {
    /// Compile the job's template (unless kept from before) and, if asked, render it. Errors are
    /// the text a user is shown.
    pub fn run(&mut self, job: &Job) -> Result<String, String> {
        let env = self.environment(&job.source)?;
        let Some(input) = &job.render else { return Ok(String::new()) };
        let template = env.get_template("chat").map_err(describe)?;
        let ctx = context! {
            messages => &input.messages,
            add_generation_prompt => input.add_generation_prompt,
            bos_token => &job.bos_token,
            eos_token => &job.eos_token,
            ..Value::from_serialize(&input.extra)
        };
        let mut out = CappedWriter { buf: Vec::new() };
        template.render_captured_to(ctx, &mut out).map_err(describe)?;
        String::from_utf8(out.buf).map_err(|_| "the rendered prompt is not UTF-8".to_string())
    }

    fn environment(&mut self, source: &str) -> Result<&Environment<'static>, String> {
        match self.compiled.iter().position(|(s, _)| s == source) {
            Some(i) => {
                let hit = self.compiled.remove(i);
                self.compiled.push(hit);
            }
            None => {
                let env = environment(source)?;
                if self.compiled.len() == KEPT_TEMPLATES {
                    self.compiled.remove(0);
                }
                self.compiled.push((source.to_string(), env));
            }
        }
        Ok(&self.compiled.last().expect("pushed just above").1)
    }
}

/// Run `job` on a thread of this process with the renderer's stack.
pub fn run_on_own_stack(job: &Job) -> Result<String, String> {
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("berth-template".into())
            .stack_size(STACK_BYTES)
            .spawn_scoped(s, || Renderer::default().run(job))
            .map_err(|e| format!("cannot start the template thread: {e}"))?;
        handle.join().unwrap_or_else(|_| Err("the template renderer failed".to_string()))
    })
}

fn environment(source: &str) -> Result<Environment<'static>, String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // As jinja2's default (what transformers uses): an undefined value prints as nothing.
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_fuel(Some(FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, format!("the template raised: {msg}")))
    });
    env.add_function("strftime_now", |fmt: String| -> Result<Value, Error> { Ok(Value::from(strftime_now(&fmt))) });
    env.add_filter("tojson", super::tojson::tojson);
    // jinja2's undefined has a length of 0 (`tools|length` without tools).
    env.add_filter("length", length);
    env.add_filter("count", length);
    env.add_filter("indent", indent);
    env.add_filter("string", |v: &Value| super::pyrepr::python_str(v));
    env.set_formatter(|out, _state, value| {
        let text = super::pyrepr::python_str(value);
        std::fmt::Write::write_str(out, &text)
            .map_err(|_| Error::new(ErrorKind::WriteFailure, "cannot write the prompt"))
    });
    env.add_template_owned("chat", without_generation_tags(source)).map_err(describe)?;
    Ok(env)
}

/// jinja2's `indent`, trailing newline and all (minijinja's drops it, which joins lines that
/// Command R's template keeps apart).
fn indent(
    s: String,
    width: Option<Value>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: minijinja::value::Kwargs,
) -> Result<String, Error> {
    let width = match kwargs.get::<Option<Value>>("width")? {
        Some(w) => Some(w),
        None => width,
    };
    let first = kwargs.get::<Option<bool>>("first")?.or(first);
    let blank = kwargs.get::<Option<bool>>("blank")?.or(blank);
    kwargs.assert_all_used()?;
    let indention = match &width {
        Some(w) if w.as_str().is_some() => w.as_str().unwrap_or_default().to_string(),
        Some(w) => " ".repeat(usize::try_from(w.clone()).unwrap_or(4).min(256)),
        None => "    ".to_string(),
    };
    let text = format!("{s}\n");
    let lines: Vec<&str> = python_splitlines(&text);
    let mut rv = if blank.unwrap_or(false) {
        lines.join(&format!("\n{indention}"))
    } else {
        let mut rv = lines.first().copied().unwrap_or_default().to_string();
        for line in lines.iter().skip(1) {
            rv.push('\n');
            if !line.is_empty() {
                rv.push_str(&indention);
            }
            rv.push_str(line);
        }
        rv
    };
    if first.unwrap_or(false) {
        rv.insert_str(0, &indention);
    }
    Ok(rv)
}

/// Python's `str.splitlines()` for the line breaks templates meet (`\n`, `\r\n`, `\r`).
fn python_splitlines(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\n' => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            b'\r' => {
                out.push(&s[start..i]);
                if b.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

fn length(v: &Value) -> Result<usize, Error> {
    if v.is_undefined() {
        return Ok(0);
    }
    v.len().ok_or_else(|| {
        Error::new(ErrorKind::InvalidOperation, format!("cannot calculate length of value of type {}", v.kind()))
    })
}

/// transformers' `{% generation %}…{% endgeneration %}` marks the assistant's part for training
/// and renders its body: written as an `if true` block, which keeps the tags' whitespace control.
fn without_generation_tags(source: &str) -> String {
    if !source.contains("generation") {
        return source.to_string();
    }
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let Some(len) = rest[open..].find("%}") else { break };
        let tag = &rest[open + 2..open + len];
        let inner = tag.trim_start_matches(['-', '+']).trim_end_matches(['-', '+']).trim();
        let replacement = match inner {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        out.push_str(&rest[..open]);
        match replacement {
            Some(r) => {
                let start = &tag[..tag.len() - tag.trim_start_matches(['-', '+']).len()];
                let end = &tag[tag.trim_end_matches(['-', '+']).len()..];
                out.push_str(&format!("{{%{start} {r} {end}%}}"));
            }
            None => out.push_str(&rest[open..open + len + 2]),
        }
        rest = &rest[open + len + 2..];
    }
    out.push_str(rest);
    out
}

/// The error and its causes on one line.
fn describe(e: Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    msg
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
