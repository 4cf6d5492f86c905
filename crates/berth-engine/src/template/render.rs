//! The minijinja side: an environment set up the way Hugging Face renders chat templates
//! (`trim_blocks`, `lstrip_blocks`, the Python string methods, `raise_exception`,
//! `strftime_now`), with fuel bounding the work and a cap on the output. Runs wherever
//! [`super::sandbox`] says: in a worker process, or on a thread of this one.

use std::io::Write;

use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior, Value, context};
use serde::{Deserialize, Serialize};

use super::Message;
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
    pub messages: Vec<Message>,
    pub add_generation_prompt: bool,
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
    // Printing an undefined value is an error; testing one (`if tools`) is not.
    env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    env.set_fuel(Some(FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, format!("the template raised: {msg}")))
    });
    env.add_function("strftime_now", |fmt: String| -> Result<Value, Error> { Ok(Value::from(strftime_now(&fmt))) });
    env.add_template_owned("chat", source.to_string()).map_err(describe)?;
    Ok(env)
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
