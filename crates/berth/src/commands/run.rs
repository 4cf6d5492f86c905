use std::io::{BufRead, IsTerminal, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use berth_engine::request::{Param, RequestDraft};
use berth_engine::template::Message;
use berth_engine::{Engine, FinishReason, GenerationOutput};

use super::Context;

#[derive(clap::Args)]
pub struct Args {
    /// A local model (e.g. ai/smollm2) or a path to a .gguf file.
    model: String,
    /// The prompt; without one, berth reads standard input, or chats when it is a terminal.
    prompt: Vec<String>,
    /// Sampling temperature, 0 to 2 (0: always the most likely token).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Most tokens per answer (default: up to the context size).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// A system message to start the conversation with.
    #[arg(long)]
    system: Option<String>,
    /// Worker threads (default: the physical cores available).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// Print load time and tokens per second to standard error.
    #[arg(long)]
    verbose: bool,
    /// Continue the prompt as plain text instead of answering it as a chat message.
    #[arg(long, conflicts_with = "system")]
    raw: bool,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    if let Some(n) = args.threads {
        berth_engine::set_threads(n.into())?;
    }
    let loaded = Instant::now();
    let engine = super::load_engine(ctx, &args.model)?;
    if args.verbose {
        eprintln!("loaded {} in {:.2} s", args.model, loaded.elapsed().as_secs_f64());
    }
    let draft = RequestDraft {
        temperature: Some(Param::new("--temperature", args.temperature.into())),
        seed: args.seed.map(|s| Param::new("--seed", s as f64)),
        max_tokens: args.max_tokens.map(|n| Param::new("--max-tokens", n as f64)),
        ..RequestDraft::default()
    };
    // The options are checked once, before any prompt (a one-token stand-in) is read.
    berth_engine::request::validate(&draft, vec![0], &engine.request_limits())?;
    let chat = Chat { engine: &engine, draft, verbose: args.verbose, raw: args.raw };
    let system = args.system.as_deref().map(|s| Message::new("system", s));

    let prompt = if !args.prompt.is_empty() {
        Some(args.prompt.join(" "))
    } else if !std::io::stdin().is_terminal() {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("reading the prompt from standard input")?;
        Some(text)
    } else {
        None
    };
    match prompt {
        Some(p) => {
            let mut messages: Vec<Message> = system.into_iter().collect();
            messages.push(Message::new("user", p.trim_end()));
            chat.answer(&messages, &AtomicBool::new(false))?;
            Ok(())
        }
        None => chat.interactive(system),
    }
}

struct Chat<'e> {
    engine: &'e Engine,
    draft: RequestDraft,
    verbose: bool,
    raw: bool,
}

impl Chat<'_> {
    /// Stream one answer to standard output; `stop` ends it early.
    fn answer(&self, messages: &[Message], stop: &AtomicBool) -> anyhow::Result<GenerationOutput> {
        let prompt = match (self.raw, messages.last()) {
            (true, Some(last)) => self.engine.text_prompt(&last.content)?,
            _ => self.engine.chat_prompt(messages)?,
        };
        let req = berth_engine::request::validate(&self.draft, prompt, &self.engine.request_limits())?;
        let mut stdout = std::io::stdout().lock();
        let out = self.engine.generate(&req, &mut |ev| {
            // A closed stdout (a pipe into `head`) ends the answer, not the program with a panic.
            let written = stdout.write_all(ev.text.as_bytes()).and_then(|_| stdout.flush()).is_ok();
            written && !stop.load(Ordering::SeqCst)
        })?;
        let _ = writeln!(stdout);
        if self.verbose {
            let rate = |n: usize, d: std::time::Duration| n as f64 / d.as_secs_f64().max(1e-9);
            eprintln!(
                "prompt: {} tokens in {:.2} s ({:.1} tokens/s); answer: {} tokens in {:.2} s ({:.1} tokens/s)",
                out.prompt_tokens,
                out.prefill_time.as_secs_f64(),
                rate(out.prompt_tokens, out.prefill_time),
                out.tokens.len(),
                out.decode_time.as_secs_f64(),
                rate(out.tokens.len(), out.decode_time)
            );
        }
        Ok(out)
    }

    fn interactive(&self, system: Option<Message>) -> anyhow::Result<()> {
        // Ctrl-C stops the answer being written, not the program.
        let interrupted = Arc::new(AtomicBool::new(false));
        let flag = interrupted.clone();
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("installing the Ctrl-C handler")?;
        let mut history: Vec<Message> = Vec::new();
        let stdin = std::io::stdin();
        let mut line = String::new();
        eprintln!("Chatting with the model. /clear forgets the conversation, /bye (or Ctrl-D) quits.");
        loop {
            print!(">>> ");
            std::io::stdout().flush()?;
            line.clear();
            interrupted.store(false, Ordering::SeqCst);
            if stdin.lock().read_line(&mut line)? == 0 {
                println!();
                return Ok(());
            }
            let input = line.trim();
            match input {
                "" => continue,
                "/bye" => return Ok(()),
                "/clear" => {
                    history.clear();
                    println!("Cleared the conversation.");
                    continue;
                }
                "/?" | "/help" => {
                    println!("/clear  forget the conversation\n/bye    quit");
                    continue;
                }
                cmd if cmd.starts_with('/') => {
                    println!("Unknown command {cmd}; /? lists the commands.");
                    continue;
                }
                _ => {}
            }
            history.push(Message::new("user", input));
            let mut messages: Vec<Message> = system.iter().cloned().collect();
            messages.extend(history.iter().cloned());
            match self.answer(&messages, &interrupted) {
                Ok(out) => {
                    if out.finish == FinishReason::Cancelled {
                        println!("(stopped)");
                    }
                    history.push(Message::new("assistant", &out.text));
                }
                Err(e) => {
                    // A turn that fails (the conversation outgrew the context) does not end the chat.
                    history.pop();
                    eprintln!("berth: {e:#}");
                }
            }
        }
    }
}
