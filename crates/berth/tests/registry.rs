//! Models through a real OCI registry (Debian's `docker-registry`) with the real `berth` binary.

mod util;

use base64::Engine as _;

use std::time::Instant;

use berth_formats::gguf::{GgmlType, GgufBuilder, Value};
use berth_testkit::models;
use berth_testkit::proxy::CutProxy;
use berth_testkit::registry::{Registry, http_request};
use util::{Berth, sha256_file};

const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

fn smollm2_path() -> String {
    models::smollm2_gguf().display().to_string()
}

/// A tiny but valid GGUF model file, for tests about the transport rather than the model.
fn tiny_gguf(dir: &std::path::Path) -> String {
    let bytes = GgufBuilder::new()
        .metadata("general.architecture", Value::String("llama".into()))
        .metadata("general.name", Value::String("tiny".into()))
        .metadata("llama.context_length", Value::U32(256))
        .tensor("token_embd.weight", &[32, 64], GgmlType::Q8_0, (0..64 * 34).map(|i| i as u8).collect())
        .build();
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

fn blob_path(b: &Berth, hex: &str) -> std::path::PathBuf {
    b.home().join("models/blobs/sha256").join(hex)
}

fn blob_count(b: &Berth) -> usize {
    b.files().iter().filter(|(p, _)| p.to_string_lossy().contains("/blobs/sha256/")).count()
}

#[test]
fn smollm2_round_trips_through_a_real_registry() {
    let registry = Registry::start();
    let reference = format!("{}/berth-test/smollm2:135m-q4_1", registry.host());

    let a = Berth::new();
    let t = Instant::now();
    a.ok(&["package", "--gguf", &smollm2_path(), &reference]);
    let package_time = t.elapsed();
    let t = Instant::now();
    let pushed = a.ok(&["push", &reference]);
    let push_time = t.elapsed();
    assert!(pushed.contains("Pushed"), "{pushed}");

    a.ok(&["rm", &reference]);
    assert_eq!(blob_count(&a), 0, "rm collects every blob nothing references: {:?}", a.files());
    a.fails(&["inspect", &reference]);

    let b = Berth::new();
    let t = Instant::now();
    b.ok(&["pull", &reference]);
    let pull_time = t.elapsed();
    assert_eq!(
        sha256_file(&blob_path(&b, SMOLLM2_SHA256)),
        SMOLLM2_SHA256,
        "GGUF bytes identical after the round trip"
    );

    let inspect = b.json(&["inspect", "--json", &reference]);
    assert_eq!(inspect["manifest"]["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(inspect["manifest"]["config"]["mediaType"], "application/vnd.docker.ai.model.config.v0.1+json");
    assert_eq!(inspect["manifest"]["layers"][0]["mediaType"], "application/vnd.docker.ai.gguf.v3");
    assert_eq!(inspect["manifest"]["layers"][0]["digest"], format!("sha256:{SMOLLM2_SHA256}"));
    let config = &inspect["config"];
    assert_eq!(config["config"]["format"], "gguf");
    assert_eq!(config["config"]["architecture"], "llama");
    assert_eq!(config["config"]["quantization"], "Q4_1");
    assert_eq!(config["config"]["parameters"], "134.52M");
    assert_eq!(config["config"]["context_size"], 8192);
    assert_eq!(config["config"]["gguf"]["general.architecture"], "llama");
    assert_eq!(config["rootfs"]["type"], "rootfs");
    assert_eq!(config["rootfs"]["diff_ids"][0], format!("sha256:{SMOLLM2_SHA256}"));
    assert!(inspect["digest"].as_str().unwrap().starts_with("sha256:"));

    let list = b.json(&["list", "--json"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    let table = b.ok(&["list"]);
    assert!(table.contains("berth-test/smollm2:135m-q4_1") && table.contains("Q4_1"), "{table}");

    eprintln!(
        "SmolLM2 ({} bytes) over loopback: package {:.2?}, push {:.2?}, pull {:.2?}",
        std::fs::metadata(models::smollm2_gguf()).unwrap().len(),
        package_time,
        push_time,
        pull_time
    );
}

#[test]
fn minilm_safetensors_round_trips_with_its_file_layout() {
    let registry = Registry::start();
    let reference = format!("{}/berth-test/minilm:l6-v2", registry.host());
    let dir = models::minilm_dir();

    let a = Berth::new();
    a.ok(&["package", "--safetensors-dir", &dir.display().to_string(), &reference]);
    a.ok(&["push", &reference]);
    let b = Berth::new();
    b.ok(&["pull", &reference]);

    let inspect = b.json(&["inspect", "--json", &reference]);
    let manifest = &inspect["manifest"];
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.docker.ai.model.config.v0.2+json");
    let layers = manifest["layers"].as_array().unwrap();
    let mut seen = Vec::new();
    for layer in layers {
        let path = layer["annotations"]["org.cncf.model.filepath"].as_str().expect("every layer carries its path");
        let want_type = if path.ends_with(".safetensors") {
            "application/vnd.docker.ai.safetensors"
        } else {
            "application/vnd.docker.ai.model.file"
        };
        assert_eq!(layer["mediaType"], want_type, "{path}");
        let hex = layer["digest"].as_str().unwrap().strip_prefix("sha256:").unwrap();
        assert_eq!(
            sha256_file(&blob_path(&b, hex)),
            sha256_file(&dir.join(path)),
            "{path} identical after the round trip"
        );
        seen.push(path.to_string());
    }
    for required in ["model.safetensors", "config.json", "tokenizer.json", "1_Pooling/config.json"] {
        assert!(seen.iter().any(|p| p == required), "{required} missing from {seen:?}");
    }
    let config = &inspect["config"]["config"];
    assert_eq!(config["format"], "safetensors");
    assert_eq!(config["architecture"], "BertModel");
    assert_eq!(config["context_size"], 512);
    assert_eq!(config["parameters"], "22.71M");
}

#[test]
fn an_interrupted_pull_resumes_with_a_range_request() {
    let registry = Registry::start();
    let proxy = CutProxy::start(registry.port);
    let direct = format!("{}/berth-test/smollm2:v1", registry.host());
    let via_proxy = format!("127.0.0.1:{}/berth-test/smollm2:v1", proxy.port);
    let size = std::fs::metadata(models::smollm2_gguf()).unwrap().len();

    let a = Berth::new();
    a.ok(&["package", "--gguf", &smollm2_path(), &direct]);
    a.ok(&["push", &direct]);

    let b = Berth::new();
    proxy.cut_after(30 << 20);
    let err = b.fails(&["pull", &via_proxy]);
    assert!(err.contains("run the same pull again to resume"), "{err}");
    let partial = b.home().join(format!("models/incoming/{SMOLLM2_SHA256}.partial"));
    let kept = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    assert!(kept > 20 << 20 && kept < size, "the partial download is kept: {kept} bytes");
    assert!(b.json(&["list", "--json"]).as_array().unwrap().is_empty(), "nothing is listed after a failed pull");
    assert!(!blob_path(&b, SMOLLM2_SHA256).exists(), "no unverified blob is visible");

    proxy.pass_through();
    let before = proxy.downstream_bytes();
    b.ok(&["pull", &via_proxy]);
    let second = proxy.downstream_bytes() - before;
    assert!(
        second < size - kept + (1 << 20),
        "the second pull fetched only the rest: {second} bytes of {size}, {kept} kept"
    );
    assert_eq!(sha256_file(&blob_path(&b, SMOLLM2_SHA256)), SMOLLM2_SHA256);
    assert!(!partial.exists(), "the partial file became the blob");
}

#[test]
fn a_registry_serving_wrong_bytes_fails_the_pull_and_adds_nothing() {
    let registry = Registry::start();
    let reference = format!("{}/berth-test/tiny:v1", registry.host());
    let a = Berth::new();
    let gguf = tiny_gguf(a.home());
    a.ok(&["package", "--gguf", &gguf, &reference]);
    a.ok(&["push", &reference]);

    // Damage the weights in the registry's own storage: same size, one byte different.
    let hex = sha256_file(std::path::Path::new(&gguf));
    let data = registry.blob_data_path(&hex);
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();

    let b = Berth::new();
    let err = b.fails(&["pull", &reference]);
    assert!(err.contains("wrong content") || err.contains("digest"), "{err}");
    assert_eq!(blob_count(&b), 0, "nothing was added to the store: {:?}", b.files());
    assert!(b.json(&["list", "--json"]).as_array().unwrap().is_empty());
}

#[test]
fn a_manifest_whose_layer_size_lies_is_refused() {
    let registry = Registry::start();
    let honest = format!("{}/berth-test/tiny:honest", registry.host());
    let a = Berth::new();
    let gguf = tiny_gguf(a.home());
    a.ok(&["package", "--gguf", &gguf, &honest]);
    a.ok(&["push", &honest]);

    let inspect = a.json(&["inspect", "--json", &honest]);
    let mut manifest = inspect["manifest"].clone();
    let real = manifest["layers"][0]["size"].as_u64().unwrap();
    for (tag, claimed) in [("smaller", real - 100), ("larger", real + 100)] {
        manifest["layers"][0]["size"] = serde_json::json!(claimed);
        let body = serde_json::to_vec(&manifest).unwrap();
        let (status, resp) = http_request(
            registry.port,
            "PUT",
            &format!("/v2/berth-test/tiny/manifests/{tag}"),
            &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
            &body,
        )
        .unwrap();
        if status != 201 {
            // The registry itself refused the lie; nothing for berth to pull.
            eprintln!("registry refused the {tag} manifest: {}", String::from_utf8_lossy(&resp));
            continue;
        }
        let b = Berth::new();
        let err = b.fails(&["pull", &format!("{}/berth-test/tiny:{tag}", registry.host())]);
        assert!(err.contains("bytes"), "{tag}: {err}");
        assert_eq!(blob_count(&b), 0, "{tag}: nothing added: {:?}", b.files());
    }
}

#[test]
fn credentials_come_from_docker_config() {
    let hash = std::process::Command::new("htpasswd")
        .args(["-nbB", "ada", "lovelace"])
        .output()
        .expect("htpasswd (Debian package apache2-utils; .ci/run installs it)");
    let htpasswd = String::from_utf8(hash.stdout).unwrap();
    let registry = Registry::start_with_auth(Some(&htpasswd));
    let reference = format!("{}/berth-test/tiny:v1", registry.host());

    let anonymous = Berth::new();
    let gguf = tiny_gguf(anonymous.home());
    anonymous.ok(&["package", "--gguf", &gguf, &reference]);
    let err = anonymous.fails(&["push", &reference]);
    assert!(err.contains("docker login"), "{err}");

    let docker = tempfile::tempdir().unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(b"ada:lovelace");
    std::fs::write(
        docker.path().join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, registry.host()),
    )
    .unwrap();
    let cfg = docker.path().display().to_string();
    let logged_in = Berth::new().env("DOCKER_CONFIG", &cfg);
    logged_in.ok(&["package", "--gguf", &gguf, &reference]);
    logged_in.ok(&["push", &reference]);
    let puller = Berth::new().env("DOCKER_CONFIG", &cfg);
    puller.ok(&["pull", &reference]);
    let err = Berth::new().fails(&["pull", &reference]);
    assert!(err.contains("docker login"), "{err}");
}

#[test]
fn a_missing_model_names_what_to_do() {
    let registry = Registry::start();
    let b = Berth::new();
    let err = b.fails(&["pull", &format!("{}/berth-test/nothing:here", registry.host())]);
    assert!(err.contains("not found"), "{err}");
    let err = b.fails(&["push", "ai/not-local"]);
    assert!(err.contains("not in the local store") && err.contains("berth list"), "{err}");
}

#[test]
fn serve_pulls_a_model_named_with_its_registry_when_the_store_lacks_it() {
    let registry = Registry::start();
    let reference = format!("{}/team/smollm2:prod", registry.host());
    let publisher = Berth::new();
    publisher.ok(&["package", "--gguf", &smollm2_path(), &reference]);
    publisher.ok(&["push", &reference]);

    // An empty home, as a container's fresh volume: the model is pulled, verified, then served.
    let server = util::server::Server::serve(Berth::new(), &["--model", &reference]);
    assert!(server.log().contains("not in the store: pulling it"), "{}", server.log());
    let body = format!(r#"{{"model":"{reference}","messages":[{{"role":"user","content":"Hi"}}],"max_tokens":2}}"#);
    let (status, answer) = server.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{answer}");
    let listed = server.berth.ok(&["ls"]);
    assert!(listed.contains("team/smollm2:prod"), "{listed}");

    // A short name is never fetched behind the operator's back: it is refused as missing.
    let out = Berth::new().run(&["serve", "--port", &berth_testkit::free_port().to_string(), "--model", "nothere"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothere") && !err.contains("pulling"), "{err}");
}
