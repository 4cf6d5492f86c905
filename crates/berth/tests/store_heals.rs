//! A store that heals, and pulls that add nothing when they fail: damaged blobs, manifests that
//! list a layer twice, configs that are not JSON, hostile templates from a registry, oversized or
//! endless manifests, and the leftovers of killed writers. All through the real binary and a real
//! registry (Debian's `docker-registry`).

mod util;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use berth_testkit::models;
use berth_testkit::registry::{Registry, http_request};
use util::{Berth, sha256_file};

fn blob_count(b: &Berth) -> usize {
    b.files().iter().filter(|(p, _)| p.to_string_lossy().contains("/blobs/sha256/")).count()
}

/// Files under a store folder (`incoming`, `tmp`).
fn files_in(b: &Berth, dir: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(b.home().join("models").join(dir))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Upload `bytes` as a blob of `repo` (an upload session, then one PUT); returns its digest.
fn upload_blob(registry: &Registry, repo: &str, bytes: &[u8]) -> String {
    let digest = format!("sha256:{}", hex_sha256(bytes));
    let (status, resp) = http_request(registry.port, "POST", &format!("/v2/{repo}/blobs/uploads/"), &[], b"").unwrap();
    let resp = String::from_utf8_lossy(&resp).to_string();
    assert_eq!(status, 202, "upload session: {resp}");
    let location = resp
        .lines()
        .find_map(|l| l.strip_prefix("Location: ").or_else(|| l.strip_prefix("location: ")))
        .expect("the registry names the upload's location")
        .trim()
        .to_string();
    let path = location.split_once("://").map_or(location.as_str(), |(_, rest)| &rest[rest.find('/').unwrap_or(0)..]);
    let sep = if path.contains('?') { '&' } else { '?' };
    let (status, resp) = http_request(
        registry.port,
        "PUT",
        &format!("{path}{sep}digest={digest}"),
        &[("Content-Type", "application/octet-stream")],
        bytes,
    )
    .unwrap();
    assert_eq!(status, 201, "upload: {}", String::from_utf8_lossy(&resp));
    digest
}

fn hex_sha256(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b");
    std::fs::write(&path, bytes).unwrap();
    sha256_file(&path)
}

/// Store `manifest` in the registry under `repo:tag`.
fn put_manifest(registry: &Registry, repo: &str, tag: &str, manifest: &serde_json::Value) {
    let body = serde_json::to_vec(manifest).unwrap();
    let (status, resp) = http_request(
        registry.port,
        "PUT",
        &format!("/v2/{repo}/manifests/{tag}"),
        &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
        &body,
    )
    .unwrap();
    assert_eq!(status, 201, "manifest {tag}: {}", String::from_utf8_lossy(&resp));
}

/// SmolLM2 packaged and pushed as `repo:v1`; returns the pusher and the manifest.
fn pushed_smollm2(registry: &Registry, repo: &str) -> (Berth, serde_json::Value) {
    let a = Berth::new();
    let reference = format!("{}/{repo}:v1", registry.host());
    a.ok(&["package", "--gguf", &models::smollm2_gguf().display().to_string(), &reference]);
    a.ok(&["push", &reference]);
    let manifest = a.json(&["inspect", "--json", &reference])["manifest"].clone();
    (a, manifest)
}

#[test]
fn a_damaged_blob_is_refused_at_load_reported_by_verify_and_repaired_by_pull() {
    let registry = Registry::start();
    let (_a, manifest) = pushed_smollm2(&registry, "heal/smollm2");
    let reference = format!("{}/heal/smollm2:v1", registry.host());
    let b = Berth::new();
    b.ok(&["pull", &reference]);
    b.ok(&["verify", &reference]);

    // Flip one byte in the middle of the weights: same size, so only a hash can tell.
    let weights = manifest["layers"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string();
    let blob = b.home().join("models/blobs/sha256").join(&weights);
    let mut bytes = std::fs::read(&blob).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&blob, &bytes).unwrap();

    let err = b.fails(&["run", &reference, "--max-tokens", "2", "Hi"]);
    assert!(err.contains("wrong content"), "run refuses the damaged weights: {err}");
    let report = b.run(&["verify", &reference]);
    let out = String::from_utf8_lossy(&report.stdout);
    let err = String::from_utf8_lossy(&report.stderr);
    assert!(!report.status.success(), "verify fails on a damaged model: {out}");
    assert!(out.contains(&weights[..12]) && out.contains("damaged"), "verify names the blob: {out}");
    assert!(err.contains("pull") && err.contains("again"), "verify says how to repair: {err}");

    let pulled = b.run(&["pull", &reference]);
    assert!(pulled.status.success(), "{}", String::from_utf8_lossy(&pulled.stderr));
    let said = format!("{}{}", String::from_utf8_lossy(&pulled.stdout), String::from_utf8_lossy(&pulled.stderr));
    assert!(said.contains("damaged"), "pull reports the damaged blob it fetched again: {said}");
    assert_eq!(sha256_file(&blob), weights, "pull repaired the blob");
    // verify stamps what it finds right: a store verified before it is shared read-only loads
    // without hashing again.
    let stamp = b.home().join("models/verified").join(&weights);
    let _ = std::fs::remove_file(&stamp);
    b.ok(&["verify", &reference]);
    assert!(stamp.is_file(), "verify stamps the blobs it found right");
    b.ok(&["run", &reference, "--max-tokens", "2", "Hi"]);
}

#[test]
fn a_manifest_listing_a_layer_twice_is_pulled_once() {
    let registry = Registry::start();
    let (_a, mut manifest) = pushed_smollm2(&registry, "heal/twice");
    let layer = manifest["layers"][0].clone();
    manifest["layers"].as_array_mut().unwrap().push(layer);
    put_manifest(&registry, "heal/twice", "twice", &manifest);

    let b = Berth::new();
    b.ok(&["pull", &format!("{}/heal/twice:twice", registry.host())]);
    // Config, weights and the manifest itself.
    assert_eq!(blob_count(&b), 3, "each blob once: {:?}", b.files());
    assert!(files_in(&b, "incoming").is_empty(), "nothing left in incoming/: {:?}", b.files());
    b.ok(&["verify", &format!("{}/heal/twice:twice", registry.host())]);
}

#[test]
fn a_config_that_is_not_json_fails_the_pull_and_adds_nothing() {
    let registry = Registry::start();
    let (_a, mut manifest) = pushed_smollm2(&registry, "heal/config");
    let config = b"{ this is not json";
    let digest = upload_blob(&registry, "heal/config", config);
    manifest["config"]["digest"] = serde_json::json!(digest);
    manifest["config"]["size"] = serde_json::json!(config.len());
    put_manifest(&registry, "heal/config", "bad", &manifest);

    let b = Berth::new();
    let err = b.fails(&["pull", &format!("{}/heal/config:bad", registry.host())]);
    assert!(err.contains("config") && err.contains("nothing was added"), "{err}");
    assert_eq!(blob_count(&b), 0, "no blob was published: {:?}", b.files());
    assert!(files_in(&b, "incoming").is_empty(), "a refused artifact leaves no partials: {:?}", b.files());
    assert!(b.json(&["list", "--json"]).as_array().unwrap().is_empty());
}

#[test]
fn a_hostile_template_layer_from_a_registry_is_refused_at_pull() {
    let registry = Registry::start();
    let (_a, manifest) = pushed_smollm2(&registry, "heal/template");
    let hostile: [(&str, String); 3] = [
        ("filters", format!("{{{{ 'x'{} }}}}", "|upper".repeat(5000))),
        ("syntax", "{% for m in messages %}{{ m.content }".to_string()),
        (
            "doubler",
            "{% set s = namespace(v='x') %}{% for i in range(64) %}{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v }}"
                .to_string(),
        ),
    ];
    for (tag, source) in hostile {
        let digest = upload_blob(&registry, "heal/template", source.as_bytes());
        let mut m = manifest.clone();
        m["layers"].as_array_mut().unwrap().push(serde_json::json!({
            "mediaType": "application/vnd.docker.ai.chat.template.jinja",
            "digest": digest,
            "size": source.len(),
        }));
        put_manifest(&registry, "heal/template", tag, &m);
        let b = Berth::new();
        let started = Instant::now();
        let err = b.fails(&["pull", &format!("{}/heal/template:{tag}", registry.host())]);
        assert!(err.contains("chat template") && err.contains("nothing was added"), "{tag}: {err}");
        assert!(started.elapsed() < Duration::from_secs(60), "{tag}: refused in bounded time");
        assert_eq!(blob_count(&b), 0, "{tag}: nothing published: {:?}", b.files());
        assert!(b.json(&["list", "--json"]).as_array().unwrap().is_empty(), "{tag}");
    }
}

/// A fake registry on loopback that answers the version check, then the manifest request with
/// `manifest_answer` (raw HTTP, written for as long as the client reads).
fn fake_registry(manifest_answer: fn(&mut std::net::TcpStream)) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                if head.contains("/manifests/") {
                    manifest_answer(&mut s);
                } else {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
                }
            });
        }
    });
    port
}

#[test]
fn an_endless_or_oversized_manifest_is_cut_off_at_the_limit() {
    let endless = fake_registry(|s| {
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        let chunk = format!("{:x}\r\n{}\r\n", 1 << 16, " ".repeat(1 << 16));
        // Up to 1 GiB, or until the client hangs up.
        for _ in 0..(1 << 14) {
            if s.write_all(chunk.as_bytes()).is_err() {
                return;
            }
        }
    });
    let declared = fake_registry(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n{");
    });
    for port in [endless, declared] {
        let b = Berth::new();
        let started = Instant::now();
        let err = b.fails(&["pull", &format!("127.0.0.1:{port}/fake/model:v1")]);
        assert!(err.contains("4194304-byte limit"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(30), "cut off at the limit, not read to the end");
        assert_eq!(blob_count(&b), 0);
    }
}

#[test]
fn registry_errors_without_a_body_still_say_what_happened() {
    let not_found = fake_registry(|s| {
        let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    });
    let broken = fake_registry(|s| {
        let _ = s.write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    });
    let b = Berth::new();
    let err = b.fails(&["pull", &format!("127.0.0.1:{not_found}/fake/model:v1")]);
    assert!(err.contains("was not found on registry"), "{err}");
    assert!(!err.contains("OCI API error"), "{err}");
    let err = b.fails(&["pull", &format!("127.0.0.1:{broken}/fake/model:v1")]);
    assert!(err.contains("HTTP 500"), "{err}");
}

#[test]
fn leftovers_of_killed_writers_are_shown_aged_out_and_pruned() {
    let b = Berth::new();
    b.ok(&["package", "--gguf", &models::smollm2_gguf().display().to_string(), "keep"]);
    b.ok(&["package", "--gguf", &models::smollm2_gguf().display().to_string(), "other"]);
    let models_dir = b.home().join("models");
    // What a killed `package` and two interrupted pulls leave behind.
    std::fs::write(models_dir.join("tmp/blob-killed"), vec![1u8; 3000]).unwrap();
    let fresh = models_dir.join(format!("incoming/{}.partial", "a".repeat(64)));
    let stale = models_dir.join(format!("incoming/{}.partial", "b".repeat(64)));
    std::fs::write(&fresh, vec![2u8; 5000]).unwrap();
    std::fs::write(&stale, vec![3u8; 7000]).unwrap();
    let month_ago = std::time::SystemTime::now() - Duration::from_secs(30 * 86_400);
    std::fs::File::options().write(true).open(&stale).unwrap().set_modified(month_ago).unwrap();

    let du = b.json(&["df", "--json"]);
    assert_eq!(du["temporary_bytes"], 3000, "{du}");
    assert_eq!(du["partial_bytes"], 12000, "{du}");
    let table = b.ok(&["df"]);
    assert!(table.contains("temporary files") && table.contains("partial downloads"), "{table}");

    // Removing a model collects: the dead writer's file and the week-old partial go, the fresh
    // partial stays to be resumed.
    b.ok(&["rm", "other"]);
    assert!(!models_dir.join("tmp/blob-killed").exists());
    assert!(!stale.exists(), "a partial untouched for a month is aged out");
    assert!(fresh.exists(), "a recent partial is kept for the next pull");

    let pruned = b.ok(&["prune"]);
    assert!(pruned.contains("Freed"), "{pruned}");
    assert!(!fresh.exists(), "prune removes every partial download");
    let du = b.json(&["df", "--json"]);
    assert_eq!((du["temporary_bytes"].as_u64(), du["partial_bytes"].as_u64()), (Some(0), Some(0)), "{du}");
    b.ok(&["verify", "keep"]);
    assert_eq!(b.ok(&["prune"]).trim(), "Nothing to remove");
}
