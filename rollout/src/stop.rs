//! Stop strings that may span token boundaries.

/// Turns token ids into text (implemented by the trainer for its tokenizer; tests use toy decoders).
pub trait TokenDecoder: Send + Sync {
    /// The text of `ids`. Implementations usually skip special tokens, as the completion text should.
    fn decode(&self, ids: &[i64]) -> String;
}

/// Finds the first stop string in a sample's text after each new token.
///
/// Each step decodes only a window of the last tokens (long enough for the longest stop string even when
/// some tokens decode to nothing, e.g. partial UTF-8 bytes); a hit there is confirmed on the full text, whose
/// earliest match decides where the text is cut.
pub struct StopMatcher {
    stops: Vec<String>,
    window: usize,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> StopMatcher {
        let longest = stops.iter().map(|s| s.chars().count()).max().unwrap_or(0);
        StopMatcher { stops: stops.to_vec(), window: 2 * longest + 8 }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// `Some((stop, byte offset of the match in the full text, full text))` when `tokens` contain a stop string.
    pub fn check(&self, dec: &dyn TokenDecoder, tokens: &[i64]) -> Option<(String, usize, String)> {
        if self.stops.is_empty() || tokens.is_empty() {
            return None;
        }
        let start = tokens.len().saturating_sub(self.window);
        let tail = dec.decode(&tokens[start..]);
        if !self.stops.iter().any(|s| tail.contains(s.as_str())) {
            return None;
        }
        let full = if start == 0 { tail } else { dec.decode(tokens) };
        self.stops
            .iter()
            .filter_map(|s| full.find(s.as_str()).map(|p| (p, s)))
            .min_by_key(|(p, _)| *p)
            .map(|(p, s)| (s.clone(), p, full.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Token i decodes to the i-th entry.
    struct Table(Vec<&'static str>);
    impl TokenDecoder for Table {
        fn decode(&self, ids: &[i64]) -> String {
            ids.iter().map(|&i| self.0[i as usize]).collect()
        }
    }

    #[test]
    fn finds_stops_across_tokens_and_cuts_at_the_earliest() {
        let d = Table(vec!["ab", "c</", "ans", "wer>", "x", "", ""]);
        let m = StopMatcher::new(&["</answer>".to_string()]);
        assert!(m.check(&d, &[0, 1, 2]).is_none());
        let (s, p, full) = m.check(&d, &[0, 1, 2, 3]).unwrap();
        assert_eq!((s.as_str(), p), ("</answer>", 3));
        assert_eq!(&full[..p], "abc");
        // tokens that decode to nothing inside the window still leave room
        let long: Vec<i64> = std::iter::repeat_n(4, 40).chain([1, 5, 6, 2, 3]).collect();
        assert!(m.check(&d, &long).is_some());
        let m2 = StopMatcher::new(&["wer".to_string(), "c</".to_string()]);
        let (s, p, _) = m2.check(&d, &[0, 1, 2, 3]).unwrap();
        assert_eq!((s.as_str(), p), ("c</", 2));
    }
}
