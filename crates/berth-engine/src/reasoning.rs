//! Reasoning models (Qwen3, QwQ, DeepSeek-R1-Distill) think between `<think>` and `</think>` before
//! they answer. [`ThinkSplitter`] separates the thinking from the answer as text streams, so APIs
//! can return it apart (`reasoning_content`, Ollama's `thinking`). Whether a model reasons is read
//! from its template; a template that opens the thought itself (R1-Distill's generation prompt ends
//! with `<think>\n`) starts the answer inside it.

use crate::stop::held_prefix_len;

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// Whether a chat template's model thinks in `<think>` tags.
pub fn template_reasons(source: &str) -> bool {
    source.contains(OPEN) && source.contains(CLOSE)
}

/// Whether a rendered prompt leaves the model inside an opened thought.
pub fn prompt_opens_thought(rendered_tail: &str) -> bool {
    match (rendered_tail.rfind(OPEN), rendered_tail.rfind(CLOSE)) {
        (Some(open), Some(close)) => open > close,
        (Some(_), None) => true,
        _ => false,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing yet: the answer may open with `<think>`.
    Start,
    Thinking,
    Answer,
}

/// Splits streamed text into thinking and answer.
#[derive(Debug, Clone)]
pub struct ThinkSplitter {
    state: State,
    /// Text not yet given out: a possible tag's beginning.
    held: String,
    /// At the thought's beginning, where the newline after `<think>` is dropped.
    fresh: bool,
    /// Right after the thought, where whitespace before the answer is dropped.
    answer_fresh: bool,
}

/// Text given out by one push: thinking, then answer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

impl ThinkSplitter {
    /// `in_thought`: the prompt opened the thought already.
    pub fn new(in_thought: bool) -> ThinkSplitter {
        ThinkSplitter {
            state: if in_thought { State::Thinking } else { State::Start },
            held: String::new(),
            fresh: true,
            answer_fresh: false,
        }
    }

    pub fn push(&mut self, text: &str) -> Split {
        self.held.push_str(text);
        let mut out = Split::default();
        loop {
            match self.state {
                State::Start => {
                    let trimmed = self.held.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(OPEN) {
                        self.held = rest.to_string();
                        self.state = State::Thinking;
                    } else if OPEN.starts_with(trimmed) {
                        return out; // maybe the tag, not yet whole
                    } else {
                        self.state = State::Answer;
                    }
                }
                State::Thinking => {
                    if self.fresh && !self.held.is_empty() {
                        if let Some(rest) = self.held.strip_prefix('\n') {
                            self.held = rest.to_string();
                        }
                        self.fresh = self.held.is_empty();
                    }
                    match self.held.find(CLOSE) {
                        Some(at) => {
                            // As llama.cpp gives it: without the line break before `</think>`.
                            out.reasoning.push_str(self.held[..at].trim_end());
                            self.held = self.held[at + CLOSE.len()..].to_string();
                            self.state = State::Answer;
                            self.answer_fresh = true;
                        }
                        None => {
                            // Hold a possible `</think>`, and trailing whitespace that may end up
                            // right before it.
                            let before = &self.held[..self.held.len() - held_prefix_len(&self.held, CLOSE)];
                            let give = before.trim_end().len();
                            out.reasoning.push_str(&self.held[..give]);
                            self.held.drain(..give);
                            return out;
                        }
                    }
                }
                State::Answer => {
                    // The blank line between the thought and the answer belongs to neither.
                    if out.content.is_empty() && self.answer_fresh {
                        let trimmed = self.held.trim_start().to_string();
                        if trimmed.is_empty() {
                            return out;
                        }
                        self.held = trimmed;
                        self.answer_fresh = false;
                    }
                    out.content.push_str(&self.held);
                    self.held.clear();
                    return out;
                }
            }
        }
    }

    /// The end: what is still held goes where it belongs.
    pub fn finish(mut self) -> Split {
        let held = std::mem::take(&mut self.held);
        match self.state {
            State::Thinking => Split { reasoning: held.trim_end().to_string(), content: String::new() },
            State::Answer if self.answer_fresh => {
                Split { reasoning: String::new(), content: held.trim_start().to_string() }
            }
            _ => Split { reasoning: String::new(), content: held },
        }
    }

    /// Split a whole answer.
    pub fn split(in_thought: bool, text: &str) -> Split {
        let mut s = ThinkSplitter::new(in_thought);
        let mut out = s.push(text);
        let rest = s.finish();
        out.reasoning.push_str(&rest.reasoning);
        out.content.push_str(&rest.content);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Outputs from llama.cpp's tests/test-chat.cpp (Qwen3.5, DeepSeek R1 Distill, Granite blocks)
    // and the messages they parse into there.
    #[test]
    fn splits_thinking_from_the_answer() {
        let thoughts = || Split { reasoning: "I'm\nthinking".into(), content: "Hello, world!\nWhat's up?".into() };
        assert_eq!(ThinkSplitter::split(true, "I'm\nthinking\n</think>\n\nHello, world!\nWhat's up?"), thoughts());
        assert_eq!(
            ThinkSplitter::split(false, "<think>\nI'm\nthinking\n</think>\n\nHello, world!\nWhat's up?"),
            thoughts()
        );
        assert_eq!(ThinkSplitter::split(true, "I'm\nthinking</think>Hello, world!\nWhat's up?"), thoughts());
        assert_eq!(ThinkSplitter::split(false, "<think>I'm\nthinking</think>Hello, world!\nWhat's up?"), thoughts());
        let s = ThinkSplitter::split(true, "</think>Hello, world!\nWhat's up?");
        assert_eq!(s, Split { reasoning: String::new(), content: "Hello, world!\nWhat's up?".into() });
        let s = ThinkSplitter::split(false, "Hello, world!\nWhat's up?");
        assert_eq!(s, Split { reasoning: String::new(), content: "Hello, world!\nWhat's up?".into() });
        // Cut off while thinking: all of it is thought.
        let s = ThinkSplitter::split(false, "<think>still going");
        assert_eq!(s, Split { reasoning: "still going".into(), content: String::new() });
    }

    #[test]
    fn streams_across_tag_boundaries() {
        let text = "<think>\nI'm\nthinking\n</think>\n\nHello, world!";
        for cut in 1..text.len() {
            let (a, b) = text.split_at(cut);
            let mut s = ThinkSplitter::new(false);
            let mut all = s.push(a);
            let more = s.push(b);
            let end = s.finish();
            all.reasoning.push_str(&more.reasoning);
            all.reasoning.push_str(&end.reasoning);
            all.content.push_str(&more.content);
            all.content.push_str(&end.content);
            assert_eq!(
                all,
                Split { reasoning: "I'm\nthinking".into(), content: "Hello, world!".into() },
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn knows_when_the_prompt_opened_the_thought() {
        assert!(prompt_opens_thought("<｜Assistant｜><think>\n"));
        assert!(!prompt_opens_thought("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert!(!prompt_opens_thought("<|im_start|>assistant\n"));
    }
}
