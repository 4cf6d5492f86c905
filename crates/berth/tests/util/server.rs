//! A `berth serve` of the real binary on a free port, and the small HTTP helpers its tests share.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_testkit::models;
use berth_testkit::registry::http_request;

use super::Berth;

pub struct Server {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
    pub berth: Berth,
}

impl Server {
    /// Package SmolLM2 into a fresh home and serve it.
    pub fn start() -> Server {
        Self::start_with(&[])
    }

    /// The same, with more `berth serve` options.
    pub fn start_with(options: &[&str]) -> Server {
        Self::start_in(Berth::new(), options)
    }

    /// The same, in a home the caller made (with its own environment).
    pub fn start_in(berth: Berth, options: &[&str]) -> Server {
        berth.ok(&["package", "--gguf", &models::smollm2_gguf().display().to_string(), "smollm2"]);
        berth.ok(&["package", "--safetensors-dir", &models::minilm_dir().display().to_string(), "minilm"]);
        Self::serve(berth, &[&["--model", "smollm2"][..], options].concat())
    }

    /// `berth serve` on a home the caller prepared, with these options.
    pub fn serve(berth: Berth, options: &[&str]) -> Server {
        Self::serve_on(berth, berth_testkit::free_port(), options)
    }

    /// `berth serve` on a home the caller prepared, on this port.
    pub fn serve_on(berth: Berth, port: u16, options: &[&str]) -> Server {
        let log = berth.home().join("server.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = berth
            .command(&[&["serve", "--port", &port.to_string()][..], options].concat())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start berth serve");
        let mut server = Server { child, port, log, berth };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http_request(port, "GET", "/ready", &[], b"") {
                break;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("berth serve exited with {status}; log:\n{}", server.log());
            }
            assert!(Instant::now() < deadline, "berth serve was not ready within 60 s; log:\n{}", server.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn post(&self, path: &str, body: &str) -> (u16, String) {
        let (status, raw) =
            http_request(self.port, "POST", path, &[("Content-Type", "application/json")], body.as_bytes())
                .expect("request");
        (status, body_of(&raw))
    }

    pub fn metric(&self, name: &str) -> u64 {
        self.metric_f64(name) as u64
    }

    /// A metric's value; a series the server does not expose fails the test (so that a renamed
    /// metric cannot pass for a zero). `name` may end inside the labels
    /// (`berth:x{model_name="m"`): the first series with those labels first.
    pub fn metric_f64(&self, name: &str) -> f64 {
        let (_, raw) = http_request(self.port, "GET", "/metrics", &[], b"").expect("metrics");
        let text = body_of(&raw);
        let value = text
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{', ',']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok());
        value.unwrap_or_else(|| panic!("the server exposes no series {name}; /metrics:\n{text}"))
    }

    pub fn wait_for_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "berth serve did not exit; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server process's peak resident memory (kB), from the kernel.
    pub fn peak_rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn body_of(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("BERTH_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        venv.exists(),
        "the Python clients for the API tests are missing: run .ci/run, or `python3 -m venv .venv && .venv/bin/pip install openai ollama` at the repository root (or set BERTH_TEST_PYTHON)"
    );
    venv
}

pub fn run_python(script: &str, args: &[&str], server: &Server) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python").join(script);
    let out = Command::new(python()).arg(&path).args(args).output().expect("run python");
    assert!(
        out.status.success(),
        "{script} failed ({}):\n--- stdout\n{}\n--- stderr\n{}\n--- server log\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    // The scripts' summaries (counts, timings), shown with --nocapture.
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
}

/// Send a completion request on its own connection (closed by the server when the answer ends).
pub fn send_completion(port: u16, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    s
}

/// Read a streamed answer until `events` text events have arrived; returns what was read.
pub fn read_events(s: &mut TcpStream, events: usize) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen).matches(r#""text""#).count() < events {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "the stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    seen
}

/// Read what is left of a response until the server closes the connection.
pub fn read_rest(s: &mut TcpStream, seen: &mut Vec<u8>) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// A completion on its own connection: status, the raw response (headers and body).
pub fn stream_completion(port: u16, body: &str) -> (u16, String) {
    let mut s = send_completion(port, body);
    let mut raw = Vec::new();
    read_rest(&mut s, &mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}
