//! all-MiniLM-L6-v2 embeddings against an independent float64 BERT (../shared/golden).

use std::collections::HashMap;
use std::path::PathBuf;

use berth_engine::model::bert::BertEmbedder;
use berth_testkit::models;

fn folder_files() -> HashMap<String, PathBuf> {
    let dir = models::minilm_dir();
    let mut files = HashMap::new();
    let mut stack = vec![(String::new(), dir)];
    while let Some((prefix, path)) = stack.pop() {
        for e in std::fs::read_dir(&path).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
            if e.path().is_dir() {
                stack.push((rel, e.path()));
            } else {
                files.insert(rel, e.path());
            }
        }
    }
    files
}

#[test]
fn embeddings_match_the_reference() {
    let bert = BertEmbedder::load(&folder_files()).expect("load MiniLM");
    assert_eq!(bert.dimensions(), 384);
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(models::golden_dir().join("minilm-l6-v2.reference.json")).unwrap())
            .unwrap();
    let mut worst = 1.0f64;
    for item in golden["items"].as_array().unwrap() {
        let text = item["text"].as_str().unwrap();
        let want_ids: Vec<u32> = item["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(bert.tokenize(text), want_ids, "token ids of {text:?}");
        let (got, tokens) = bert.embed(text).unwrap();
        assert_eq!(tokens, want_ids.len());
        let want: Vec<f64> = item["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let dot: f64 = got.iter().zip(&want).map(|(&a, b)| a as f64 * b).sum();
        let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
        let cos = dot / (norm(&mut got.iter().map(|&x| x as f64)) * norm(&mut want.iter().copied()));
        worst = worst.min(cos);
        assert!(cos >= 0.9999, "{text:?}: cosine {cos}");
    }
    eprintln!("worst cosine to the float64 reference: {worst:.7}");
    let a = bert.embed("A man is eating food.").unwrap().0;
    let b = bert.embed("A man is eating a piece of bread.").unwrap().0;
    let cos: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    assert!((cos - 0.755).abs() < 0.01, "sanity anchor: {cos}");
}
