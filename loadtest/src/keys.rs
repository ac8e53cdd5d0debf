//! What a request says about who sends it: the session key the canary split
//! keeps on one side (`x-llmops-route-key`), the OpenAI `user`, and extra
//! headers (gRPC metadata).

use std::str::FromStr;

use reqwest::header::{HeaderName, HeaderValue};
use tonic::metadata::{Ascii, MetadataKey, MetadataValue};

/// The header (gRPC metadata) that names a request's session for the canary split.
pub const ROUTE_KEY_HEADER: &str = "x-llmops-route-key";

/// Session `k`'s key: `s-<k>`.
pub fn session_key(k: u64) -> String {
    format!("s-{k}")
}

/// User `k`'s id: `u-<k>`.
pub fn user_id(k: u64) -> String {
    format!("u-{k}")
}

/// An extra header sent with every request (HTTP header, gRPC metadata).
///
/// The name is lower-cased; both forms are checked when the header is made,
/// so a `Header` is always valid on either protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    name: String,
    value: String,
}

impl Header {
    /// A header, checked as an HTTP header and as ASCII gRPC metadata.
    pub fn new(name: &str, value: &str) -> anyhow::Result<Self> {
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim();
        if name.is_empty() {
            anyhow::bail!("the header name is empty");
        }
        HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| anyhow::anyhow!("`{name}` is not a valid header name"))?;
        HeaderValue::from_str(value)
            .map_err(|_| anyhow::anyhow!("the value of `{name}` is not a valid header value"))?;
        MetadataKey::<Ascii>::from_bytes(name.as_bytes()).map_err(|_| {
            anyhow::anyhow!(
                "`{name}` is not valid gRPC ASCII metadata (binary `-bin` keys are not supported)"
            )
        })?;
        MetadataValue::<Ascii>::try_from(value).map_err(|_| {
            anyhow::anyhow!("the value of `{name}` is not valid gRPC ASCII metadata")
        })?;
        Ok(Self {
            name,
            value: value.to_string(),
        })
    }

    /// The name, lower case.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value, trimmed.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// As an HTTP header.
    pub(crate) fn http(&self) -> anyhow::Result<(HeaderName, HeaderValue)> {
        Ok((
            HeaderName::from_bytes(self.name.as_bytes())?,
            HeaderValue::from_str(&self.value)?,
        ))
    }

    /// As gRPC metadata.
    pub(crate) fn grpc(&self) -> anyhow::Result<(MetadataKey<Ascii>, MetadataValue<Ascii>)> {
        let key = MetadataKey::<Ascii>::from_bytes(self.name.as_bytes())
            .map_err(|_| anyhow::anyhow!("`{}` is not valid gRPC metadata", self.name))?;
        let value = MetadataValue::<Ascii>::try_from(self.value.as_str()).map_err(|_| {
            anyhow::anyhow!("the value of `{}` is not valid gRPC metadata", self.name)
        })?;
        Ok((key, value))
    }
}

/// `NAME:VALUE` (as curl's `-H`; spaces around the value are dropped).
impl FromStr for Header {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (name, value) = s
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("expected NAME:VALUE, got `{s}`"))?;
        Header::new(name, value)
    }
}

/// Serializes headers by name only: values may be credentials.
pub(crate) fn header_names<S: serde::Serializer>(h: &[Header], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(h.iter().map(Header::name))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_as_curl_writes_them_and_bad_ones_are_refused() {
        let h: Header = "X-Tenant: blue team".parse().unwrap();
        assert_eq!((h.name(), h.value()), ("x-tenant", "blue team"));
        let h: Header = "x-empty:".parse().unwrap();
        assert_eq!((h.name(), h.value()), ("x-empty", ""));
        let h: Header = "x-url:http://a:1".parse().unwrap();
        assert_eq!(h.value(), "http://a:1", "split at the first colon");
        for bad in [
            "no-colon",
            ": value",
            "bad name: v",
            "x-bin-bin: v",
            "x-ctl: a\u{7}b",
        ] {
            assert!(bad.parse::<Header>().is_err(), "{bad:?} was accepted");
        }
        assert!(h.http().is_ok() && h.grpc().is_ok());
    }

    #[test]
    fn keys_are_named_by_index() {
        assert_eq!(session_key(3), "s-3");
        assert_eq!(user_id(0), "u-0");
    }
}
