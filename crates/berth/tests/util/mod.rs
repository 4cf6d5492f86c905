//! Runs the real `berth` binary in a fresh `BERTH_HOME` and fails loudly, with everything needed to
//! debug: the command, its home folder's listing, the exit status, stdout and stderr.

#![allow(dead_code)]

pub mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Berth {
    home: tempfile::TempDir,
    envs: Vec<(String, String)>,
}

impl Berth {
    pub fn new() -> Berth {
        Berth { home: tempfile::tempdir().expect("temp BERTH_HOME"), envs: Vec::new() }
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    pub fn env(mut self, key: &str, value: &str) -> Berth {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
        cmd.args(args)
            .env("BERTH_HOME", self.home.path())
            // An empty Docker config: tests never see the developer's credentials.
            .env("DOCKER_CONFIG", self.home.path().join("no-docker-config"))
            .env_remove("BERTH_INSECURE_REGISTRIES");
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running the berth binary")
    }

    /// Run, require success, return stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        if !out.status.success() {
            panic!("{}", self.report(args, &out, "expected success"));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run, require failure, return stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        if out.status.success() {
            panic!("{}", self.report(args, &out, "expected failure"));
        }
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "{}", self.report(args, &out, "berth panicked"));
        stderr
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let stdout = self.ok(args);
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("berth {args:?} printed invalid JSON ({e}):\n{stdout}"))
    }

    fn report(&self, args: &[&str], out: &Output, what: &str) -> String {
        format!(
            "{what}: berth {}\nBERTH_HOME={}\nfiles:\n{}\nstatus: {}\n--- stdout\n{}\n--- stderr\n{}",
            args.join(" "),
            self.home.path().display(),
            listing(self.home.path()),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Every file under the home folder with its size.
    pub fn files(&self) -> Vec<(PathBuf, u64)> {
        walk(self.home.path())
    }
}

fn walk(root: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p, e.metadata().map(|m| m.len()).unwrap_or(0)));
            }
        }
    }
    out.sort();
    out
}

fn listing(root: &Path) -> String {
    walk(root)
        .into_iter()
        .map(|(p, len)| format!("  {} ({len} bytes)", p.strip_prefix(root).unwrap_or(&p).display()))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(path).expect("open file to hash");
    std::io::copy(&mut f, &mut h).expect("hash file");
    hex::encode(h.finalize())
}
