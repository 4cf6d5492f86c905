use berth_store::config::format_size;

use super::{Context, parse_ref};
use crate::table::Table;

#[derive(clap::Args)]
pub struct TagArgs {
    /// A local model.
    source: String,
    /// The new name.
    target: String,
}

#[derive(clap::Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct InspectArgs {
    /// A local model.
    reference: String,
    /// Print JSON: manifest digest, manifest, config.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct RmArgs {
    /// Local models to remove.
    #[arg(required = true)]
    references: Vec<String>,
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// Local models to check (every model when none is named).
    references: Vec<String>,
}

#[derive(clap::Args)]
pub struct PruneArgs {}

#[derive(clap::Args)]
pub struct DfArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn tag(ctx: &Context, args: TagArgs) -> anyhow::Result<()> {
    let source = parse_ref(&args.source)?;
    let target = parse_ref(&args.target)?;
    let digest = ctx.store()?.tag(&source, &target)?;
    println!("Tagged {} as {} ({digest})", source.familiar(), target.familiar());
    Ok(())
}

pub fn list(ctx: &Context, args: ListArgs) -> anyhow::Result<()> {
    let models = ctx.store()?.list()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&models)?);
        return Ok(());
    }
    let mut t = Table::new(["MODEL", "ID", "FORMAT", "ARCHITECTURE", "PARAMETERS", "QUANTIZATION", "SIZE", "CREATED"]);
    for m in models {
        t.row([
            m.reference,
            m.digest.short().to_string(),
            m.format,
            m.architecture,
            m.parameters,
            m.quantization,
            format_size(m.size),
            m.created.unwrap_or_default(),
        ]);
    }
    print!("{t}");
    Ok(())
}

pub fn inspect(ctx: &Context, args: InspectArgs) -> anyhow::Result<()> {
    let reference = parse_ref(&args.reference)?;
    let d = ctx.store()?.inspect(&reference)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(());
    }
    let c = &d.config.config;
    println!("Model:        {}", d.reference);
    println!("Digest:       {}", d.digest);
    println!("Format:       {}", c.format);
    println!("Architecture: {}", c.architecture);
    println!("Parameters:   {}", c.parameters);
    println!("Quantization: {}", c.quantization);
    println!("Size:         {}", c.size);
    if let Some(n) = c.context_size {
        println!("Context:      {n}");
    }
    if let Some(created) = &d.config.descriptor.created {
        println!("Created:      {created}");
    }
    println!("Layers:");
    for l in &d.manifest.layers {
        let name = l.file_path().unwrap_or("");
        println!("  {}  {:>10}  {}  {}", l.digest.short(), format_size(l.size), l.media_type, name);
    }
    Ok(())
}

pub fn rm(ctx: &Context, args: RmArgs) -> anyhow::Result<()> {
    let store = ctx.store()?;
    for r in &args.references {
        let reference = parse_ref(r)?;
        let (removed, gc) = store.remove(&reference)?;
        for name in removed {
            let shown = berth_store::Reference::parse(&name).map(|r| r.familiar()).unwrap_or(name);
            println!("Removed {shown}");
        }
        print_gc(&gc);
    }
    Ok(())
}

fn print_gc(gc: &berth_store::GcReport) {
    let files = gc.blobs_removed + gc.leftovers_removed;
    if files > 0 {
        println!("Freed {} in {files} files", format_size(gc.bytes_freed));
    }
}

/// Remove what no model uses: unreferenced blobs, leftovers of killed writers, and every partial
/// download (a later pull starts those again from zero).
pub fn prune(ctx: &Context, _args: PruneArgs) -> anyhow::Result<()> {
    let gc = ctx.store()?.gc_with(std::time::Duration::ZERO)?;
    print_gc(&gc);
    if gc.blobs_removed + gc.leftovers_removed == 0 {
        println!("Nothing to remove");
    }
    Ok(())
}

/// Hash every blob of the named models (or all) and say which are missing or damaged.
pub fn verify(ctx: &Context, args: VerifyArgs) -> anyhow::Result<()> {
    let store = ctx.store()?;
    let references = if args.references.is_empty() {
        store.list()?.into_iter().map(|m| m.reference).collect()
    } else {
        args.references
    };
    if references.is_empty() {
        println!("No models to verify");
    }
    let mut bad = Vec::new();
    for r in &references {
        let reference = parse_ref(r)?;
        let checks = store.verify(&reference)?;
        let broken: Vec<_> = checks.iter().filter(|c| c.state != "ok").collect();
        if broken.is_empty() {
            println!("{}: {} blobs verified", reference.familiar(), checks.len());
        }
        for c in broken {
            println!("{}: blob {} ({}) is {}", reference.familiar(), c.digest.short(), format_size(c.size), c.state);
            bad.push(reference.familiar());
        }
    }
    if !bad.is_empty() {
        bad.dedup();
        anyhow::bail!(
            "{} damaged: pull {} again to repair (a pull fetches what is missing or damaged)",
            if bad.len() == 1 { "a model is" } else { "models are" },
            bad.join(", ")
        );
    }
    Ok(())
}

pub fn df(ctx: &Context, args: DfArgs) -> anyhow::Result<()> {
    let store = ctx.store()?;
    let du = store.disk_usage()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&du)?);
        return Ok(());
    }
    let mut t = Table::new(["WHAT", "COUNT", "SIZE"]);
    t.row(["models".to_string(), du.models.to_string(), String::new()]);
    t.row(["blobs".to_string(), du.blobs.to_string(), format_size(du.blob_bytes)]);
    t.row(["unreferenced".to_string(), String::new(), format_size(du.unreferenced_bytes)]);
    t.row(["partial downloads".to_string(), String::new(), format_size(du.partial_bytes)]);
    t.row(["temporary files".to_string(), String::new(), format_size(du.temporary_bytes)]);
    print!("{t}");
    println!("Store: {}", store.root().display());
    Ok(())
}
