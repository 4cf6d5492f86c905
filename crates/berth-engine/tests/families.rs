//! Every decoder family berth runs, on its random-weight test model with a real vocabulary and
//! chat template (berth_testkit::families): it loads as its architecture, tokenizes and renders
//! with its own tokenizer and template, generates, keeps berth's rule that batching does not change
//! answers, and its sliding windows really limit attention. (Agreement with llama.cpp on the same
//! models: tests/peer_architectures.rs and scripts/agreement-vs-llamacpp.)

use std::path::{Path, PathBuf};

use berth_engine::model::{self, KvPool, KvType, Logits, SeqStep, TextModel, blocks_for};
use berth_engine::sampling::SamplingParams;
use berth_engine::template::Message;
use berth_engine::{Engine, GenerationRequest};
use berth_formats::gguf::{Array, GgufFile, Value};
use berth_testkit::families::{FAMILIES, Family, Storage, WINDOW, family, family_model, write_family_model};
use berth_testkit::models;

fn write(family: Family, dir: &Path) -> PathBuf {
    let path = dir.join(format!("{}.gguf", family.arch));
    write_family_model(family, &models::llamacpp_testdata(), Storage::Q8_0, &path).expect("write the test model");
    path
}

/// Pseudo-random ordinary tokens (the middle of the vocabulary).
fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (1000 + (s >> 33) % (vocab as u64 - 2000)) as u32
        })
        .collect()
}

/// Run sequences through one shared pool, each in its own blocks, all in the same steps: a prompt
/// step, then `decode` single-token steps. Returns each sequence's logits of every step.
fn run_together(model: &dyn TextModel, prompts: &[Vec<u32>], decode: usize) -> Vec<Vec<Vec<f32>>> {
    let per_seq = blocks_for(prompts.iter().map(Vec::len).max().unwrap() + decode + 1);
    let mut pool: Box<dyn KvPool> = model.new_kv_pool(per_seq * prompts.len(), KvType::F16).expect("pool");
    let tables: Vec<Vec<u32>> =
        (0..prompts.len()).map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect()).collect();
    let mut out = vec![Vec::new(); prompts.len()];
    let steps: Vec<SeqStep<'_>> = prompts
        .iter()
        .zip(&tables)
        .map(|(p, t)| SeqStep { blocks: t, start: 0, tokens: p, prompt_len: p.len(), logits: Logits::Last })
        .collect();
    let first = model.forward(pool.as_mut(), &steps).expect("prompt step");
    let mut next: Vec<u32> = Vec::new();
    for (s, logits) in first.into_iter().enumerate() {
        next.push(argmax(&logits));
        out[s].push(logits);
    }
    for i in 0..decode {
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let steps: Vec<SeqStep<'_>> = prompts
            .iter()
            .zip(&tables)
            .zip(&toks)
            .map(|((p, t), tok)| SeqStep {
                blocks: t,
                start: p.len() + i,
                tokens: tok,
                prompt_len: p.len(),
                logits: Logits::Last,
            })
            .collect();
        let logits = model.forward(pool.as_mut(), &steps).expect("decode step");
        for (s, l) in logits.into_iter().enumerate() {
            next[s] = argmax(&l);
            out[s].push(l);
        }
    }
    out
}

fn argmax(logits: &[f32]) -> u32 {
    (0..logits.len()).fold(0, |best, i| if logits[i] > logits[best] { i } else { best }) as u32
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn every_family_loads_renders_and_generates_with_its_own_tokenizer_and_template() {
    let dir = tempfile::tempdir().unwrap();
    for &family in FAMILIES {
        let path = write(family, dir.path());
        let engine = Engine::load(&path, None).unwrap_or_else(|e| panic!("{}: {e}", family.arch));
        assert_eq!(engine.model().architecture(), family.arch);
        assert_eq!(engine.context_length(), berth_testkit::families::CONTEXT);
        // The family's own template: the rendered text holds the family's turn markers, and the
        // prompt is that text in the family's tokens, its special markers one token each.
        let messages = [Message::new("user", "What is the capital of France?")];
        let prompt = engine.chat_prompt(&messages).unwrap_or_else(|e| panic!("{}: {e}", family.arch));
        let text = engine.template().expect("the family's template").render(&messages, true).unwrap();
        let (marker, special) = match family.arch {
            "llama" => (
                "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>",
                Some("<|eot_id|>"),
            ),
            "qwen2" | "qwen3" | "qwen3moe" => {
                ("<|im_start|>user\nWhat is the capital of France?<|im_end|>", Some("<|im_end|>"))
            }
            // llama-spm's vocabulary has no Gemma turn tokens: the markers stay text.
            "gemma2" | "gemma3" => ("<start_of_turn>user\nWhat is the capital of France?<end_of_turn>", None),
            "phi3" => ("<|user|>\nWhat is the capital of France?<|end|>", Some("<|end|>")),
            other => panic!("no marker for {other}"),
        };
        assert!(text.contains(marker), "{}: {text:?}", family.arch);
        if let Some(special) = special {
            let id = engine.tokenizer().encode(special, true).unwrap();
            assert_eq!(id.len(), 1, "{}: {special} is one token", family.arch);
            assert!(prompt.contains(&id[0]), "{}: the prompt lacks {special}", family.arch);
        }
        assert!(engine.tokenizer().decode(&prompt).contains("What is the capital of France?"));
        let req = GenerationRequest {
            prompt,
            max_tokens: 6,
            sampling: SamplingParams::greedy(),
            stop: vec![],
            stop_token_ids: vec![],
            logprobs: Some(2),
            ignore_eos: true,
            constraint: None,
        };
        let out = engine.generate(&req, &mut |_| true).unwrap_or_else(|e| panic!("{}: {e}", family.arch));
        assert_eq!(out.tokens.len(), 6, "{}", family.arch);
        assert!(out.logprobs.iter().all(|l| l.logprob.is_finite()), "{}", family.arch);
    }
}

#[test]
fn batching_does_not_change_any_familys_answers() {
    let dir = tempfile::tempdir().unwrap();
    for &family in FAMILIES {
        let path = write(family, dir.path());
        let model = model::load(&path).unwrap();
        let vocab = model.vocab_size();
        // Prompts longer and shorter than the sliding window, one beside the others.
        let prompts = vec![tokens(45, vocab, 1), tokens(7, vocab, 2), tokens(70, vocab, 3)];
        let together = run_together(model.as_ref(), &prompts, 4);
        for (s, prompt) in prompts.iter().enumerate() {
            let alone = run_together(model.as_ref(), std::slice::from_ref(prompt), 4);
            for (step, (a, b)) in alone[0].iter().zip(&together[s]).enumerate() {
                assert!(bits(a) == bits(b), "{}: sequence {s} step {step} differs when batched", family.arch);
            }
        }
    }
}

/// A Gemma 2 model whose every layer slides (the file's per-layer flags): what lies further back
/// than the layers' combined reach cannot change the last position's logits. The same change does
/// reach it through the real model's global layers, so the check is not empty.
#[test]
fn sliding_windows_really_limit_attention() {
    let dir = tempfile::tempdir().unwrap();
    let testdata = models::llamacpp_testdata();
    let gemma2 = family("gemma2").unwrap();
    let vocab_bytes = std::fs::read(testdata.join("models/ggml-vocab-llama-spm.gguf")).unwrap();
    let vocab = GgufFile::parse(&vocab_bytes).unwrap();
    let template = std::fs::read_to_string(testdata.join("models/templates").join(gemma2.template)).unwrap();
    let all_sliding = family_model("gemma2", &vocab, &template, Storage::Q8_0)
        .metadata("gemma2.attention.sliding_window_pattern", Value::Array(Array::Bool(vec![true; 4])))
        .build();
    let sliding_path = dir.path().join("all-sliding.gguf");
    std::fs::write(&sliding_path, all_sliding).unwrap();
    let mixed_path = write(gemma2, dir.path());

    // 4 layers each reaching back WINDOW − 1 positions: position 199 cannot see position 0.
    let n = 200;
    assert!(n > 4 * WINDOW);
    let last_logits = |path: &Path, first: u32| -> Vec<u32> {
        let model = model::load(path).unwrap();
        let mut prompt = tokens(n, model.vocab_size(), 9);
        prompt[0] = first;
        bits(&run_together(model.as_ref(), &[prompt], 0)[0][0])
    };
    assert_eq!(
        last_logits(&sliding_path, 1500),
        last_logits(&sliding_path, 2500),
        "a token out of every window changed the logits"
    );
    assert_ne!(
        last_logits(&mixed_path, 1500),
        last_logits(&mixed_path, 2500),
        "the global layers should see the first token"
    );
}

/// Each family's own template renders a tool-result round trip (an assistant's call, the tool's
/// answer), and under `required` its random-weight model still makes a call that parses, in the
/// format its template speaks: the grammar, not the weights, makes it valid.
/// The structure of Phi-4-mini-instruct's chat template (from its model card): the tools come
/// from the system message's `tools`, between `<|tool|>` tags.
const PHI4_MINI_SHAPED_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}";

#[test]
fn every_family_calls_tools_in_its_templates_format() {
    use berth_engine::tools::{Tool, ToolCall, ToolChoice, ToolFormat, ToolGrammar, ToolPlan};
    let dir = tempfile::tempdir().unwrap();
    let tools = vec![
        Tool {
            name: "get_weather".into(),
            description: Some("The weather in a city".into()),
            parameters: serde_json::json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                                           "required": ["city"], "additionalProperties": false}),
        },
        Tool {
            name: "add".into(),
            description: None,
            parameters: serde_json::json!({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "b": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a", "b"],
                                           "additionalProperties": false}),
        },
    ];
    let mut assistant = Message::new("assistant", "");
    assistant.tool_calls.push(ToolCall {
        id: "call_1".into(),
        name: "get_weather".into(),
        arguments: r#"{"city": "Paris"}"#.into(),
    });
    let mut result = Message::new("tool", "18 degrees and sunny");
    result.tool_call_id = Some("call_1".into());
    result.name = Some("get_weather".into());
    let conversation =
        [Message::new("user", "Weather in Paris?"), assistant, result, Message::new("user", "And 2 + 3?")];
    let mut formats = Vec::new();
    // Each family with its own template, then models whose templates speak the other formats:
    // the real templates of Qwen3-Coder and Qwen3.5 and Nemotron 3 (XML calls), Nemotron Nano 2
    // (`<TOOLCALL>`) and FireFunction v2 (`functools[…]`) on a family of their vocabulary, and
    // Phi-4-mini's way (its template, not in the sdist, takes the tools in the system message
    // between `<|tool|>` tags; the model answers `functools[…]`).
    let variants = [
        (Family { arch: "qwen3", vocab: "qwen2", template: "Qwen3-Coder.jinja" }, None, ToolFormat::XmlFunction),
        (Family { arch: "qwen3", vocab: "qwen2", template: "Qwen3.5-4B.jinja" }, None, ToolFormat::XmlFunction),
        (
            Family { arch: "llama", vocab: "llama-bpe", template: "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja" },
            None,
            ToolFormat::XmlFunction,
        ),
        (
            Family { arch: "llama", vocab: "llama-bpe", template: "NVIDIA-Nemotron-Nano-v2.jinja" },
            None,
            ToolFormat::ToolCallTags,
        ),
        (
            Family { arch: "llama", vocab: "llama-bpe", template: "fireworks-ai-llama-3-firefunction-v2.jinja" },
            None,
            ToolFormat::Functools,
        ),
        (
            Family { arch: "phi3", vocab: "phi-3", template: "microsoft-Phi-3.5-mini-instruct.jinja" },
            Some(PHI4_MINI_SHAPED_TEMPLATE),
            ToolFormat::Functools,
        ),
    ];
    let runs =
        FAMILIES.iter().map(|f| (*f, None, None)).chain(variants.iter().map(|(f, t, want)| (*f, *t, Some(*want))));
    for (f, template, want) in runs {
        let path = dir.path().join(format!("{}-{}.gguf", f.arch, f.template));
        write_family_model(f, &models::llamacpp_testdata(), Storage::Q8_0, &path).expect("write the test model");
        let engine = Engine::load(&path, template).expect("load");
        let format = engine.tool_format();
        if let Some(want) = want {
            assert_eq!(format, want, "{}", f.template);
        } else {
            formats.push((f.arch, format));
        }
        for choice in [ToolChoice::Required, ToolChoice::Function("add".into())] {
            let plan = ToolPlan { format, tools: tools.clone(), choice: choice.clone(), parallel: false };
            let prompt = engine
                .chat_prompt_with(
                    &conversation,
                    &berth_engine::ChatOptions { tools: Some(plan.clone()), ..Default::default() },
                )
                .unwrap_or_else(|e| panic!("{}: {e}", f.template));
            let rendered = engine.tokenizer().decode(&prompt);
            assert!(rendered.contains("18 degrees and sunny"), "{}: the tool result is in the prompt", f.template);
            if template.is_some() {
                assert!(
                    rendered.trim_start().starts_with("<|tool|>[{") && rendered.contains("\"name\":\"get_weather\""),
                    "the tools are in the system message: {rendered}"
                );
            }
            let spec = match plan.grammar(engine.tokenizer()) {
                ToolGrammar::Whole(spec) => spec,
                other => panic!("{}: {choice:?} must constrain the whole answer, got {other:?}", f.arch),
            };
            let req = GenerationRequest {
                prompt,
                max_tokens: 200,
                sampling: SamplingParams { temperature: 1.0, seed: Some(3), ..SamplingParams::default() },
                stop: Vec::new(),
                stop_token_ids: Vec::new(),
                logprobs: None,
                ignore_eos: false,
                constraint: Some(engine.constrain(&spec, "tools").expect("the tool grammar compiles")),
            };
            let out = engine.generate(&req, &mut |_| true).expect("generate");
            let (_, calls) = plan.parse(&out.text, "t");
            assert_eq!(calls.len(), 1, "{} ({format:?}, {choice:?}): {:?}", f.template, out.text);
            let args: serde_json::Value = serde_json::from_str(&calls[0].arguments).expect("arguments are JSON");
            match &choice {
                ToolChoice::Function(name) => assert_eq!(&calls[0].name, name),
                _ => assert!(["get_weather", "add"].contains(&calls[0].name.as_str())),
            }
            if calls[0].name == "add" {
                assert!(args["a"].as_i64().is_some_and(|a| (0..=99).contains(&a)), "{args}");
            }
        }
    }
    // Under `auto` a Qwen model's answer is free until it opens a call with `<tool_call>`; from
    // there the grammar holds (tests/constrained.rs runs such a lazy grammar). This vocabulary
    // spells `<tool_call>` in pieces (Qwen 2.5's has it as one token), so the opening is its text.
    let qwen2 = *FAMILIES.iter().find(|f| f.arch == "qwen2").expect("qwen2");
    let engine = Engine::load(&write(qwen2, dir.path()), None).expect("load");
    let plan =
        ToolPlan { format: engine.tool_format(), tools: tools.clone(), choice: ToolChoice::Auto, parallel: true };
    let ToolGrammar::Lazy(lazy) = plan.grammar(engine.tokenizer()) else { panic!("auto is lazy in the Hermes format") };
    assert_eq!(lazy.trigger, berth_engine::constraint::Trigger::Text("<tool_call>".into()));
    engine.constrain(&lazy.spec, "tools").expect("the lazy grammar compiles");

    // The formats come from the templates: Llama 3.2's JSON, Qwen's <tool_call>, and the generic
    // format for templates that know no tools (Gemma 2's, Phi-3.5's).
    let format_of = |arch| formats.iter().find(|(a, _)| *a == arch).map(|(_, f)| *f);
    assert_eq!(format_of("llama"), Some(ToolFormat::Llama3));
    assert_eq!(format_of("qwen2"), Some(ToolFormat::Hermes));
    assert_eq!(format_of("qwen3"), Some(ToolFormat::Hermes));
    assert_eq!(format_of("gemma2"), Some(ToolFormat::Generic));
}
