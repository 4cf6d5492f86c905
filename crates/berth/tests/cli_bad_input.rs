//! Bad input on the command line: a clear error, no panic, nothing written outside the store.

mod util;

use util::Berth;

#[test]
fn hostile_references_are_refused_before_touching_disk() {
    let b = Berth::new();
    let cases = [
        ("ai/x@sha256:../../etc/passwd", "sha256"),
        ("ai/x@sha256:abc", "64 lowercase hex"),
        (&format!("ai/x@sha256:{}", "a".repeat(65)), "64 lowercase hex"),
        (&format!("ai/x@sha256:{}", "A".repeat(64)), "64 lowercase hex"),
        ("ai/smollm2:v1/..", "not a valid name component"),
        ("ai/../../etc", "not a valid name component"),
        ("AI/Upper", "not a valid name component"),
    ];
    for (reference, want) in cases {
        for cmd in ["pull", "inspect", "rm", "push"] {
            let err = b.fails(&[cmd, reference]);
            assert!(err.contains(want), "berth {cmd} {reference}: {err}");
        }
    }
    let err = b.fails(&["tag", "ai/x", "ai/x:-bad"]);
    assert!(err.contains("tag"), "{err}");
}

#[test]
fn packaging_bad_files_says_what_is_wrong() {
    let b = Berth::new();
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("magic.gguf", b"GGUF".to_vec(), "ends early"),
        ("empty.gguf", Vec::new(), "not a GGUF file"),
        ("text.gguf", b"hello, world, this is not a model".to_vec(), "not a GGUF file"),
    ];
    for (name, bytes, want) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = b.fails(&["package", "--gguf", &path.display().to_string(), "ai/bad"]);
        assert!(err.contains(want), "{name}: {err}");
    }
    let err = b.fails(&["package", "--gguf", "/no/such/file.gguf", "ai/bad"]);
    assert!(err.contains("/no/such/file.gguf"), "{err}");
    let err = b.fails(&["package", "--safetensors-dir", &dir.path().display().to_string(), "ai/bad"]);
    assert!(err.contains("config.json"), "{err}");
    assert!(b.json(&["list", "--json"]).as_array().unwrap().is_empty());
}

#[test]
fn tag_list_rm_and_df_manage_the_store() {
    let b = Berth::new();
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("m.gguf");
    let bytes = berth_formats::gguf::GgufBuilder::new()
        .metadata("general.architecture", berth_formats::gguf::Value::String("llama".into()))
        .tensor("w", &[32], berth_formats::gguf::GgmlType::Q4_0, vec![0u8; 18])
        .build();
    std::fs::write(&gguf, bytes).unwrap();
    let license = dir.path().join("LICENSE");
    std::fs::write(&license, "Apache-2.0").unwrap();
    let template = dir.path().join("chat.jinja");
    std::fs::write(&template, "{% for m in messages %}{{ m.content }}{% endfor %}").unwrap();
    let g = gguf.display().to_string();
    b.ok(&[
        "package",
        "--gguf",
        &g,
        "--license",
        &license.display().to_string(),
        "--chat-template",
        &template.display().to_string(),
        "--context-size",
        "4096",
        "team/m:v1",
    ]);
    let inspect = b.json(&["inspect", "--json", "team/m:v1"]);
    let types: Vec<&str> =
        inspect["manifest"]["layers"].as_array().unwrap().iter().map(|l| l["mediaType"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "application/vnd.docker.ai.gguf.v3",
            "application/vnd.docker.ai.license",
            "application/vnd.docker.ai.chat.template.jinja"
        ]
    );
    assert_eq!(inspect["config"]["config"]["context_size"], 4096);

    b.ok(&["tag", "team/m:v1", "team/m:v2"]);
    assert_eq!(b.json(&["list", "--json"]).as_array().unwrap().len(), 2);
    b.ok(&["rm", "team/m:v1"]);
    // v2 still holds every blob.
    let df = b.json(&["df", "--json"]);
    assert_eq!(df["models"], 1);
    assert_eq!(df["unreferenced_bytes"], 0);
    assert_eq!(df["blobs"], 5, "3 layers, config, manifest: {df}");
    let err = b.fails(&["rm", "team/m:v1"]);
    assert!(err.contains("not in the local store"), "{err}");
    b.ok(&["rm", "team/m:v2"]);
    assert_eq!(b.json(&["df", "--json"])["blobs"], 0);
}
