//! Stop strings, also when one spans several tokens: text that could be the start of a stop string
//! is held back until it is known not to be one.

#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What the matcher decided about newly generated text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCheck {
    /// Text safe to emit now (possibly empty).
    Continue(String),
    /// A stop string was found: emit this text (everything before the stop string) and finish.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    pub fn push(&mut self, text: &str) -> StopCheck {
        self.held.push_str(text);
        if self.stops.is_empty() {
            return StopCheck::Continue(std::mem::take(&mut self.held));
        }
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let out = self.held[..at].to_string();
            self.held.clear();
            return StopCheck::Stopped(out);
        }
        // Hold back the longest tail that is a proper prefix of some stop string.
        let keep = self.stops.iter().map(|s| held_prefix_len(&self.held, s)).max().unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopCheck::Continue(out)
    }

    /// Generation ended without a stop string: release what was held.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The length of the longest end of `text` that is a proper beginning of `marker`: what a stream must
/// hold back until the next text says whether `marker` follows (stop strings, `</think>`, a tool
/// call's opening).
pub fn held_prefix_len(text: &str, marker: &str) -> usize {
    marker.char_indices().skip(1).map(|(i, _)| i).filter(|&i| text.ends_with(&marker[..i])).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_across_token_boundaries() {
        let mut m = StopMatcher::new(vec!["\n\nUser:".into()]);
        assert_eq!(m.push("Hello"), StopCheck::Continue("Hello".into()));
        assert_eq!(m.push(" world\n"), StopCheck::Continue(" world".into()));
        assert_eq!(m.push("\nUs"), StopCheck::Continue(String::new()));
        assert_eq!(m.push("er: hi"), StopCheck::Stopped(String::new()));
    }

    #[test]
    fn releases_false_alarms() {
        let mut m = StopMatcher::new(vec!["STOP".into(), "END".into()]);
        assert_eq!(m.push("ST"), StopCheck::Continue(String::new()));
        assert_eq!(m.push("ay"), StopCheck::Continue("STay".into()));
        assert_eq!(m.push("E"), StopCheck::Continue(String::new()));
        assert_eq!(m.finish(), "E");
        let mut m = StopMatcher::new(vec!["b".into()]);
        assert_eq!(m.push("aab c"), StopCheck::Stopped("aa".into()));
    }
}
