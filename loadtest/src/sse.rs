//! Server-sent events: an incremental parser for `data:` events, and the
//! fields a load generator reads from OpenAI stream chunks.

use serde_json::Value;

/// Splits a byte stream into SSE events, returning each event's data (its
/// `data:` lines joined by `\n`). Comments (`: keep-alive`) and other fields
/// are skipped; lines may end in `\n` or `\r\n`; input may be split anywhere.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: Option<String>,
}

impl SseParser {
    /// A parser with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut events = vec![];
        let mut start = 0;
        while let Some(pos) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + pos;
            let mut line = &self.buf[start..end];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            if line.is_empty() {
                if let Some(d) = self.data.take() {
                    events.push(d);
                }
            } else if line[0] != b':' {
                let (field, value) = match line.iter().position(|&b| b == b':') {
                    Some(i) => {
                        let v = &line[i + 1..];
                        (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
                    }
                    None => (line, &[][..]),
                };
                if field == b"data" {
                    let v = String::from_utf8_lossy(value);
                    match &mut self.data {
                        Some(d) => {
                            d.push('\n');
                            d.push_str(&v);
                        }
                        None => self.data = Some(v.into_owned()),
                    }
                }
            }
            start = end + 1;
        }
        self.buf.drain(..start);
        events
    }

    /// Bytes received but not yet part of a finished line.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// What one stream chunk of `/v1/completions` or `/v1/chat/completions` says.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Chunk {
    /// `data: [DONE]`.
    pub done: bool,
    /// Generated text in this chunk (all choices).
    pub text_len: usize,
    /// The chunk reports a generated token: it carries text, or an empty
    /// `text` / `delta.content` that is neither the finishing chunk nor a
    /// chat role announcement (some servers stream one chunk per token even
    /// when the token's text is held back or empty).
    pub token: bool,
    /// Some choice carries a finish reason.
    pub finished: bool,
    /// `usage.prompt_tokens`, when present.
    pub prompt_tokens: Option<u64>,
    /// `usage.completion_tokens`, when present.
    pub completion_tokens: Option<u64>,
    /// The message of an `{"error": ...}` object sent in the stream.
    pub error: Option<String>,
}

impl Chunk {
    /// Reads one event's data. `Err` when it is not JSON.
    pub fn parse(data: &str) -> Result<Chunk, serde_json::Error> {
        if data.trim() == "[DONE]" {
            return Ok(Chunk {
                done: true,
                ..Default::default()
            });
        }
        let v: Value = serde_json::from_str(data)?;
        let mut c = Chunk::default();
        if let Some(e) = v.get("error") {
            let msg = e
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string());
            c.error = Some(msg);
        }
        if let Some(choices) = v.get("choices").and_then(Value::as_array) {
            for ch in choices {
                // Completions put text in `text`, chat in `delta.content`.
                let text = ch.get("text").and_then(Value::as_str).or_else(|| {
                    ch.get("delta")
                        .and_then(|d| d.get("content"))
                        .and_then(Value::as_str)
                });
                let finishing = ch.get("finish_reason").is_some_and(|f| !f.is_null());
                let role = ch.get("delta").and_then(|d| d.get("role")).is_some();
                c.text_len += text.map(str::len).unwrap_or(0);
                c.token |= text.is_some_and(|t| !t.is_empty() || (!finishing && !role));
                c.finished |= finishing;
            }
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            c.prompt_tokens = u.get("prompt_tokens").and_then(Value::as_u64);
            c.completion_tokens = u.get("completion_tokens").and_then(Value::as_u64);
        }
        Ok(c)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere_come_out_whole() {
        let stream = b"data: {\"a\":1}\n\n: keep-alive\n\ndata: {\"b\":\r\ndata: 2}\r\n\r\nevent: x\nid: 3\ndata:[DONE]\n\n";
        let want = vec![
            "{\"a\":1}".to_string(),
            "{\"b\":\n2}".to_string(),
            "[DONE]".to_string(),
        ];
        // Whole, and cut at every position.
        for cut in 0..stream.len() {
            let mut p = SseParser::new();
            let mut got = p.push(&stream[..cut]);
            got.extend(p.push(&stream[cut..]));
            assert_eq!(got, want, "cut at {cut}");
            assert_eq!(p.pending(), 0);
        }
        // Byte by byte.
        let mut p = SseParser::new();
        let got: Vec<String> = stream.iter().flat_map(|b| p.push(&[*b])).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn an_unfinished_event_is_held_back() {
        let mut p = SseParser::new();
        assert!(p.push(b"data: {\"x\":1}\n").is_empty());
        assert!(p.push(b"data: more").is_empty());
        assert!(p.pending() > 0);
        assert_eq!(p.push(b"\n\n"), vec!["{\"x\":1}\nmore".to_string()]);
    }

    #[test]
    fn multibyte_text_split_across_reads_survives() {
        let s = "data: {\"choices\":[{\"text\":\"héllo ✓\"}]}\n\n".as_bytes();
        let mut p = SseParser::new();
        let cut = s.iter().position(|&b| b >= 0x80).unwrap() + 1;
        let mut got = p.push(&s[..cut]);
        got.extend(p.push(&s[cut..]));
        assert_eq!(Chunk::parse(&got[0]).unwrap().text_len, "héllo ✓".len());
    }

    #[test]
    fn chunks_of_both_endpoints_are_read() {
        let c = Chunk::parse(r#"{"object":"text_completion","choices":[{"index":0,"text":"abc","logprobs":null,"finish_reason":null}]}"#).unwrap();
        assert_eq!(
            (c.text_len, c.finished, c.completion_tokens),
            (3, false, None)
        );
        let c = Chunk::parse(r#"{"choices":[{"index":0,"text":"","finish_reason":"length"}]}"#)
            .unwrap();
        assert_eq!((c.text_len, c.finished), (0, true));
        let c = Chunk::parse(r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#).unwrap();
        assert_eq!((c.text_len, c.finished), (0, false));
        let c = Chunk::parse(
            r#"{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#,
        )
        .unwrap();
        assert_eq!(c.text_len, 2);
        let c = Chunk::parse(
            r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}"#,
        )
        .unwrap();
        assert_eq!((c.prompt_tokens, c.completion_tokens), (Some(7), Some(5)));
        // llama.cpp and others send `"usage": null` in ordinary chunks.
        let c = Chunk::parse(r#"{"choices":[{"delta":{"content":"x"}}],"usage":null}"#).unwrap();
        assert_eq!((c.text_len, c.completion_tokens), (1, None));
        let c = Chunk::parse(r#"{"error":{"message":"boom","type":"server_error"}}"#).unwrap();
        assert_eq!(c.error.as_deref(), Some("boom"));
        assert!(Chunk::parse("[DONE]").unwrap().done);
        assert!(Chunk::parse("not json").is_err());
    }

    #[test]
    fn empty_token_chunks_count_but_finish_and_role_chunks_do_not() {
        let token = |data: &str| Chunk::parse(data).unwrap().token;
        assert!(token(r#"{"choices":[{"text":"","finish_reason":null}]}"#));
        assert!(token(
            r#"{"choices":[{"text":"hi","finish_reason":"length"}]}"#
        ));
        assert!(!token(
            r#"{"choices":[{"text":"","finish_reason":"length"}]}"#
        ));
        assert!(token(
            r#"{"choices":[{"delta":{"content":""},"finish_reason":null}]}"#
        ));
        assert!(!token(
            r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#
        ));
        assert!(!token(
            r#"{"choices":[{"delta":{"role":"assistant","content":null}}]}"#
        ));
        assert!(!token(
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#
        ));
    }
}
