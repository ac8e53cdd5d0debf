//! Redaction of personal data before text is stored (shadow samples,
//! captured traffic): e-mail addresses, phone numbers, card numbers, IBANs,
//! US social security numbers, IP addresses and API-key-like strings, plus
//! the operator's own patterns. Each match becomes a bracketed tag naming
//! what was there, never a partial copy of it.
//!
//! The patterns err toward redacting: captured text is for training, where
//! a lost number costs little and a kept one is a leak. Known over-matches,
//! accepted:
//! - a 9-digit number that could be a social security number (area not
//!   000, 666 or 9xx; group not 00; serial not 0000) is `[SSN]`, so an
//!   order number like `123456789` is too. Numbers written with thousands
//!   separators (`123,456,789`) or of another length are untouched.
//! - a 10-digit number shaped like a North American number (area and
//!   exchange not starting with 0 or 1, optionally after a `1`), a 10- or
//!   11-digit number starting with a trunk `0`, and `+` followed by 8 to 15
//!   digits are `[PHONE]`. Unix timestamps in seconds (ten digits starting
//!   with 1) are spared; 13 digits and more are `[CARD]` anyway.
//! - two capital letters, two digits and 11 to 30 capitals or digits (an
//!   IBAN's shape; its checksum is not verified) are `[IBAN]`.

use regex::{Captures, Regex};

/// One built-in pattern: its tag, the expression, and a check a match must
/// also pass (for what a regular expression without look-around cannot say).
struct BuiltIn {
    tag: &'static str,
    pattern: &'static str,
    accept: Option<fn(&str) -> bool>,
}

const fn re(tag: &'static str, pattern: &'static str) -> BuiltIn {
    BuiltIn {
        tag,
        pattern,
        accept: None,
    }
}

/// Built-in patterns, applied in this order (the more specific first: an
/// e-mail before the generic key pattern, so a long local part does not
/// leave the domain behind; a card number before the phone patterns).
const BUILT_IN: &[BuiltIn] = &[
    re(
        "[SECRET]",
        r"(?i)\b(?:sk|pk|rk|ghp|gho|ghs|xox[abpr]|akia|bearer)[-_ ]?[A-Za-z0-9_\-]{10,}\b",
    ),
    // AWS access key ids: long-term (AKIA), temporary (ASIA) and the ids of
    // users, groups, roles and other principals (20 or more capitals and digits).
    re(
        "[SECRET]",
        r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA|ABIA|ACCA|ASCA)[A-Z0-9]{16,}\b",
    ),
    // Letters and digits of any script in the local part and the domain.
    re(
        "[EMAIL]",
        r"[\p{L}\p{M}\p{N}._%+\-]+@[\p{L}\p{M}\p{N}.\-]+\.\p{L}{2,}",
    ),
    // Written whole or in groups of four.
    re(
        "[IBAN]",
        r"\b[A-Z]{2}\d{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?)\b",
    ),
    re("[SECRET]", r"\b[A-Za-z0-9_\-+/]{32,}={0,2}"),
    re("[IP]", r"\b(?:\d{1,3}\.){3}\d{1,3}\b"),
    re("[IP]", r"(?i)\b(?:[0-9a-f]{1,4}:){2,7}[0-9a-f]{1,4}\b"),
    // E.164 before the card pattern, which would take its digits.
    re("[PHONE]", r"\+\d{8,15}\b"),
    re("[CARD]", r"\b(?:\d[ \-]?){12,18}\d\b"),
    BuiltIn {
        tag: "[SSN]",
        pattern: r"\b\d{3}-?\d{2}-?\d{4}\b",
        accept: Some(ssn),
    },
    re(
        "[PHONE]",
        r"(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{1,4}\)[\s.\-]?)?\d{2,4}[\s.\-]\d{2,4}[\s.\-]?\d{2,6}\b",
    ),
    // Without separators: North American, and national with a trunk 0.
    re("[PHONE]", r"\b1?[2-9]\d{2}[2-9]\d{6}\b"),
    re("[PHONE]", r"\b0[1-9]\d{8,9}\b"),
];

/// Whether `m` (`ddd-dd-dddd`, or nine digits) can be a US social security
/// number: the area is not 000, 666 or 9xx, the group not 00, the serial
/// not 0000. Dashes must be both there or both absent.
fn ssn(m: &str) -> bool {
    let dashes = m.bytes().filter(|&b| b == b'-').count();
    if dashes == 1 {
        return false;
    }
    let d: String = m.chars().filter(char::is_ascii_digit).collect();
    if d.len() != 9 {
        return false;
    }
    let (area, group, serial) = (&d[..3], &d[3..5], &d[5..]);
    area != "000" && area != "666" && !area.starts_with('9') && group != "00" && serial != "0000"
}

/// A compiled set of patterns.
#[derive(Debug, Clone)]
pub struct Redactor {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone)]
struct Pattern {
    tag: &'static str,
    re: Regex,
    accept: Option<fn(&str) -> bool>,
}

impl Redactor {
    /// The built-in patterns plus `extra` (each a regular expression whose
    /// matches become `[REDACTED]`). Fails on an invalid pattern.
    pub fn new(extra: &[String]) -> Result<Self, String> {
        let mut patterns = vec![];
        for b in BUILT_IN {
            patterns.push(Pattern {
                tag: b.tag,
                re: Regex::new(b.pattern).map_err(|e| e.to_string())?,
                accept: b.accept,
            });
        }
        for p in extra {
            let re = Regex::new(p).map_err(|e| format!("redaction pattern `{p}`: {e}"))?;
            patterns.push(Pattern {
                tag: "[REDACTED]",
                re,
                accept: None,
            });
        }
        Ok(Self { patterns })
    }

    /// `text` with every match replaced by its tag.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for p in &self.patterns {
            if !p.re.is_match(&out) {
                continue;
            }
            out = match p.accept {
                None => p.re.replace_all(&out, p.tag).into_owned(),
                Some(accept) => {
                    p.re.replace_all(&out, |c: &Captures| {
                        if accept(&c[0]) {
                            p.tag.to_string()
                        } else {
                            c[0].to_string()
                        }
                    })
                    .into_owned()
                }
            };
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
            // Phone numbers without separators: E.164, national with a
            // trunk 0, North American.
            ("text +14155550132 now", "4155550132", "[PHONE]"),
            ("ring 07911123456 after six", "07911123456", "[PHONE]"),
            ("my cell is 4155550132", "4155550132", "[PHONE]"),
            ("or 14155550132", "4155550132", "[PHONE]"),
            // IBANs, whole and in groups.
            (
                "pay DE89370400440532013000 now",
                "370400440532013000",
                "[IBAN]",
            ),
            ("pay DE89 3704 0044 0532 0130 00", "3704", "[IBAN]"),
            // Non-ASCII and very long local parts: nothing of the address stays.
            ("write josé.garcía@correo.es", "correo", "[EMAIL]"),
            ("write josé.garcía@correo.es", "jos", "[EMAIL]"),
            (
                "from firstname.middlename.lastname.department@corp.com",
                "corp.com",
                "[EMAIL]",
            ),
            // AWS access key ids: temporary and principal ids too.
            (
                "aws ASIAIOSFODNN7EXAMPLE temp",
                "IOSFODNN7EXAMPLE",
                "[SECRET]",
            ),
            (
                "aws AKIAIOSFODNN7EXAMPLE key",
                "IOSFODNN7EXAMPLE",
                "[SECRET]",
            ),
            ("group AGPAJSSL2QZXT7EXAMPL", "JSSL2QZXT7EXAMPL", "[SECRET]"),
            (
                "user AIDAJQABLZS4A3QDU576Q",
                "JQABLZS4A3QDU576Q",
                "[SECRET]",
            ),
            (
                "role AROA3XFRBF535PLBIFPI4",
                "3XFRBF535PLBIFPI4",
                "[SECRET]",
            ),
            // Social security numbers, with and without dashes.
            ("ssn 078-05-1120 on file", "1120", "[SSN]"),
            ("ssn 078051120 on file", "078051120", "[SSN]"),
        ];
        for (text, secret, tag) in cases {
            let out = r.redact(text);
            assert!(!out.contains(secret), "{text:?} → {out:?}");
            assert!(out.contains(tag), "{text:?} → {out:?}");
        }
        // Whole matches: nothing of the address or key is left beside the tag.
        for (text, want) in [
            ("write josé.garcía@correo.es", "write [EMAIL]"),
            (
                "from firstname.middlename.lastname.department@corp.com",
                "from [EMAIL]",
            ),
            ("aws ASIAIOSFODNN7EXAMPLE temp", "aws [SECRET] temp"),
            ("pay DE89370400440532013000 now", "pay [IBAN] now"),
            ("pay DE89 3704 0044 0532 0130 00", "pay [IBAN]"),
            ("text +14155550132 now", "text [PHONE] now"),
            ("ssn 078051120 on file", "ssn [SSN] on file"),
        ] {
            assert_eq!(r.redact(text), want, "{text:?}");
        }
        let plain = "The year 2024 had 365 days and 12 months.";
        assert_eq!(r.redact(plain), plain, "ordinary numbers stay");
        for plain in [
            "It took 31536000 seconds, order 1733600000 at 10:30, total 1,234,567.",
            "ticket 987654321, batch 000123456 and 3.14159",
            "Aida performances sold out; the ASIA tour too.",
        ] {
            assert_eq!(r.redact(plain), plain, "ordinary numbers and words stay");
        }
        // The accepted over-match (module docs): a 9-digit number that could
        // be a social security number is taken for one.
        assert_eq!(r.redact("order 123456789"), "order [SSN]");
    }

    #[test]
    fn an_invalid_pattern_is_refused_by_name() {
        let e = Redactor::new(&["(unclosed".into()]).unwrap_err();
        assert!(e.contains("(unclosed"), "{e}");
    }
}
