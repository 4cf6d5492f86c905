//! A real PostgreSQL server (Debian's `postgresql`) on a free loopback port, its cluster in a
//! temporary folder, with a password-protected user: what berth's shared accounts are tested
//! against. Stopped when dropped.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Postgres {
    child: Child,
    pub port: u16,
    password: String,
    bin: PathBuf,
    /// The user and group the server runs as (PostgreSQL refuses to run as root).
    ids: Option<(u32, u32)>,
    dir: tempfile::TempDir,
}

/// The folder of PostgreSQL's server programs: `BERTH_TEST_POSTGRES_BIN`, or the newest of
/// Debian's `/usr/lib/postgresql/*/bin`.
fn bin_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("BERTH_TEST_POSTGRES_BIN") {
        return PathBuf::from(p);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "the PostgreSQL server the shared-accounts tests use is missing: `apt-get install postgresql` \
             (scripts/install-test-deps does), or set BERTH_TEST_POSTGRES_BIN"
        )
    })
}

/// A user id of `name` from /etc/passwd.
fn uid_of(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&name) && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))?
    })
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// One of PostgreSQL's programs, run as `ids` (user, group) when given, from the cluster's folder.
fn program(bin: &Path, name: &str, ids: Option<(u32, u32)>, dir: &Path) -> Command {
    let mut cmd = Command::new(bin.join(name));
    if let Some((uid, gid)) = ids {
        cmd.uid(uid).gid(gid).current_dir(dir);
    }
    cmd
}

impl Postgres {
    /// Make a cluster with user `berth` (password required) and start it on loopback.
    pub fn start() -> Postgres {
        let bin = bin_dir();
        let dir = tempfile::tempdir().expect("temp dir for PostgreSQL");
        // As root, the cluster belongs to the `postgres` user (or nobody), as Debian's does.
        let ids = running_as_root().then(|| uid_of("postgres").or_else(|| uid_of("nobody")).unwrap_or((65534, 65534)));
        let password = format!("pw-{}", crate::free_port());
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, &password).expect("write the password file");
        if let Some((uid, gid)) = ids {
            for path in [dir.path(), &pwfile] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown the PostgreSQL folder");
            }
        }
        let data = dir.path().join("data").display().to_string();
        let out = program(&bin, "initdb", ids, dir.path())
            .args(["-D", &data, "-U", "berth", "--auth=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C"])
            .args(["--pwfile", &pwfile.display().to_string()])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = crate::free_port();
        let log = std::fs::File::create(dir.path().join("postgres.log")).expect("PostgreSQL log");
        let child = program(&bin, "postgres", ids, dir.path())
            .args(["-D", &data, "-p", &port.to_string(), "-k", &dir.path().display().to_string()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=50"])
            // Tests need no safety against power loss; a killed process still loses nothing.
            .args(["-c", "fsync=off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        let mut postgres = Postgres { child, port, password, bin, ids, dir };
        postgres.wait_ready();
        postgres
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("postgres exited with {status} before it was ready; log:\n{}", self.log());
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "postgres was not ready within 30 s; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The connection string of the cluster's `postgres` database, password included.
    pub fn url(&self) -> String {
        format!("postgres://berth:{}@127.0.0.1:{}/postgres", self.password, self.port)
    }

    /// The user's password, to check that no log or message shows it.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Run one SQL statement with `psql`; its output, trimmed (unaligned, tuples only).
    pub fn query(&self, sql: &str) -> String {
        let psql = ["/usr/bin/psql".into(), self.bin.join("psql")].into_iter().find(|p: &PathBuf| p.exists());
        let out = Command::new(psql.expect("psql (Debian's postgresql-client)"))
            .args([&self.url(), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("run psql");
        assert!(out.status.success(), "psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // A fast shutdown ends the server's backends with it (a SIGKILL would leave them running).
        let data = self.dir.path().join("data");
        let _ = program(&self.bin, "pg_ctl", self.ids, self.dir.path())
            .args(["stop", "-D", &data.display().to_string(), "-m", "fast", "-w", "-t", "10"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
