use std::path::{Path, PathBuf};

use anyhow::Context as _;

use berth_store::package::{self, GgufPackage};

use super::{Context, parse_ref};
use crate::progress;

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["gguf", "safetensors_dir"]))]
pub struct Args {
    /// The GGUF model file.
    #[arg(long, value_name = "FILE")]
    gguf: Option<PathBuf>,
    /// A folder with config.json, tokenizer.json and *.safetensors files.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["licenses", "chat_template", "context_size"])]
    safetensors_dir: Option<PathBuf>,
    /// A license file to include (repeatable).
    #[arg(long = "license", short = 'l', value_name = "FILE")]
    licenses: Vec<PathBuf>,
    /// A Jinja chat template that overrides the one in the GGUF file.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// The context size to record in the model config (default: the model's trained context).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    context_size: Option<u64>,
    /// The reference to store it under, e.g. myorg/smollm2:135m-q4_1.
    reference: String,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let reference = parse_ref(&args.reference)?;
    let store = ctx.store()?;
    let bar = progress::for_terminal();
    let digest = if let Some(gguf) = args.gguf {
        vet_template(&gguf, args.chat_template.as_deref())?;
        let pkg = GgufPackage {
            gguf,
            licenses: args.licenses,
            chat_template: args.chat_template,
            context_size: args.context_size,
            ..Default::default()
        };
        package::package_gguf(&store, &pkg, &reference, bar.as_ref())?
    } else if let Some(dir) = args.safetensors_dir {
        package::package_safetensors(&store, &dir, &reference, bar.as_ref())?
    } else {
        unreachable!("clap requires --gguf or --safetensors-dir")
    };
    println!("Packaged {} ({digest})", reference.familiar());
    Ok(())
}

/// A chat template is code every server of the model will run: refuse, before anything is stored,
/// one that does not compile or cannot render a plain conversation within berth's limits.
fn vet_template(gguf: &Path, override_file: Option<&Path>) -> anyhow::Result<()> {
    let (source, origin) = match override_file {
        Some(path) => {
            let len = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
            if len > berth_engine::template::MAX_SOURCE_BYTES as u64 {
                anyhow::bail!(
                    "{} is {len} bytes; a chat template may have at most {}",
                    path.display(),
                    berth_engine::template::MAX_SOURCE_BYTES
                );
            }
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?;
            (text, path.display().to_string())
        }
        None => match berth_engine::chat_template_of(gguf)? {
            Some(text) => (text, format!("the chat template in {}", gguf.display())),
            None => return Ok(()),
        },
    };
    berth_engine::template::vet(&source)
        .with_context(|| format!("{origin} cannot be used: fix the template or give another with --chat-template"))
}
