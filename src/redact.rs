//! Redaction of personal data before text is stored (shadow samples,
//! captured traffic): e-mail addresses, phone numbers, card numbers, IP
//! addresses and API-key-like strings, plus the operator's own patterns.
//! Each match becomes a bracketed tag naming what was there, never a
//! partial copy of it.

use regex::Regex;

/// Built-in patterns, applied in this order (the more specific first, so a
/// card number is not half-taken by the phone pattern).
const BUILT_IN: &[(&str, &str)] = &[
    (
        "[SECRET]",
        r"(?i)\b(?:sk|pk|rk|ghp|gho|ghs|xox[abpr]|akia|bearer)[-_ ]?[A-Za-z0-9_\-]{10,}\b",
    ),
    ("[SECRET]", r"\b[A-Za-z0-9_\-+/]{32,}={0,2}"),
    (
        "[EMAIL]",
        r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}",
    ),
    ("[IP]", r"\b(?:\d{1,3}\.){3}\d{1,3}\b"),
    ("[IP]", r"(?i)\b(?:[0-9a-f]{1,4}:){2,7}[0-9a-f]{1,4}\b"),
    ("[CARD]", r"\b(?:\d[ \-]?){12,18}\d\b"),
    (
        "[PHONE]",
        r"(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{1,4}\)[\s.\-]?)?\d{2,4}[\s.\-]\d{2,4}[\s.\-]?\d{2,6}\b",
    ),
];

/// A compiled set of patterns.
#[derive(Debug, Clone)]
pub struct Redactor {
    patterns: Vec<(&'static str, Regex)>,
}

impl Redactor {
    /// The built-in patterns plus `extra` (each a regular expression whose
    /// matches become `[REDACTED]`). Fails on an invalid pattern.
    pub fn new(extra: &[String]) -> Result<Self, String> {
        let mut patterns = vec![];
        for (tag, p) in BUILT_IN {
            patterns.push((*tag, Regex::new(p).map_err(|e| e.to_string())?));
        }
        for p in extra {
            let re = Regex::new(p).map_err(|e| format!("redaction pattern `{p}`: {e}"))?;
            patterns.push(("[REDACTED]", re));
        }
        Ok(Self { patterns })
    }

    /// `text` with every match replaced by its tag.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (tag, re) in &self.patterns {
            if re.is_match(&out) {
                out = re.replace_all(&out, *tag).into_owned();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planted_personal_data_is_replaced_by_its_kind() {
        let r = Redactor::new(&["(?i)project\\s+\\w+".into()]).unwrap();
        let cases = [
            ("mail me at jane.doe+x@example.co.uk", "jane.doe", "[EMAIL]"),
            ("call +1 415-555-0132 now", "555-0132", "[PHONE]"),
            ("call (020) 7946 0958", "7946", "[PHONE]"),
            ("card 4111 1111 1111 1111 ok", "4111", "[CARD]"),
            ("card 4111-1111-1111-1111", "1111", "[CARD]"),
            ("from 192.168.10.24", "192.168", "[IP]"),
            ("v6 2001:db8:85a3::8a2e:370:7334", "8a2e", "[IP]"),
            ("key sk-live_4eC39HqLyjWDarjtT1zdp7dc", "4eC39", "[SECRET]"),
            (
                "token ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",
                "aBcDe",
                "[SECRET]",
            ),
            ("the Project Nightingale files", "Nightingale", "[REDACTED]"),
        ];
        for (text, secret, tag) in cases {
            let out = r.redact(text);
            assert!(!out.contains(secret), "{text:?} → {out:?}");
            assert!(out.contains(tag), "{text:?} → {out:?}");
        }
        let plain = "The year 2024 had 365 days and 12 months.";
        assert_eq!(r.redact(plain), plain, "ordinary numbers stay");
    }

    #[test]
    fn an_invalid_pattern_is_refused_by_name() {
        let e = Redactor::new(&["(unclosed".into()]).unwrap_err();
        assert!(e.contains("(unclosed"), "{e}");
    }
}
