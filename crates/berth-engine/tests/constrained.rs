//! Constrained decoding on the real SmolLM2 model: answers follow their schema, regex or grammar
//! at any temperature, forced tokens skip sampling, a constrained sequence does not change its
//! unconstrained neighbours in a batch, and what berth cannot compile is refused by name.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use berth_engine::constraint::{ConstraintSpec, Trigger};
use berth_engine::sampling::SamplingParams;
use berth_engine::scheduler::{Scheduler, SchedulerConfig, TokenSink};
use berth_engine::template::Message;
use berth_engine::{Engine, EngineError, FinishReason, GenerationOutput, GenerationRequest, TokenEvent};
use berth_testkit::models;
use serde_json::{Value, json};

fn engine() -> Engine {
    Engine::load(&models::smollm2_gguf(), None).expect("load SmolLM2")
}

fn request(engine: &Engine, ask: &str, spec: Option<ConstraintSpec>, temperature: f32, seed: u64) -> GenerationRequest {
    GenerationRequest {
        prompt: engine.chat_prompt(&[Message::new("user", ask)]).expect("prompt"),
        max_tokens: 200,
        sampling: SamplingParams { temperature, seed: Some(seed), ..SamplingParams::default() },
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        logprobs: None,
        ignore_eos: false,
        constraint: spec.map(|s| engine.constrain(&s, "response_format").expect("compiles")),
    }
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3}
        },
        "required": ["name", "age", "role", "tags"],
        "additionalProperties": false
    })
}

#[test]
fn answers_follow_their_schema_at_any_temperature() {
    let engine = engine();
    for (temperature, seed) in [(0.0, 1), (1.0, 2), (1.0, 3), (2.0, 4)] {
        let req = request(
            &engine,
            "Describe a user of a web site.",
            Some(ConstraintSpec::JsonSchema(person_schema())),
            temperature,
            seed,
        );
        let out = engine.generate(&req, &mut |_| true).expect("generation");
        assert_eq!(out.finish, FinishReason::Stop, "t={temperature}: {:?}", out.text);
        let v: Value =
            serde_json::from_str(&out.text).unwrap_or_else(|e| panic!("t={temperature}: {e}: {:?}", out.text));
        let name = v["name"].as_str().expect("name");
        assert!(name.chars().count() <= 20, "{v}");
        let age = v["age"].as_i64().expect("age");
        assert!((0..=120).contains(&age), "{v}");
        assert!(["admin", "user", "guest"].contains(&v["role"].as_str().expect("role")), "{v}");
        let tags = v["tags"].as_array().expect("tags");
        assert!((1..=3).contains(&tags.len()), "{v}");
        assert_eq!(v.as_object().unwrap().len(), 4, "no other keys: {v}");
    }
}

#[test]
fn json_object_regex_and_lark_constrain_too() {
    let engine = engine();
    let out = engine
        .generate(
            &request(&engine, "Give me a JSON object about cats.", Some(ConstraintSpec::JsonObject), 1.0, 5),
            &mut |_| true,
        )
        .expect("generation");
    if out.finish == FinishReason::Stop {
        assert!(serde_json::from_str::<Value>(&out.text).expect("JSON").is_object(), "{:?}", out.text);
    } else {
        assert!(out.text.starts_with('{'), "{:?}", out.text);
    }

    let phone = ConstraintSpec::Regex(r"\(\d{3}\) \d{3}-\d{4}".into());
    let out = engine.generate(&request(&engine, "A phone number?", Some(phone), 1.0, 6), &mut |_| true).expect("regex");
    let b = out.text.as_bytes();
    assert!(
        b.len() == 14 && b[0] == b'(' && b[4] == b')' && b[9] == b'-' && out.finish == FinishReason::Stop,
        "{:?}",
        out.text
    );

    let lark = ConstraintSpec::Lark("start: (\"yes\" | \"no\") \", because \" /[a-z ]{1,30}/ \".\"".into());
    let out = engine.generate(&request(&engine, "Is the sky blue?", Some(lark), 0.0, 7), &mut |_| true).expect("lark");
    assert!(
        (out.text.starts_with("yes, because ") || out.text.starts_with("no, because ")) && out.text.ends_with('.'),
        "{:?}",
        out.text
    );
}

struct Keep(Rc<RefCell<Option<Result<GenerationOutput, EngineError>>>>);

impl TokenSink for Keep {
    fn token(&mut self, _: &TokenEvent) -> bool {
        true
    }
    fn finish(&mut self, result: Result<GenerationOutput, EngineError>) {
        *self.0.borrow_mut() = Some(result);
    }
}

/// A one-key object whose value is a constant: everything after the opening brace is forced.
fn motto_schema(constant: &str) -> Value {
    json!({"type": "object", "properties": {"motto": {"const": constant}}, "required": ["motto"],
           "additionalProperties": false})
}

#[test]
fn forced_tokens_skip_sampling_and_neighbours_are_unchanged() {
    let engine = engine();
    // Everything after the opening brace is forced: a constant in a one-key object.
    let constant = "the quick brown fox jumps over the lazy dog, twice and then once more";
    let schema = motto_schema(constant);
    let constrained = request(&engine, "Say the motto.", Some(ConstraintSpec::JsonSchema(schema)), 1.0, 8);
    let free = request(&engine, "Tell me about the sea.", None, 0.0, 9);
    let free = GenerationRequest { max_tokens: 40, ..free };
    let alone = engine.generate(&free, &mut |_| true).expect("alone");

    let mut scheduler = Scheduler::new(
        &engine,
        SchedulerConfig {
            max_batch_tokens: 256,
            max_running: 4,
            kv_blocks: 256,
            prefix_cache: true,
            kv_type: Default::default(),
            speculation: true,
            draft_cost: None,
            target: Some(Default::default()),
        },
    )
    .expect("scheduler");
    let (a, b) = (Rc::new(RefCell::new(None)), Rc::new(RefCell::new(None)));
    scheduler.submit(constrained, Box::new(Keep(a.clone())), None);
    scheduler.submit(free, Box::new(Keep(b.clone())), None);
    let mut steps = 0;
    while !scheduler.is_idle() {
        scheduler.step();
        steps += 1;
        assert!(steps < 10_000);
    }
    let stats = scheduler.stats();
    drop(scheduler);
    let a = a.borrow_mut().take().expect("ended").expect("constrained");
    let b = b.borrow_mut().take().expect("ended").expect("free");
    assert_eq!(a.text, format!("{{\"motto\": \"{constant}\"}}"));
    assert_eq!(a.finish, FinishReason::Stop);
    assert_eq!(b.tokens, alone.tokens, "an unconstrained neighbour's greedy answer is unchanged");
    // The constrained answer's ~20 tokens took a handful of steps: forced tokens ride along.
    assert!(a.tokens.len() >= 15, "{:?}", a.tokens);
    let free_steps = b.tokens.len() as u64 + 1;
    assert!(
        stats.steps.load(Ordering::Relaxed) <= free_steps + 2,
        "{} steps for {} + {} tokens",
        stats.steps.load(Ordering::Relaxed),
        a.tokens.len(),
        b.tokens.len()
    );
}

/// Logprobs under a grammar are the model's own, before the mask, and every token has them: the
/// grammar's forced text is not fed ahead (it would have no logits) but picked token by token from
/// each step's logits, so the text is the same and its logprobs say how likely the model found
/// each token.
#[test]
fn constrained_answers_report_the_models_logprobs() {
    let engine = engine();
    let constant = "the quick brown fox";
    let schema = motto_schema(constant);
    let plain = request(&engine, "Say the motto.", Some(ConstraintSpec::JsonSchema(schema.clone())), 0.0, 1);
    let with_logprobs = GenerationRequest {
        logprobs: Some(3),
        ..request(&engine, "Say the motto.", Some(ConstraintSpec::JsonSchema(schema)), 0.0, 1)
    };
    let plain = engine.generate(&plain, &mut |_| true).expect("plain");
    let out = engine.generate(&with_logprobs, &mut |_| true).expect("with logprobs");
    assert_eq!(out.text, plain.text);
    assert_eq!(out.text, format!("{{\"motto\": \"{constant}\"}}"));
    assert_eq!(out.logprobs.len(), out.tokens.len(), "every token has its logprob");
    for (lp, &t) in out.logprobs.iter().zip(&out.tokens) {
        assert_eq!(lp.token, t);
        assert!(lp.logprob <= 0.0 && lp.logprob.is_finite(), "{lp:?}");
        assert_eq!(lp.top.len(), 3);
        assert!(lp.top[0].1 >= lp.logprob, "{lp:?}");
    }
    // SmolLM2 does not put all its mass on every word of the motto.
    assert!(out.logprobs.iter().filter(|lp| lp.logprob < -0.01).count() >= 3, "{:?}", out.logprobs);
}

#[test]
fn what_berth_cannot_follow_is_refused_by_name() {
    let engine = engine();
    let refuse = |spec: ConstraintSpec| match engine.constrain(&spec, "response_format") {
        Err(EngineError::InvalidParameter { param, message }) => {
            assert_eq!(param, "response_format");
            eprintln!("refused: {message}");
            message
        }
        other => panic!("{spec:?} was not refused: {other:?}"),
    };
    // A keyword of JSON Schema that llguidance does not enforce is named, never ignored (words
    // outside JSON Schema's vocabulary are annotations, as the standard says).
    let m =
        refuse(ConstraintSpec::JsonSchema(json!({"type": "array", "items": {"type": "integer"}, "uniqueItems": true})));
    assert!(m.contains("uniqueItems"), "{m}");
    let m =
        refuse(ConstraintSpec::JsonSchema(json!({"type": "object", "properties": {"a": {"not": {"type": "null"}}}})));
    assert!(m.contains("not"), "{m}");
    let m = refuse(ConstraintSpec::JsonSchema(json!(true)));
    assert!(m.contains("object"), "{m}");
    refuse(ConstraintSpec::JsonSchema(json!({"$ref": "https://example.com/schema.json"})));
    refuse(ConstraintSpec::Lark("start: undefined_rule".into()));
    refuse(ConstraintSpec::Regex("(unclosed".into()));
    let m = refuse(ConstraintSpec::Regex("a".repeat(300 << 10)));
    assert!(m.contains("at most"), "{m}");
    // Unsatisfiable: no value fits.
    refuse(ConstraintSpec::JsonSchema(json!({"type": "integer", "minimum": 5, "maximum": 1})));
}

#[test]
fn a_lazy_grammar_holds_from_its_opening_on() {
    let engine = engine();
    let open = engine.tokenizer().encode("{", false).expect("encode");
    assert_eq!(open.len(), 1);
    let spec = ConstraintSpec::Lark(r#"start: "\"name\": \"add\"}""#.into());
    for trigger in [Trigger::Token(open[0]), Trigger::Text("{".into())] {
        let req = GenerationRequest {
            // The model is free until it writes `{` (the bias makes it do so at once); from there
            // the grammar forces the rest.
            sampling: SamplingParams {
                temperature: 1.0,
                seed: Some(1),
                logit_bias: vec![(open[0], 100.0)],
                ..SamplingParams::default()
            },
            constraint: Some(engine.constrain(&spec, "tools").expect("compiles").after(trigger.clone())),
            ..request(&engine, "Call add.", None, 1.0, 1)
        };
        let out = engine.generate(&req, &mut |_| true).expect("generation");
        assert_eq!(out.text, r#"{"name": "add"}"#, "{trigger:?}");
        assert_eq!(out.finish, FinishReason::Stop);
    }
    // Without its opening the answer stays free: a bias against `{` keeps the grammar off.
    let req = GenerationRequest {
        sampling: SamplingParams { temperature: 0.0, logit_bias: vec![(open[0], -100.0)], ..SamplingParams::default() },
        constraint: Some(engine.constrain(&spec, "tools").expect("compiles").after(Trigger::Token(open[0]))),
        max_tokens: 20,
        ..request(&engine, "Say hello.", None, 0.0, 1)
    };
    let free = GenerationRequest { constraint: None, ..req.clone() };
    assert_eq!(engine.generate(&req, &mut |_| true).unwrap().text, engine.generate(&free, &mut |_| true).unwrap().text);
}

/// Every tool format's grammar and parser agree: under `required`, whatever the model writes in a
/// format's grammar parses back into a valid call of that format (on SmolLM2's vocabulary, where
/// every format's markers are text).
#[test]
fn every_tool_formats_grammar_produces_what_its_parser_reads() {
    use berth_engine::tools::{Tool, ToolChoice, ToolFormat, ToolGrammar, ToolPlan};
    let engine = engine();
    let tools = vec![
        Tool {
            name: "add".into(),
            description: None,
            parameters: json!({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                               "required": ["a"], "additionalProperties": false}),
        },
        Tool {
            name: "note".into(),
            description: None,
            parameters: json!({"type": "object", "properties": {"text": {"type": "string", "maxLength": 20},
                               "urgent": {"type": "boolean"}, "tag": {"type": "string", "enum": ["home", "work"]}},
                               "required": ["text", "tag"], "additionalProperties": false}),
        },
    ];
    let formats = ToolFormat::ALL;
    for format in formats {
        for parallel in [false, true] {
            // Parallel calls are a list the model closes, and SmolLM2 at temperature 1 may repeat a
            // call until max_tokens: they are sampled once, with the one tool and the prompt under
            // which it closes the list. One call at a time: of either tool twice, then of `note`
            // (a string argument, raw text in the XML format).
            let note = ToolChoice::Function("note".into());
            let (tools, ask, runs): (&[Tool], _, Vec<(ToolChoice, u64)>) = if parallel {
                (&tools[..1], "Add something.", vec![(ToolChoice::Required, 4)])
            } else {
                (
                    &tools,
                    "Add something, or take a note.",
                    vec![(ToolChoice::Required, 4), (ToolChoice::Required, 5), (note, 6)],
                )
            };
            for (choice, seed) in runs {
                let plan = ToolPlan { format, tools: tools.to_vec(), choice: choice.clone(), parallel };
                let ToolGrammar::Whole(spec) = plan.grammar(engine.tokenizer()) else {
                    panic!("{format:?}: {choice:?} is whole")
                };
                let req = GenerationRequest {
                    constraint: Some(engine.constrain(&spec, "tools").unwrap_or_else(|e| panic!("{format:?}: {e}"))),
                    ..request(&engine, ask, None, 1.0, seed)
                };
                let out = engine.generate(&req, &mut |_| true).expect("generation");
                let (_, calls) = plan.parse(&out.text, "t");
                assert!(!calls.is_empty() && (parallel || calls.len() == 1), "{format:?}: {:?}", out.text);
                if let ToolChoice::Function(name) = &choice {
                    assert_eq!(&calls[0].name, name, "{format:?}");
                }
                for c in calls {
                    let args: Value = serde_json::from_str(&c.arguments).unwrap();
                    match c.name.as_str() {
                        "add" => {
                            assert!(args["a"].as_i64().is_some_and(|a| (0..=9).contains(&a)), "{format:?}: {args}")
                        }
                        "note" => {
                            let text = args["text"].as_str().unwrap_or_else(|| panic!("{format:?}: {args}"));
                            assert!(text.chars().count() <= 20, "{format:?}: {args}");
                            assert!(args.get("urgent").is_none_or(Value::is_boolean), "{format:?}: {args}");
                            assert!(
                                ["home", "work"].contains(&args["tag"].as_str().unwrap_or("")),
                                "{format:?}: {args}"
                            );
                        }
                        other => panic!("{format:?}: a call of {other}"),
                    }
                }
            }
        }
    }
}

/// A client's parameter names and schemas are written into the tool grammars as quoted literals:
/// a name that spells Lark syntax or a closing tag stays a name, and the call parses back with it.
#[test]
fn hostile_parameter_names_stay_names_in_every_tool_grammar() {
    use berth_engine::tools::{Tool, ToolChoice, ToolFormat, ToolGrammar, ToolPlan};
    let engine = engine();
    let key = "a\"} | /.*/ %ignore\n</parameter>\n</function>";
    let tools = vec![Tool {
        name: "f".into(),
        description: None,
        parameters: json!({"type": "object", "properties": {key: {"type": "integer", "minimum": 0, "maximum": 9}},
                           "required": [key], "additionalProperties": false}),
    }];
    for format in ToolFormat::ALL {
        let plan = ToolPlan { format, tools: tools.clone(), choice: ToolChoice::Required, parallel: false };
        let ToolGrammar::Whole(spec) = plan.grammar(engine.tokenizer()) else {
            panic!("{format:?}: required is whole")
        };
        let req = GenerationRequest {
            constraint: Some(engine.constrain(&spec, "tools").unwrap_or_else(|e| panic!("{format:?}: {e}"))),
            ..request(&engine, "Call f.", None, 1.0, 7)
        };
        let out = engine.generate(&req, &mut |_| true).expect("generation");
        let (_, calls) = plan.parse(&out.text, "t");
        assert_eq!(calls.len(), 1, "{format:?}: {:?}", out.text);
        let args: Value = serde_json::from_str(&calls[0].arguments).unwrap();
        // The XML format's closing tags inside the name cut its parse short; every JSON format keeps it.
        if format != ToolFormat::XmlFunction {
            assert!(args[key].as_i64().is_some_and(|a| (0..=9).contains(&a)), "{format:?}: {args}");
        }
    }
}
