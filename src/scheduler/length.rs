//! The one rule for how long a request may be: a prompt and a completion
//! within the context the engine serves, and within the server's caps.
//!
//! Validation asks it with the server's caps before a request is queued;
//! [`super::EngineHandle::check`] asks it again, without caps, for callers
//! that submit directly. The messages clients see are written here only.

/// The server's caps below the context (`[limits]`); none for direct
/// submission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LengthCaps {
    /// Most prompt tokens; the context when absent or larger.
    pub prompt_tokens: Option<usize>,
    /// Most completion tokens a request may ask for, and the default's cap.
    pub max_tokens: Option<usize>,
}

/// Why a request's lengths are refused. `Display` is the client's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LengthError {
    /// Nothing to continue from.
    #[error("the prompt is empty")]
    EmptyPrompt {
        /// `messages` or `prompt`.
        param: &'static str,
    },
    /// `max_tokens: 0` asks for nothing.
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    /// Over the server's cap on `max_tokens`.
    #[error("max_tokens is {requested}; this server allows at most {cap}")]
    OverCap {
        /// What was asked.
        requested: usize,
        /// The cap.
        cap: usize,
    },
    /// The prompt's bytes alone prove it too long (known before tokenizing).
    #[error(
        "This model's maximum context length is {context} tokens. However, your {param} has {bytes} bytes, which is at least {at_least} tokens. Please shorten it."
    )]
    PromptBytes {
        /// The context.
        context: usize,
        /// `messages` or `prompt`.
        param: &'static str,
        /// The prompt's bytes.
        bytes: usize,
        /// The fewest tokens those bytes can be.
        at_least: usize,
    },
    /// The prompt leaves no room for one generated token.
    #[error(
        "This model's maximum context length is {context} tokens (prompt limit {limit}). However, your {param} has {prompt} tokens. Please shorten it."
    )]
    PromptTooLong {
        /// The context.
        context: usize,
        /// The prompt limit (the context, or a smaller server cap).
        limit: usize,
        /// `messages` or `prompt`.
        param: &'static str,
        /// The prompt's tokens.
        prompt: usize,
    },
    /// Prompt and completion together do not fit.
    #[error("{}", too_long(*.context, .param, *.prompt, *.max_tokens))]
    TooLong {
        /// The context.
        context: usize,
        /// `messages` or `prompt`.
        param: &'static str,
        /// The prompt's tokens.
        prompt: usize,
        /// The completion asked for.
        max_tokens: usize,
    },
}

/// The message of [`LengthError::TooLong`]. The sum is taken in `u128`:
/// `max_tokens` may be as large as the wire allows, and a wrapped sum would
/// tell the client it asked for a few tokens.
fn too_long(context: usize, param: &str, prompt: usize, max_tokens: usize) -> String {
    let requested = prompt as u128 + max_tokens as u128;
    let advice = if max_tokens >= context {
        // No prompt could make room: the completion alone is too long.
        format!(
            "Please reduce max_tokens to at most {}.",
            context.saturating_sub(prompt)
        )
    } else {
        format!("Please reduce the length of the {param} or the completion.")
    };
    format!(
        "This model's maximum context length is {context} tokens. However, you requested {requested} tokens ({prompt} in the {param}, {max_tokens} for the completion). {advice}"
    )
}

impl LengthError {
    /// The request parameter the client should change: `max_tokens` when it
    /// alone is past the context (no shorter prompt would help).
    pub fn param(&self) -> &'static str {
        match self {
            LengthError::TooLong {
                context,
                max_tokens,
                ..
            } if max_tokens >= context => "max_tokens",
            LengthError::ZeroMaxTokens | LengthError::OverCap { .. } => "max_tokens",
            LengthError::EmptyPrompt { param }
            | LengthError::PromptBytes { param, .. }
            | LengthError::PromptTooLong { param, .. }
            | LengthError::TooLong { param, .. } => param,
        }
    }

    /// Whether the request is beyond the context (OpenAI's
    /// `context_length_exceeded`) rather than a malformed parameter.
    pub fn is_context(&self) -> bool {
        matches!(
            self,
            LengthError::PromptBytes { .. }
                | LengthError::PromptTooLong { .. }
                | LengthError::TooLong { .. }
        )
    }
}

/// Refuses a prompt whose `bytes` already prove it holds `at_least` tokens,
/// no fewer than the `context`.
pub fn check_prompt_bytes(
    context: usize,
    param: &'static str,
    bytes: usize,
    at_least: usize,
) -> Result<(), LengthError> {
    if at_least >= context {
        return Err(LengthError::PromptBytes {
            context,
            param,
            bytes,
            at_least,
        });
    }
    Ok(())
}

/// The completion length a request gets: `requested`, checked against the
/// caps and what the prompt leaves of the context, or when absent all that
/// is left (capped).
pub fn max_new_tokens(
    context: usize,
    caps: LengthCaps,
    param: &'static str,
    prompt: usize,
    requested: Option<usize>,
) -> Result<usize, LengthError> {
    if prompt == 0 {
        return Err(LengthError::EmptyPrompt { param });
    }
    let limit = caps.prompt_tokens.unwrap_or(context).min(context);
    if prompt >= limit {
        return Err(LengthError::PromptTooLong {
            context,
            limit,
            param,
            prompt,
        });
    }
    let remaining = context - prompt;
    let Some(max_tokens) = requested else {
        return Ok(remaining.min(caps.max_tokens.unwrap_or(usize::MAX)));
    };
    if max_tokens == 0 {
        return Err(LengthError::ZeroMaxTokens);
    }
    if let Some(cap) = caps.max_tokens
        && max_tokens > cap
    {
        return Err(LengthError::OverCap {
            requested: max_tokens,
            cap,
        });
    }
    if max_tokens > remaining {
        return Err(LengthError::TooLong {
            context,
            param,
            prompt,
            max_tokens,
        });
    }
    Ok(max_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (case, context, caps (prompt, max_tokens), prompt, requested, want).
    type Case = (
        &'static str,
        usize,
        (Option<usize>, Option<usize>),
        usize,
        Option<usize>,
        Result<usize, &'static str>,
    );

    /// `Err` names the variant and, after a colon, a piece of its message.
    #[rustfmt::skip] // one row a case
    const CASES: &[Case] = &[
        ("absent takes the rest", 512, (None, None), 12, None, Ok(500)),
        ("absent is capped", 512, (None, Some(64)), 12, None, Ok(64)),
        ("fits exactly", 512, (None, None), 12, Some(500), Ok(500)),
        ("one over", 512, (None, None), 12, Some(501), Err("TooLong:you requested 513 tokens (12 in the prompt, 501 for the completion)")),
        ("huge", 512, (None, None), 1, Some(usize::MAX / 2), Err("TooLong:maximum context length is 512")),
        ("as large as the wire allows", 512, (None, None), 3, Some(usize::MAX), Err("TooLong:you requested 18446744073709551618 tokens (3 in the prompt, 18446744073709551615 for the completion). Please reduce max_tokens to at most 509.")),
        ("the context alone", 512, (None, None), 3, Some(512), Err("TooLong:you requested 515 tokens (3 in the prompt, 512 for the completion). Please reduce max_tokens to at most 509.")),
        ("zero", 512, (None, None), 12, Some(0), Err("ZeroMaxTokens:max_tokens must be at least 1")),
        ("over the cap", 512, (None, Some(64)), 12, Some(65), Err("OverCap:max_tokens is 65; this server allows at most 64")),
        ("at the cap", 512, (None, Some(64)), 12, Some(64), Ok(64)),
        ("empty prompt", 512, (None, None), 0, Some(1), Err("EmptyPrompt:the prompt is empty")),
        ("prompt fills the context", 512, (None, None), 512, None, Err("PromptTooLong:your prompt has 512 tokens")),
        ("prompt one short of the context", 512, (None, None), 511, None, Ok(1)),
        ("prompt at the server's limit", 512, (Some(100), None), 100, Some(1), Err("PromptTooLong:(prompt limit 100)")),
        ("prompt limit above the context", 512, (Some(4096), None), 511, Some(1), Ok(1)),
    ];

    #[test]
    fn every_length_case_resolves_as_the_table_says() {
        for &(case, context, (prompt_tokens, cap), prompt, requested, want) in CASES {
            let caps = LengthCaps {
                prompt_tokens,
                max_tokens: cap,
            };
            let got = max_new_tokens(context, caps, "prompt", prompt, requested);
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{case}"),
                (Err(e), Err(want)) => {
                    let (variant, text) = want.split_once(':').unwrap_or((want, ""));
                    assert!(
                        format!("{e:?}").starts_with(variant),
                        "{case}: {e:?} is not {variant}"
                    );
                    assert!(e.to_string().contains(text), "{case}: `{e}` lacks `{text}`");
                    assert_eq!(
                        e.is_context(),
                        matches!(variant, "TooLong" | "PromptTooLong"),
                        "{case}: is_context"
                    );
                }
                (got, want) => panic!("{case}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_length_error_names_the_parameter_to_change() {
        let chat = |prompt, requested| {
            max_new_tokens(16, LengthCaps::default(), "messages", prompt, requested)
                .err()
                .map(|e| e.param())
        };
        assert_eq!(chat(20, None), Some("messages"));
        assert_eq!(chat(4, Some(13)), Some("messages"));
        assert_eq!(
            chat(4, Some(16)),
            Some("max_tokens"),
            "alone past the context"
        );
        assert_eq!(chat(4, Some(usize::MAX)), Some("max_tokens"));
        assert_eq!(chat(4, Some(0)), Some("max_tokens"));
        assert_eq!(chat(0, Some(1)), Some("messages"));
        let e = check_prompt_bytes(16, "messages", 4000, 16).unwrap_err();
        assert_eq!((e.param(), e.is_context()), ("messages", true));
        assert!(
            e.to_string()
                .contains("4000 bytes, which is at least 16 tokens")
        );
        assert_eq!(check_prompt_bytes(16, "prompt", 4000, 15), Ok(()));
    }
}
