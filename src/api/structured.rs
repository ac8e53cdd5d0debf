//! Structured-output parameters of the OpenAI API: `response_format`
//! (`text`, `json_object`, `json_schema`) and vLLM's extensions
//! `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`, read
//! into one [`OutputConstraint`] (compiled later, by validation). Also the
//! gRPC `GenerateRequest.constraint` oneof.

use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use crate::engine::grammar::Constraint;
use crate::proto as pb;
use crate::validation::OutputConstraint;

/// The structured-output fields both generation endpoints take (flattened
/// into each request).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StructuredFields {
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {…}}`.
    pub response_format: Option<Value>,
    /// vLLM: a JSON schema (object, or its JSON text).
    pub guided_json: Option<Value>,
    /// vLLM: a regular expression the whole output matches.
    pub guided_regex: Option<Value>,
    /// vLLM: the output is exactly one of these strings.
    pub guided_choice: Option<Value>,
    /// vLLM: a grammar, in llguidance's Lark syntax.
    pub guided_grammar: Option<Value>,
}

fn string(param: &str, v: &Value) -> Result<String, ApiError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| ApiError::invalid(param, format!("{param} must be a string")))
}

/// A schema given as an object (or `true`), or as its JSON text.
fn schema(param: &str, v: &Value) -> Result<Value, ApiError> {
    match v {
        Value::Object(_) | Value::Bool(_) => Ok(v.clone()),
        Value::String(s) => serde_json::from_str(s)
            .map_err(|e| ApiError::invalid(param, format!("{param} is not valid JSON: {e}"))),
        _ => Err(ApiError::invalid(
            param,
            format!("{param} must be a JSON schema (an object)"),
        )),
    }
}

impl StructuredFields {
    /// The one constraint asked for, if any; two at once is an error, as is
    /// a malformed one (named by its parameter).
    pub fn constraint(&self) -> Result<Option<OutputConstraint>, ApiError> {
        let mut found: Vec<OutputConstraint> = vec![];
        let mut add = |param: &str, constraint: Constraint| {
            found.push(OutputConstraint {
                param: param.to_string(),
                constraint,
            })
        };
        if let Some(rf) = self.response_format.as_ref().filter(|v| !v.is_null()) {
            const P: &str = "response_format";
            match rf.get("type").and_then(Value::as_str) {
                Some("text") => {}
                Some("json_object") => add(P, Constraint::JsonObject),
                Some("json_schema") => {
                    let js = rf.get("json_schema").ok_or_else(|| {
                        ApiError::invalid(
                            P,
                            "response_format.json_schema is required with type json_schema",
                        )
                    })?;
                    if !js.is_object() {
                        return Err(ApiError::invalid(
                            P,
                            "response_format.json_schema must be an object with `name` and `schema`",
                        ));
                    }
                    let s = match js.get("schema") {
                        // No schema: any JSON value.
                        None | Some(Value::Null) => serde_json::json!({}),
                        Some(s) => schema(P, s)?,
                    };
                    add(P, Constraint::JsonSchema(s))
                }
                other => {
                    return Err(ApiError::invalid(
                        P,
                        format!(
                            "response_format.type must be text, json_object or json_schema, got {}",
                            other.map_or("nothing".to_string(), |t| format!("`{t}`"))
                        ),
                    ));
                }
            }
        }
        if let Some(v) = self.guided_json.as_ref().filter(|v| !v.is_null()) {
            add(
                "guided_json",
                Constraint::JsonSchema(schema("guided_json", v)?),
            );
        }
        if let Some(v) = self.guided_regex.as_ref().filter(|v| !v.is_null()) {
            add(
                "guided_regex",
                Constraint::Regex(string("guided_regex", v)?),
            );
        }
        if let Some(v) = self.guided_choice.as_ref().filter(|v| !v.is_null()) {
            let bad =
                || ApiError::invalid("guided_choice", "guided_choice must be a list of strings");
            let choices = v
                .as_array()
                .ok_or_else(bad)?
                .iter()
                .map(|c| c.as_str().map(str::to_string).ok_or_else(bad))
                .collect::<Result<Vec<_>, _>>()?;
            add("guided_choice", Constraint::Choice(choices));
        }
        if let Some(v) = self.guided_grammar.as_ref().filter(|v| !v.is_null()) {
            add(
                "guided_grammar",
                Constraint::Lark(string("guided_grammar", v)?),
            );
        }
        if found.len() > 1 {
            let names: Vec<&str> = found.iter().map(|c| c.param.as_str()).collect();
            return Err(ApiError::invalid(
                &found[1].param,
                format!(
                    "only one output constraint may be given, got {}",
                    names.join(" and ")
                ),
            ));
        }
        Ok(found.pop())
    }
}

/// A tool error as the API's 400.
pub fn tool_error(e: crate::tools::ToolError) -> ApiError {
    ApiError::invalid(e.param, e.message)
}

/// Puts a request's tools on its spec: the tools the template shows, and
/// the constraint `required` or a named function compiles to (refused next
/// to another output constraint: the output cannot match both).
pub fn with_tools(
    spec: &mut crate::validation::GenerationSpec,
    tools: &crate::tools::Tools,
) -> Result<(), ApiError> {
    spec.tools = tools.for_template();
    if let Some(constraint) = tools.constraint() {
        if let Some(other) = &spec.constraint {
            return Err(ApiError::invalid(
                "tool_choice",
                format!(
                    "a required or named tool_choice cannot be combined with {}",
                    other.param
                ),
            ));
        }
        spec.constraint = Some(OutputConstraint {
            param: "tools".into(),
            constraint,
        });
    }
    Ok(())
}

/// The constraint of a gRPC `GenerateRequest`, if any.
pub fn from_proto(
    c: Option<&pb::generate_request::Constraint>,
) -> Result<Option<OutputConstraint>, ApiError> {
    use pb::generate_request::Constraint as C;
    let Some(c) = c else { return Ok(None) };
    let (param, constraint) = match c {
        C::JsonObject(_) => ("json_object", Constraint::JsonObject),
        C::JsonSchema(s) => (
            "json_schema",
            Constraint::JsonSchema(schema("json_schema", &Value::String(s.clone()))?),
        ),
        C::Regex(r) => ("regex", Constraint::Regex(r.clone())),
        C::Choice(c) => ("choice", Constraint::Choice(c.choices.clone())),
        C::Grammar(g) => ("grammar", Constraint::Lark(g.clone())),
    };
    Ok(Some(OutputConstraint {
        param: param.to_string(),
        constraint,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(v: Value) -> StructuredFields {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn each_parameter_reads_into_its_constraint() {
        let c = |v| fields(v).constraint().unwrap().map(|c| c.constraint);
        assert_eq!(
            c(serde_json::json!({"response_format": {"type": "text"}})),
            None
        );
        assert_eq!(
            c(serde_json::json!({"response_format": {"type": "json_object"}})),
            Some(Constraint::JsonObject)
        );
        assert_eq!(
            c(
                serde_json::json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}, "strict": true}}})
            ),
            Some(Constraint::JsonSchema(
                serde_json::json!({"type": "integer"})
            ))
        );
        assert_eq!(
            c(serde_json::json!({"guided_choice": ["a", "b"]})),
            Some(Constraint::Choice(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            c(serde_json::json!({"guided_json": "{\"type\": \"string\"}"})),
            Some(Constraint::JsonSchema(
                serde_json::json!({"type": "string"})
            ))
        );
    }

    #[test]
    fn two_constraints_or_a_malformed_one_are_refused_by_name() {
        let e = |v| fields(v).constraint().unwrap_err().to_string();
        assert!(
            e(serde_json::json!({"guided_regex": "a", "guided_choice": ["a"]}))
                .contains("only one")
        );
        assert!(e(serde_json::json!({"response_format": {"type": "xml"}})).contains("`xml`"));
        assert!(e(serde_json::json!({"guided_choice": [1]})).contains("list of strings"));
    }
}
