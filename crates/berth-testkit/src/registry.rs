//! A real OCI registry (Debian's `docker-registry`, the CNCF distribution server) on a free loopback
//! port with its storage in a temporary folder. Killed when dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Registry {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

fn registry_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("BERTH_TEST_REGISTRY_BIN") {
        return PathBuf::from(p);
    }
    let default = PathBuf::from("/usr/bin/docker-registry");
    assert!(
        default.exists(),
        "the OCI registry used by the tests is missing: `apt-get install docker-registry` (.ci/run does), \
         or set BERTH_TEST_REGISTRY_BIN"
    );
    default
}

impl Registry {
    /// Start a registry with anonymous access.
    pub fn start() -> Registry {
        Self::start_with_auth(None)
    }

    /// Start a registry; with `htpasswd` (a bcrypt htpasswd file's contents) it requires basic auth.
    pub fn start_with_auth(htpasswd: Option<&str>) -> Registry {
        let dir = tempfile::tempdir().expect("temp dir for the registry");
        let port = crate::free_port();
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).expect("registry storage dir");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        if let Some(htpasswd) = htpasswd {
            let path = dir.path().join("htpasswd");
            std::fs::write(&path, htpasswd).expect("write htpasswd");
            config.push_str(&format!("auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n", path.display()));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("write registry config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("registry log");
        let child = Command::new(registry_binary())
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("starting docker-registry");
        let mut registry = Registry { child, port, dir };
        registry.wait_ready();
        registry
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("docker-registry exited with {status} before it was ready; log:\n{}", self.log());
            }
            if let Ok(status) = http_status(self.port, "GET", "/v2/")
                && (status == 200 || status == 401)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("docker-registry did not answer on port {} within 20 s; log:\n{}", self.port, self.log());
    }

    /// `127.0.0.1:PORT`, the registry part of a reference.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's storage root (`docker/registry/v2/...` lies below it).
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry keeps a blob's bytes, to damage them in tests.
    pub fn blob_data_path(&self, hex: &str) -> PathBuf {
        self.storage().join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request on loopback; returns the status code.
pub fn http_status(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    let (status, _) = http_request(port, method, path, &[], b"")?;
    Ok(status)
}

/// One HTTP/1.1 request on loopback with headers and a body; returns the status and the raw response.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    // Generous: a busy CI machine may take a while to answer a non-streamed generation.
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    // The caller's Host header, if it gives one, replaces the default.
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    // A server may answer (413) and close before a large body is fully sent: read its answer.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let head = String::from_utf8_lossy(&out[..out.len().min(64)]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))?;
    Ok((status, out))
}
