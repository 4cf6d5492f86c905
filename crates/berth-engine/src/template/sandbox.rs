//! Where templates run. A chat template is code from a registry, and minijinja bounds its
//! instructions (fuel) and its output but not the size of the values it builds in between: a
//! loop that doubles a string reaches gigabytes in thirty steps. No in-process check can stop
//! that allocation, so a program that serves models (the berth binary) renders templates in
//! worker processes of its own, each with a memory limit and a deadline; a template that blows
//! either kills only its worker, and the request gets an error. Idle workers are kept for the
//! next request (a render costs a pipe round trip, not a process start).
//!
//! Without workers (a library user, the engine's own tests) templates render on a thread of
//! this process with a known stack, after the same checks of their source.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use super::render::{self, Job, MAX_RENDERED_BYTES};

/// Memory a worker may use (its data segment, heap and thread stacks).
pub const WORKER_MEMORY_BYTES: u64 = 512 << 20;
/// How long one template may take.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// The largest job sent to a worker (bytes): a template and messages larger than this cannot
/// render within the output cap anyway.
const MAX_JOB_BYTES: usize = 32 << 20;
/// Workers rendering at once; more callers wait for one.
const MAX_WORKERS: usize = 8;
/// Workers kept alive while idle.
const MAX_IDLE: usize = 4;

static POOL: OnceLock<Pool> = OnceLock::new();

/// From now on, render templates in worker processes started as `program args…`, which must
/// call [`worker_main`]. The berth binary calls this at start with itself and its hidden worker
/// command. A second call keeps the first's settings.
pub fn use_worker_processes(program: PathBuf, args: Vec<String>) {
    let _ = POOL.set(Pool { program, args, idle: Mutex::new(Vec::new()), busy: Mutex::new(0), freed: Condvar::new() });
}

/// Run a job where templates run: in a worker if [`use_worker_processes`] was called, else on a
/// thread of this process.
pub(super) fn run(job: &Job) -> Result<String, String> {
    match POOL.get() {
        Some(pool) => pool.run(job),
        None => render::run_on_own_stack(job),
    }
}

struct Pool {
    program: PathBuf,
    args: Vec<String>,
    idle: Mutex<Vec<Worker>>,
    busy: Mutex<usize>,
    freed: Condvar,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    stderr: ChildStderr,
}

impl Pool {
    fn run(&self, job: &Job) -> Result<String, String> {
        let request = serde_json::to_vec(job).map_err(|e| format!("cannot encode the template job: {e}"))?;
        if request.len() > MAX_JOB_BYTES {
            return Err(format!("the template and messages exceed {MAX_JOB_BYTES} bytes"));
        }
        let _slot = self.take_slot();
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut worker = match idle {
            Some(w) => w,
            None => self.spawn()?,
        };
        let reply = exchange(&mut worker, &request)?;
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(worker);
        } else {
            drop(idle);
            end(worker);
        }
        reply
    }

    fn spawn(&self) -> Result<Worker, String> {
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start a template worker: {e}"))?;
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("cannot talk to the template worker".into());
        };
        Ok(Worker { child, stdin, stdout, stderr })
    }

    /// Wait until fewer than [`MAX_WORKERS`] jobs run; the slot is given back when dropped.
    fn take_slot(&self) -> Slot<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        while *busy >= MAX_WORKERS {
            busy = self.freed.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        *busy += 1;
        Slot(self)
    }
}

struct Slot<'a>(&'a Pool);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.busy.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.0.freed.notify_one();
    }
}

/// Send one job and read its reply, killing the worker if it takes past [`DEADLINE`]. A reply is
/// the template's own outcome (an error in it leaves the worker usable); an error means the
/// worker is gone, and says why.
fn exchange(worker: &mut Worker, request: &[u8]) -> Result<Result<String, String>, String> {
    let pid = worker.child.id();
    let (done, deadline) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if deadline.recv_timeout(DEADLINE) == Err(RecvTimeoutError::Timeout) {
            // The child is not yet reaped, so its pid cannot have been reused.
            // SAFETY: kill(2) with a valid signal number has no memory-safety preconditions.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            return true;
        }
        false
    });
    let talked = write_frame(&mut worker.stdin, request).and_then(|()| read_frame(&mut worker.stdout));
    drop(done);
    let timed_out = watchdog.join().unwrap_or(false);
    match talked {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(reply) => Ok(reply),
            Err(_) => Err(bury(worker, false)),
        },
        Err(_) => Err(bury(worker, timed_out)),
    }
}

/// Kill a failed worker and say why it failed, from what it printed before dying.
fn bury(worker: &mut Worker, timed_out: bool) -> String {
    let _ = worker.child.kill();
    let _ = worker.child.wait();
    let mut said = String::new();
    let _ = (&mut worker.stderr).take(4096).read_to_string(&mut said);
    if timed_out {
        format!("rendering the chat template took longer than {} s", DEADLINE.as_secs())
    } else if said.contains("memory allocation") {
        format!("the chat template needed more than {} MiB of memory", WORKER_MEMORY_BYTES >> 20)
    } else if said.contains("overflow") {
        "the chat template nests too deeply".to_string()
    } else {
        "the chat template could not be rendered (its worker failed)".to_string()
    }
}

fn end(mut worker: Worker) {
    drop(worker.stdin);
    let _ = worker.child.kill();
    let _ = worker.child.wait();
}

fn write_frame(w: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| std::io::Error::other("frame too large"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(bytes)?;
    w.flush()
}

fn read_frame(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_JOB_BYTES.max(MAX_RENDERED_BYTES * 2) {
        return Err(std::io::Error::other("frame too large"));
    }
    let mut buf = vec![0; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// A template worker's life: limit its own memory, then answer jobs from stdin on stdout until
/// stdin closes. Returns the process's exit code.
pub fn worker_main() -> i32 {
    let limit =
        libc::rlimit { rlim_cur: WORKER_MEMORY_BYTES as libc::rlim_t, rlim_max: WORKER_MEMORY_BYTES as libc::rlim_t };
    // SAFETY: setrlimit reads the struct it is given and nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_DATA, &limit) } != 0 {
        eprintln!("berth template worker: cannot limit its memory: {}", std::io::Error::last_os_error());
        return 1;
    }
    let serve = || {
        let (mut input, mut output) = (std::io::stdin().lock(), std::io::stdout().lock());
        let mut renderer = render::Renderer::default();
        while let Ok(frame) = read_frame(&mut input) {
            let reply = match serde_json::from_slice::<Job>(&frame) {
                Ok(job) => renderer.run(&job),
                Err(e) => Err(format!("malformed template job: {e}")),
            };
            let Ok(bytes) = serde_json::to_vec(&reply) else { return 1 };
            if write_frame(&mut output, &bytes).is_err() {
                return 1;
            }
        }
        0
    };
    match std::thread::Builder::new().name("berth-template".into()).stack_size(render::STACK_BYTES).spawn(serve) {
        Ok(handle) => handle.join().unwrap_or(1),
        Err(e) => {
            eprintln!("berth template worker: cannot start: {e}");
            1
        }
    }
}
