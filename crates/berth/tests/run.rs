//! `berth run` end to end through the real binary: one-shot prompts, piped input, and the
//! interactive chat through a real pseudo-terminal (Ctrl-C included).

mod util;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_testkit::models;
use util::Berth;

fn model() -> String {
    models::smollm2_gguf().display().to_string()
}

#[test]
fn answers_a_prompt_from_the_store_and_from_a_file() {
    let b = Berth::new();
    b.ok(&["package", "--gguf", &model(), "smollm2"]);
    let from_store =
        b.ok(&["run", "smollm2", "What is the capital of France?", "--temperature", "0", "--max-tokens", "12"]);
    let from_file =
        b.ok(&["run", &model(), "What is the capital of France?", "--temperature", "0", "--max-tokens", "12"]);
    assert_eq!(from_store, from_file);
    assert!(from_store.trim().len() > 10, "{from_store:?}");

    let out = b.run(&["run", "smollm2", "Hello", "--max-tokens", "4", "--seed", "3", "--verbose", "--threads", "1"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tokens/s") && stderr.contains("loaded"), "{stderr}");
}

#[test]
fn reads_the_prompt_from_a_pipe_and_honours_the_system_message() {
    let b = Berth::new();
    let mut child = b
        .command(&["run", &model(), "--temperature", "0", "--max-tokens", "16", "--system", "You are a pirate."])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Say hello.").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
}

#[test]
fn bad_models_and_options_are_clear_errors() {
    let b = Berth::new();
    let err = b.fails(&["run", "ai/not-here", "hi"]);
    assert!(err.contains("not in the local store"), "{err}");
    let err = b.fails(&["run", &model(), "hi", "--temperature=-1"]);
    assert!(err.contains("temperature"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("fake.gguf");
    std::fs::write(&fake, b"GGUF\x03\x00\x00\x00").unwrap();
    let err = b.fails(&["run", &fake.display().to_string(), "hi"]);
    assert!(err.contains("not a usable GGUF file"), "{err}");
}

/// A child on a pseudo-terminal, its output collected in the background.
struct Pty {
    master: std::fs::File,
    output: Arc<Mutex<Vec<u8>>>,
    child: std::process::Child,
}

impl Pty {
    fn spawn(mut cmd: std::process::Command) -> Pty {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two fds into the integers we pass.
        let rc =
            unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
        assert_eq!(rc, 0, "openpty failed");
        // SAFETY: both fds were just opened for us and are owned from here on.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let slave_fd = slave.as_raw_fd();
        cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                libc::setsid();
                libc::ioctl(slave_fd, libc::TIOCSCTTY, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn on a pty");
        let master = std::fs::File::from(master);
        let mut reader = master.try_clone().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Pty { master, output, child }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    fn send(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).unwrap();
    }

    /// Wait until the output contains `needle` `count` times.
    fn wait_for(&self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.text().matches(needle).count() < count {
            assert!(
                Instant::now() < deadline,
                "waited {timeout:?} for {needle:?} x{count}; screen so far:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn chats_interactively_on_a_terminal() {
    let b = Berth::new();
    let mut cmd = b.command(&["run", &model(), "--temperature", "0", "--max-tokens", "400"]);
    cmd.env("TERM", "dumb");
    let mut pty = Pty::spawn(cmd);
    pty.wait_for(">>> ", 1, Duration::from_secs(30));
    pty.send(b"My name is Ada. Please remember it.\r");
    pty.wait_for(">>> ", 2, Duration::from_secs(120));

    // Ctrl-C stops the answer being written, and the chat goes on.
    pty.send(b"Write a very long essay about the history of the Roman Empire.\r");
    std::thread::sleep(Duration::from_millis(1500));
    pty.send(b"\x03");
    pty.wait_for("(stopped)", 1, Duration::from_secs(30));
    pty.wait_for(">>> ", 3, Duration::from_secs(30));

    pty.send(b"/clear\r");
    pty.wait_for("Cleared the conversation.", 1, Duration::from_secs(10));
    pty.send(b"/bye\r");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = pty.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}; screen:\n{}", pty.text());
            break;
        }
        assert!(Instant::now() < deadline, "berth did not exit after /bye; screen:\n{}", pty.text());
        std::thread::sleep(Duration::from_millis(50));
    }
}
