//! BERT sentence embeddings (all-MiniLM-L6-v2 and its kind) from a safetensors model folder:
//! `config.json`, `tokenizer.json`, `model.safetensors`. Mean pooling over the tokens, then L2
//! normalisation, as sentence-transformers does. Computed in f32.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;

use berth_formats::safetensors::SafetensorsHeader;
use memmap2::Mmap;
use serde_json::Value;

use crate::error::EngineError;
use crate::kernels::quant::dot_f32;
use crate::tokenizer::wordpiece::WordPiece;

struct Linear {
    /// [out][in], row-major (PyTorch's layout).
    weight: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
}

impl Linear {
    fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let outs = self.bias.len();
        let mut y = vec![0f32; n * outs];
        crate::team().for_each_chunk_mut(&mut y, outs, |t, row| {
            let xt = &x[t * self.inputs..(t + 1) * self.inputs];
            for (o, out) in row.iter_mut().enumerate() {
                *out = dot_f32(&self.weight[o * self.inputs..(o + 1) * self.inputs], xt) + self.bias[o];
            }
        });
        y
    }
}

struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    inter: Linear,
    out: Linear,
    out_norm: Norm,
}

pub struct BertEmbedder {
    tokenizer: WordPiece,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    eps: f32,
    max_tokens: usize,
    vocab: usize,
}

fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io { path: path.to_path_buf(), source }
}

impl BertEmbedder {
    /// Load from a model folder's files, given as (path inside the folder → file on disk).
    pub fn load(files: &HashMap<String, PathBuf>) -> Result<Self, EngineError> {
        let file =
            |name: &str| files.get(name).ok_or_else(|| EngineError::BadModel(format!("the model folder lacks {name}")));
        let config_path = file("config.json")?;
        let config: Value = serde_json::from_slice(&std::fs::read(config_path).map_err(io(config_path))?)
            .map_err(|e| EngineError::BadModel(format!("config.json: {e}")))?;
        let model_type = config["model_type"].as_str().unwrap_or("");
        if model_type != "bert" {
            return Err(EngineError::UnsupportedArchitecture(model_type.to_string()));
        }
        let int = |k: &str| {
            config[k]
                .as_u64()
                .map(|v| v as usize)
                .filter(|&v| v > 0 && v < 1 << 20)
                .ok_or_else(|| EngineError::MissingMetadata(format!("config.json {k}")))
        };
        let (hidden, heads, layers_n, inter) =
            (int("hidden_size")?, int("num_attention_heads")?, int("num_hidden_layers")?, int("intermediate_size")?);
        if hidden % heads != 0 {
            return Err(EngineError::BadModel("hidden_size is not a multiple of num_attention_heads".into()));
        }
        let max_positions = int("max_position_embeddings")?;
        // A norm's epsilon keeps a square root away from zero: one outside (0, 1) makes NaNs or
        // flattens every vector, so the model is refused rather than answering nulls.
        let eps = match &config["layer_norm_eps"] {
            Value::Null => 1e-12,
            v => v.as_f64().filter(|e| e.is_finite() && *e > 0.0 && *e < 1.0).ok_or_else(|| {
                EngineError::BadModel(format!("config.json layer_norm_eps is {v}; it must be between 0 and 1"))
            })?,
        } as f32;
        let tok_path = file("tokenizer.json")?;
        let tokenizer = WordPiece::from_tokenizer_json(&std::fs::read(tok_path).map_err(io(tok_path))?)?;
        // sentence-transformers' own limit when present, else the position table's.
        let max_tokens = files
            .get("sentence_bert_config.json")
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["max_seq_length"].as_u64())
            .map(|v| v as usize)
            .unwrap_or(max_positions)
            .min(max_positions);

        let weights_path = file("model.safetensors")?;
        let f = File::open(weights_path).map_err(io(weights_path))?;
        // SAFETY: read-only map of a store blob, which is never rewritten in place.
        let map = unsafe { Mmap::map(&f) }.map_err(io(weights_path))?;
        let header =
            SafetensorsHeader::parse(&map).map_err(|e| EngineError::BadModel(format!("model.safetensors: {e}")))?;
        let index: HashMap<&str, &berth_formats::safetensors::TensorEntry> =
            header.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        let tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>, EngineError> {
            let t = index
                .get(name)
                .or_else(|| index.get(format!("bert.{name}").as_str()))
                .ok_or_else(|| EngineError::MissingTensor(name.to_string()))?;
            let want: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
            if t.shape != want {
                return Err(EngineError::WrongShape {
                    name: name.to_string(),
                    expected: want,
                    actual: t.shape.clone(),
                });
            }
            let bytes = &map[t.begin as usize..t.end as usize];
            Ok(match t.dtype.as_str() {
                "F32" => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                "F16" => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
                "BF16" => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
                other => return Err(EngineError::UnsupportedTensorType(other.to_string())),
            })
        };
        let linear = |prefix: &str, outs: usize, ins: usize| -> Result<Linear, EngineError> {
            Ok(Linear {
                weight: tensor(&format!("{prefix}.weight"), &[outs, ins])?,
                bias: tensor(&format!("{prefix}.bias"), &[outs])?,
                inputs: ins,
            })
        };
        let norm = |prefix: &str| -> Result<Norm, EngineError> {
            Ok(Norm {
                weight: tensor(&format!("{prefix}.weight"), &[hidden])?,
                bias: tensor(&format!("{prefix}.bias"), &[hidden])?,
            })
        };
        let vocab = int("vocab_size")?;
        let type_vocab = config["type_vocab_size"].as_u64().unwrap_or(2) as usize;
        let mut layers = Vec::with_capacity(layers_n);
        for i in 0..layers_n {
            let p = format!("encoder.layer.{i}");
            layers.push(Layer {
                q: linear(&format!("{p}.attention.self.query"), hidden, hidden)?,
                k: linear(&format!("{p}.attention.self.key"), hidden, hidden)?,
                v: linear(&format!("{p}.attention.self.value"), hidden, hidden)?,
                attn_out: linear(&format!("{p}.attention.output.dense"), hidden, hidden)?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                inter: linear(&format!("{p}.intermediate.dense"), inter, hidden)?,
                out: linear(&format!("{p}.output.dense"), hidden, inter)?,
                out_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        Ok(Self {
            word: tensor("embeddings.word_embeddings.weight", &[vocab, hidden])?,
            position: tensor("embeddings.position_embeddings.weight", &[max_positions, hidden])?,
            token_type: tensor("embeddings.token_type_embeddings.weight", &[type_vocab, hidden])?,
            embed_norm: norm("embeddings.LayerNorm")?,
            layers,
            tokenizer,
            hidden,
            heads,
            eps,
            max_tokens,
            vocab,
        })
    }

    pub fn dimensions(&self) -> usize {
        self.hidden
    }

    /// The token ids the model sees for a text (with `[CLS]`/`[SEP]`, truncated).
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode(text, self.max_tokens)
    }

    /// The normalised sentence embedding of a text, and how many tokens it took; a text longer
    /// than the model takes is cut to fit.
    pub fn embed(&self, text: &str) -> Result<(Vec<f32>, usize), EngineError> {
        let ids = self.tokenize(text);
        self.embed_ids(&ids).map(|e| (e, ids.len()))
    }

    /// The same, but a text longer than the model takes is an error
    /// ([`EngineError::ContextOverflow`], with its whole length) instead of being cut.
    pub fn embed_whole(&self, text: &str) -> Result<(Vec<f32>, usize), EngineError> {
        // Tokenized in full to say how long it is (the body limit bounds the text).
        let all = self.tokenizer.encode(text, usize::MAX);
        if all.len() > self.max_tokens {
            return Err(EngineError::ContextOverflow { needed: all.len(), limit: self.max_tokens });
        }
        self.embed_ids(&all).map(|e| (e, all.len()))
    }

    /// The embedding of given token ids (already with `[CLS]`/`[SEP]`).
    pub fn embed_ids(&self, ids: &[u32]) -> Result<Vec<f32>, EngineError> {
        let (h, n) = (self.hidden, ids.len());
        if n == 0 || n > self.max_tokens {
            return Err(EngineError::ContextOverflow { needed: n, limit: self.max_tokens });
        }
        let mut x = vec![0f32; n * h];
        for (i, (&id, row)) in ids.iter().zip(x.chunks_exact_mut(h)).enumerate() {
            let id = id as usize;
            if id >= self.vocab {
                return Err(EngineError::BadModel(format!("token id {id} is outside the vocabulary")));
            }
            let (word, pos) = (&self.word[id * h..(id + 1) * h], &self.position[i * h..(i + 1) * h]);
            for (((r, w), p), t) in row.iter_mut().zip(word).zip(pos).zip(&self.token_type[..h]) {
                *r = w + p + t;
            }
            layer_norm(row, &self.embed_norm, self.eps);
        }
        let dh = h / self.heads;
        let scale = 1.0 / (dh as f32).sqrt();
        for layer in &self.layers {
            let (q, k, v) = (layer.q.forward(&x, n), layer.k.forward(&x, n), layer.v.forward(&x, n));
            let mut ctx = vec![0f32; n * h];
            crate::team().for_each_chunk_mut(&mut ctx, h, |i, out| {
                let mut scores = vec![0f32; n];
                for head in 0..self.heads {
                    let qi = &q[i * h + head * dh..i * h + (head + 1) * dh];
                    for (j, s) in scores.iter_mut().enumerate() {
                        *s = dot_f32(qi, &k[j * h + head * dh..j * h + (head + 1) * dh]) * scale;
                    }
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let o = &mut out[head * dh..(head + 1) * dh];
                    for (j, &p) in scores.iter().enumerate() {
                        let vj = &v[j * h + head * dh..j * h + (head + 1) * dh];
                        for (a, b) in o.iter_mut().zip(vj) {
                            *a += p / sum * b;
                        }
                    }
                }
            });
            let attn = layer.attn_out.forward(&ctx, n);
            for ((row, a), _) in x.chunks_exact_mut(h).zip(attn.chunks_exact(h)).zip(0..) {
                row.iter_mut().zip(a).for_each(|(r, a)| *r += a);
                layer_norm(row, &layer.attn_norm, self.eps);
            }
            let mut inter = layer.inter.forward(&x, n);
            inter.iter_mut().for_each(|v| *v = gelu(*v));
            let out = layer.out.forward(&inter, n);
            for (row, o) in x.chunks_exact_mut(h).zip(out.chunks_exact(h)) {
                row.iter_mut().zip(o).for_each(|(r, o)| *r += o);
                layer_norm(row, &layer.out_norm, self.eps);
            }
        }
        let mut pooled = vec![0f64; h];
        for row in x.chunks_exact(h) {
            pooled.iter_mut().zip(row).for_each(|(p, &v)| *p += v as f64);
        }
        let norm = pooled.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        if !norm.is_finite() {
            // Weights with infinities or NaNs: an error, not a vector of nulls.
            return Err(EngineError::BadModel("the model's weights produce non-finite values".into()));
        }
        Ok(pooled.iter().map(|v| (v / norm) as f32).collect())
    }
}

fn layer_norm(x: &mut [f32], n: &Norm, eps: f32) {
    let len = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / len;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len;
    let inv = 1.0 / (var + eps as f64).sqrt();
    for ((v, w), b) in x.iter_mut().zip(&n.weight).zip(&n.bias) {
        *v = ((*v as f64 - mean) * inv) as f32 * w + b;
    }
}

/// GELU in its erf form, as BERT uses it.
fn gelu(x: f32) -> f32 {
    let f = x as f64;
    (0.5 * f * (1.0 + erf(f / std::f64::consts::SQRT_2))) as f32
}

/// erf with relative error below 1.2e-7 (the Chebyshev fit of Numerical Recipes' erfc).
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223
        + t * (1.00002368
            + t * (0.37409196
                + t * (0.09678418
                    + t * (-0.18628806
                        + t * (0.27886807
                            + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let r = t * poly.exp();
    if x >= 0.0 { 1.0 - r } else { r - 1.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_is_accurate() {
        for (x, want) in [(0.0, 0.0), (0.5, 0.5204998778), (1.0, 0.8427007929), (-2.0, -0.9953222650)] {
            assert!((erf(x) - want).abs() < 2e-7, "erf({x})");
        }
    }
}
