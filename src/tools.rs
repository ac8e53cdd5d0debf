//! Tool calls (function calling), wire-neutral, for both front ends: the
//! functions a request offers ([`Function`]) and how the model must use
//! them ([`ToolChoice`]), gathered in [`Tools`]; the output constraint that
//! enforces `required` and a named function ([`Tools::constraint`]); the
//! system-prompt rendering for chat templates without tool syntax
//! ([`fallback_messages`]); and the parsers that read calls out of a
//! model's text, per model family ([`parse`]).
//!
//! What the model writes, by `tool_choice`:
//! - a named function: its arguments, a JSON object valid for the
//!   function's `parameters` (the grammar allows nothing else);
//! - `required`: a JSON list of `{"name", "arguments"}` objects, one of the
//!   offered functions each (one at most without `parallel_tool_calls`,
//!   [`MAX_PARALLEL_CALLS`] at most with it, so that a model that keeps
//!   adding calls ends well before `max_tokens`);
//! - `auto`: whatever it likes; calls are read back by the family's syntax
//!   (Hermes/Qwen `<tool_call>…</tool_call>`, Mistral `[TOOL_CALLS]`, Llama 3
//!   `{"name", "parameters"}`), else as generic JSON (`{"name",
//!   "arguments"}` or a list of them, as the fallback prompt asks); text that
//!   holds no call of an offered function is the answer's content;
//! - `none`: plain text (the tools are not shown to the model).

use serde_json::{Value, json};

use crate::engine::Message;
use crate::engine::grammar::Constraint;

/// The most functions one request may offer.
pub const MAX_TOOLS: usize = 128;

/// The most calls one `required` answer may make with
/// `parallel_tool_calls`: the grammar closes the list after this many.
pub const MAX_PARALLEL_CALLS: usize = 8;

/// A request's tool error: the parameter to name and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ToolError {
    /// `tools`, `tool_choice` or `messages`.
    pub param: &'static str,
    /// The message for the client.
    pub message: String,
}

fn err(param: &'static str, message: impl Into<String>) -> ToolError {
    ToolError {
        param,
        message: message.into(),
    }
}

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    /// Its name (`[A-Za-z0-9_-]`, at most 64 characters, as OpenAI's).
    pub name: String,
    /// What it does, for the model.
    pub description: Option<String>,
    /// The JSON schema of its arguments (an object schema).
    pub parameters: Value,
}

impl Function {
    /// Reads a tool as chat completions send it (`{"type": "function",
    /// "function": {"name", "description", "parameters"}}`) or as the
    /// Responses API does (`{"type": "function", "name", …}`). `at` names
    /// it in errors (`tools[2]`).
    pub fn from_wire(v: &Value, at: &str) -> Result<Self, ToolError> {
        let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "function" {
            return Err(err(
                "tools",
                format!("{at}.type must be `function`, got `{kind}`"),
            ));
        }
        let f = v.get("function").unwrap_or(v);
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| err("tools", format!("{at}: a function needs a `name`")))?;
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(err(
                "tools",
                format!("{at}.name `{name}` must be 1 to 64 of a-z, A-Z, 0-9, _ and -"),
            ));
        }
        let parameters = match f.get("parameters") {
            // No parameters: a function that takes none.
            None | Some(Value::Null) => {
                json!({"type": "object", "properties": {}, "additionalProperties": false})
            }
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => {
                return Err(err(
                    "tools",
                    format!("{at}.parameters must be a JSON schema (an object)"),
                ));
            }
        };
        Ok(Self {
            name: name.to_string(),
            description: f
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_string),
            parameters,
        })
    }

    /// The form chat templates read (OpenAI's chat `tools` entry).
    pub fn to_template(&self) -> Value {
        let mut f = json!({"name": self.name});
        if let Some(d) = &self.description {
            f["description"] = json!(d);
        }
        f["parameters"] = self.parameters.clone();
        json!({"type": "function", "function": f})
    }
}

/// How the model must use the tools.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ToolChoice {
    /// Never call one (the tools are not shown).
    None,
    /// Call one or answer, as the model decides (the default with tools).
    #[default]
    Auto,
    /// Call at least one.
    Required,
    /// Call this one.
    Named(String),
}

impl ToolChoice {
    /// Reads `tool_choice`: `"none" | "auto" | "required"`, or a named
    /// function as chat completions (`{"type": "function", "function":
    /// {"name"}}`) or the Responses API (`{"type": "function", "name"}`)
    /// send it.
    pub fn from_wire(v: Option<&Value>) -> Result<Option<Self>, ToolError> {
        let bad = || {
            err(
                "tool_choice",
                "tool_choice must be `none`, `auto`, `required` or {\"type\": \"function\", \"function\": {\"name\": …}}",
            )
        };
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => match s.as_str() {
                "none" => Ok(Some(Self::None)),
                "auto" => Ok(Some(Self::Auto)),
                "required" => Ok(Some(Self::Required)),
                _ => Err(bad()),
            },
            Some(o @ Value::Object(_)) => {
                if o.get("type").and_then(Value::as_str) != Some("function") {
                    return Err(bad());
                }
                let name = o
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .or_else(|| o.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(bad)?;
                Ok(Some(Self::Named(name.to_string())))
            }
            Some(_) => Err(bad()),
        }
    }
}

/// A request's tools, checked: the functions, the choice, whether several
/// calls may come at once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tools {
    /// The functions offered.
    pub functions: Vec<Function>,
    /// How the model must use them.
    pub choice: ToolChoice,
    /// Several calls in one answer (`parallel_tool_calls`, default true).
    pub parallel: bool,
}

impl Tools {
    /// Checks the wire's `tools`, `tool_choice` and `parallel_tool_calls`:
    /// names unique, a named choice among the tools (an unknown one is a
    /// 400 naming `tool_choice`), `required` or a name only with tools.
    pub fn from_wire(
        tools: Option<&[Value]>,
        choice: Option<&Value>,
        parallel: Option<bool>,
    ) -> Result<Self, ToolError> {
        let tools = tools.unwrap_or_default();
        if tools.len() > MAX_TOOLS {
            return Err(err(
                "tools",
                format!(
                    "{} tools were given; at most {MAX_TOOLS} are allowed",
                    tools.len()
                ),
            ));
        }
        let functions = tools
            .iter()
            .enumerate()
            .map(|(i, t)| Function::from_wire(t, &format!("tools[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, f) in functions.iter().enumerate() {
            if functions[..i].iter().any(|g| g.name == f.name) {
                return Err(err(
                    "tools",
                    format!("tools[{i}]: the name `{}` is used twice", f.name),
                ));
            }
        }
        let choice = match ToolChoice::from_wire(choice)? {
            Some(c) => c,
            None if functions.is_empty() => ToolChoice::None,
            None => ToolChoice::Auto,
        };
        match &choice {
            ToolChoice::Required if functions.is_empty() => {
                return Err(err(
                    "tool_choice",
                    "tool_choice `required` needs at least one tool in `tools`",
                ));
            }
            ToolChoice::Named(n) if !functions.iter().any(|f| &f.name == n) => {
                return Err(err(
                    "tool_choice",
                    format!("tool_choice names the function `{n}`, which is not in `tools`"),
                ));
            }
            _ => {}
        }
        Ok(Self {
            functions,
            choice,
            parallel: parallel.unwrap_or(true),
        })
    }

    /// Whether the model may call a tool at all.
    pub fn active(&self) -> bool {
        !self.functions.is_empty() && self.choice != ToolChoice::None
    }

    /// The tools as the chat template (or the fallback prompt) shows them:
    /// none with `tool_choice: none`.
    pub fn for_template(&self) -> Vec<Value> {
        if !self.active() {
            return vec![];
        }
        self.functions.iter().map(Function::to_template).collect()
    }

    /// The output constraint that enforces `required` (a list of calls of
    /// the offered functions, each `{"name", "arguments"}` with arguments
    /// valid for its schema) or a named function (its arguments); none for
    /// `auto` and `none`.
    pub fn constraint(&self) -> Option<Constraint> {
        match &self.choice {
            ToolChoice::None | ToolChoice::Auto => None,
            ToolChoice::Named(n) => self
                .functions
                .iter()
                .find(|f| &f.name == n)
                .map(|f| Constraint::JsonSchema(f.parameters.clone())),
            ToolChoice::Required => {
                let calls: Vec<Value> = self
                    .functions
                    .iter()
                    .map(|f| {
                        json!({
                            "type": "object",
                            "properties": {
                                "name": {"const": f.name},
                                "arguments": f.parameters,
                            },
                            "required": ["name", "arguments"],
                            "additionalProperties": false,
                        })
                    })
                    .collect();
                let mut list = json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}});
                list["maxItems"] = json!(if self.parallel { MAX_PARALLEL_CALLS } else { 1 });
                Some(Constraint::JsonSchema(list))
            }
        }
    }
}

/// An assistant's tool call from a request's history, in the form chat
/// templates read: `arguments` decoded from its JSON text to an object
/// when it holds one (as vLLM passes them; templates `tojson` them).
pub fn history_call(c: &Value) -> Result<Value, String> {
    let f = c
        .get("function")
        .ok_or("a tool call needs a `function` with `name` and `arguments`")?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or("a tool call's function needs a `name`")?;
    let arguments = match f.get("arguments") {
        None | Some(Value::Null) => json!({}),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => v,
            _ => Value::String(s.clone()),
        },
        Some(v) => v.clone(),
    };
    let mut out = json!({
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    });
    if let Some(id) = c.get("id").and_then(Value::as_str) {
        out["id"] = json!(id);
    }
    Ok(out)
}

/// The system prompt that describes tools to a model whose chat template
/// has no tool syntax.
pub fn fallback_prompt(tools: &[Value]) -> String {
    let mut s = String::from(
        "You can call the following functions. To call one, answer with only a JSON object \
         {\"name\": <function name>, \"arguments\": <object of its arguments>}, or a JSON list \
         of such objects to call several; otherwise answer normally.\n\nFunctions:",
    );
    for t in tools {
        s.push('\n');
        s.push_str(&serde_json::to_string(t.get("function").unwrap_or(t)).unwrap_or_default());
    }
    s
}

/// A conversation with tools rewritten for a chat template that has no
/// tool syntax (the documented fallback): the tools described in a system
/// message (the first one, extended, or a new one); an assistant's tool
/// calls written into its content as the JSON list the prompt asks for;
/// each run of `tool` messages one `user` message of JSON results
/// (`{"tool_call_id", "name", "content"}` a line), so templates that want
/// user and assistant turns to alternate still render it.
pub fn fallback_messages(messages: &[Message], tools: &[Value]) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::with_capacity(messages.len() + 1);
    let mut rest = messages;
    if !tools.is_empty() {
        let prompt = fallback_prompt(tools);
        match messages.split_first() {
            Some((m, tail)) if m.role == "system" || m.role == "developer" => {
                out.push(Message::new(
                    m.role.clone(),
                    format!("{}\n\n{prompt}", m.content),
                ));
                rest = tail;
            }
            _ => out.push(Message::new("system", prompt)),
        }
    }
    let mut names: std::collections::HashMap<String, String> = Default::default();
    for m in rest {
        if !m.tool_calls.is_empty() {
            let calls: Vec<Value> = m
                .tool_calls
                .iter()
                .map(|c| {
                    let f = &c["function"];
                    if let (Some(id), Some(n)) = (c["id"].as_str(), f["name"].as_str()) {
                        names.insert(id.to_string(), n.to_string());
                    }
                    json!({"name": f["name"], "arguments": f["arguments"]})
                })
                .collect();
            let calls = serde_json::to_string(&calls).unwrap_or_default();
            let content = if m.content.is_empty() {
                calls
            } else {
                format!("{}\n{calls}", m.content)
            };
            out.push(Message::new(m.role.clone(), content));
        } else if m.role == "tool" {
            let id = m.tool_call_id.clone().unwrap_or_default();
            let mut result = json!({"tool_call_id": id});
            if let Some(n) = names.get(&id) {
                result["name"] = json!(n);
            }
            result["content"] = json!(m.content);
            let line = serde_json::to_string(&result).unwrap_or_default();
            match out.last_mut() {
                Some(last) if last.role == "user" && last.content.starts_with(TOOL_RESULTS) => {
                    last.content.push('\n');
                    last.content.push_str(&line);
                }
                _ => out.push(Message::new("user", format!("{TOOL_RESULTS}\n{line}"))),
            }
        } else {
            out.push(Message::new(m.role.clone(), m.content.clone()));
        }
    }
    out
}

/// How the fallback opens a user message of tool results.
const TOOL_RESULTS: &str = "Function results:";

/// A tool call read from a model's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// The function's name (always one of the offered functions).
    pub name: String,
    /// Its arguments, JSON text (as OpenAI's `arguments`).
    pub arguments: String,
}

/// How a model family writes tool calls (read from its chat template).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Hermes and Qwen: `<tool_call>{"name", "arguments"}</tool_call>`.
    Hermes,
    /// Mistral: `[TOOL_CALLS][{"name", "arguments"}, …]`, or
    /// `[TOOL_CALLS]name[ARGS]{…}` in newer templates.
    Mistral,
    /// Llama 3.x: `{"name", "parameters"}` (after `<|python_tag|>`), `;`
    /// between several.
    Llama3,
    /// Gemma and every other template (and the fallback prompt): a JSON
    /// object `{"name", "arguments"}` or a list of them.
    Generic,
}

impl Family {
    /// The family whose syntax a chat template uses.
    pub fn of_template(source: &str) -> Self {
        if source.contains("<tool_call>") {
            Self::Hermes
        } else if source.contains("[TOOL_CALLS]") {
            Self::Mistral
        } else if source.contains("<|python_tag|>") || source.contains("ipython") {
            Self::Llama3
        } else {
            Self::Generic
        }
    }
}

/// A model's output read for tool calls: the content left, the calls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// Text that is no call (`None` when the whole output was calls).
    pub content: Option<String>,
    /// The calls, in order.
    pub calls: Vec<ToolCall>,
}

impl Parsed {
    fn text(text: &str) -> Self {
        Self {
            content: Some(text.to_string()),
            calls: vec![],
        }
    }
}

/// Reads a finished output for tool calls (see the module for what each
/// choice makes the model write). A call of a function that was not
/// offered, or text that does not parse, leaves the whole output content.
pub fn parse(tools: &Tools, family: Family, text: &str) -> Parsed {
    if !tools.active() {
        return Parsed::text(text);
    }
    let offered = |calls: Vec<ToolCall>| {
        (!calls.is_empty()
            && calls
                .iter()
                .all(|c| tools.functions.iter().any(|f| f.name == c.name)))
        .then_some(calls)
    };
    match &tools.choice {
        ToolChoice::None | ToolChoice::Auto => {}
        ToolChoice::Named(name) => {
            return match serde_json::from_str::<Value>(text.trim()) {
                Ok(v @ Value::Object(_)) => Parsed {
                    content: None,
                    calls: vec![ToolCall {
                        name: name.clone(),
                        arguments: v.to_string(),
                    }],
                },
                // Cut short by max_tokens: what there is, as text.
                _ => Parsed::text(text),
            };
        }
        ToolChoice::Required => {
            return match generic(text).and_then(offered) {
                Some(calls) => Parsed {
                    content: None,
                    calls,
                },
                None => Parsed::text(text),
            };
        }
    }
    let (before, calls) = match family {
        Family::Hermes => hermes(text),
        Family::Mistral => mistral(text),
        Family::Llama3 => (String::new(), llama3(text)),
        Family::Generic => (String::new(), None),
    };
    let (before, calls) = match calls.and_then(offered) {
        Some(c) => (before, Some(c)),
        None => (String::new(), generic(text).and_then(offered)),
    };
    match calls {
        Some(calls) => Parsed {
            content: (!before.trim().is_empty()).then(|| before.trim().to_string()),
            calls,
        },
        None => Parsed::text(text),
    }
}

/// One call from a JSON object with `name` and `arguments` (or Llama's
/// `parameters`); arguments given as JSON text are taken as they are.
fn call(v: &Value) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v.get("arguments").or_else(|| v.get("parameters"))?;
    let arguments = match args {
        Value::String(s) if serde_json::from_str::<Value>(s).is_ok_and(|a| a.is_object()) => {
            s.clone()
        }
        Value::Object(_) => args.to_string(),
        _ => return None,
    };
    Some(ToolCall { name, arguments })
}

/// Calls from one JSON value: an object or a list of objects.
fn calls_of(v: &Value) -> Option<Vec<ToolCall>> {
    match v {
        Value::Object(_) => Some(vec![call(v)?]),
        Value::Array(items) if !items.is_empty() => items.iter().map(call).collect(),
        _ => None,
    }
}

/// The whole output as JSON calls (a Markdown code fence allowed around).
fn generic(text: &str) -> Option<Vec<ToolCall>> {
    let mut t = text.trim();
    if let Some(rest) = t.strip_prefix("```") {
        let rest = rest.strip_prefix("json").unwrap_or(rest);
        t = rest.strip_suffix("```").unwrap_or(rest).trim();
    }
    calls_of(&serde_json::from_str(t).ok()?)
}

/// `<tool_call>…</tool_call>` blocks (the last may be cut short of its
/// closing tag); the text before the first is content.
fn hermes(text: &str) -> (String, Option<Vec<ToolCall>>) {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let Some(first) = text.find(OPEN) else {
        return (String::new(), None);
    };
    let mut calls = vec![];
    let mut rest = &text[first..];
    while let Some(body) = rest.strip_prefix(OPEN) {
        let (inner, next) = match body.find(CLOSE) {
            Some(end) => (&body[..end], &body[end + CLOSE.len()..]),
            None => (body, ""),
        };
        match serde_json::from_str::<Value>(inner.trim())
            .ok()
            .and_then(|v| call(&v))
        {
            Some(c) => calls.push(c),
            None => return (String::new(), None),
        }
        rest = next.trim_start();
    }
    if !rest.is_empty() {
        return (String::new(), None);
    }
    (text[..first].to_string(), Some(calls))
}

/// `[TOOL_CALLS]` then a JSON list, or `name[ARGS]{…}` repeated; the text
/// before is content.
fn mistral(text: &str) -> (String, Option<Vec<ToolCall>>) {
    const MARK: &str = "[TOOL_CALLS]";
    let Some(at) = text.find(MARK) else {
        return (String::new(), None);
    };
    let before = text[..at].to_string();
    let body = text[at + MARK.len()..].trim();
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        return (before, calls_of(&v));
    }
    let mut calls = vec![];
    for part in body.split(MARK) {
        let Some((name, args)) = part.split_once("[ARGS]") else {
            return (String::new(), None);
        };
        if serde_json::from_str::<Value>(args.trim()).is_ok_and(|a| a.is_object()) {
            calls.push(ToolCall {
                name: name.trim().to_string(),
                arguments: args.trim().to_string(),
            });
        } else {
            return (String::new(), None);
        }
    }
    (before, Some(calls))
}

/// Llama 3.x: `{"name", "parameters"}` objects, `;` between them, after an
/// optional `<|python_tag|>`.
fn llama3(text: &str) -> Option<Vec<ToolCall>> {
    let t = text.trim();
    let t = t.strip_prefix("<|python_tag|>").unwrap_or(t).trim();
    let mut calls = vec![];
    let mut pos = 0;
    while pos < t.len() {
        let mut values = serde_json::Deserializer::from_str(&t[pos..]).into_iter::<Value>();
        let v = values.next()?.ok()?;
        calls.extend(calls_of(&v)?);
        pos += values.byte_offset();
        let rest = t[pos..].trim_start();
        let rest = rest.strip_prefix(';').unwrap_or(rest).trim_start();
        pos = t.len() - rest.len();
    }
    (!calls.is_empty()).then_some(calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(choice: Value) -> Tools {
        let t = vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}),
            json!({"type": "function", "name": "get_time"}),
        ];
        Tools::from_wire(Some(&t), Some(&choice), None).unwrap()
    }

    #[test]
    fn an_unknown_function_in_tool_choice_is_refused_naming_tool_choice() {
        let t = vec![json!({"type": "function", "function": {"name": "f"}})];
        let e = Tools::from_wire(
            Some(&t),
            Some(&json!({"type": "function", "function": {"name": "g"}})),
            None,
        )
        .unwrap_err();
        assert_eq!(e.param, "tool_choice");
        assert!(e.message.contains("`g`"), "{e}");
        let e = Tools::from_wire(None, Some(&json!("required")), None).unwrap_err();
        assert_eq!(e.param, "tool_choice");
    }

    #[test]
    fn required_and_named_choices_become_json_schema_constraints() {
        let Some(Constraint::JsonSchema(s)) = tools(json!("required")).constraint() else {
            panic!("a schema")
        };
        assert_eq!(s["type"], "array");
        assert_eq!(
            s["items"]["anyOf"][0]["properties"]["name"]["const"],
            "get_weather"
        );
        let named = tools(json!({"type": "function", "function": {"name": "get_weather"}}));
        let Some(Constraint::JsonSchema(s)) = named.constraint() else {
            panic!("a schema")
        };
        assert_eq!(s["required"][0], "city");
        assert_eq!(tools(json!("auto")).constraint(), None);
    }

    /// Writes what `tools` requires while always opening another call when
    /// the grammar lets it (and closing every string and object at once):
    /// the longest answer the constraint allows. Returns the calls.
    fn greediest_required_answer(t: &Tools) -> Vec<Value> {
        use crate::engine::grammar::{Grammar, GrammarEnv};
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default/tokenizer.json");
        let tok = crate::engine::Tokenizer::from_file(&path, Some(0), vec![1]).unwrap();
        let env = std::sync::Arc::new(GrammarEnv::new(&tok, tok.vocab_size()).unwrap());
        let text: Vec<String> = (0..tok.vocab_size() as u32)
            .map(|id| tok.decode(&[id]).unwrap_or_default())
            .collect();
        let mut g = Grammar::new(
            env.compile(&t.constraint().unwrap()).unwrap(),
            metrics::Histogram::noop(),
        );
        let mut out = vec![];
        while !g.is_finished() {
            assert!(out.len() < 2000, "the grammar never closed the list");
            let mut row = vec![0.0f32; tok.vocab_size()];
            g.mask_row(&mut row).unwrap();
            let allowed = |id: &usize| row[*id].is_finite();
            let id = [",", "\"", "}", "]"]
                .iter()
                .find_map(|want| (0..row.len()).filter(allowed).find(|&i| text[i] == *want))
                .or_else(|| (0..row.len()).find(allowed))
                .unwrap() as u32;
            g.commit(id).unwrap();
            out.push(id);
        }
        let ids: Vec<u32> = out.into_iter().filter(|&t| t != 1).collect();
        let written = tok.decode(&ids).unwrap();
        match serde_json::from_str::<Value>(&written) {
            Ok(Value::Array(calls)) => calls,
            other => panic!("not a list of calls: {written:?} ({other:?})"),
        }
    }

    #[test]
    fn a_required_answer_that_keeps_adding_calls_is_closed_after_the_limit() {
        let mut t = tools(json!("required"));
        let calls = greediest_required_answer(&t);
        assert_eq!(calls.len(), MAX_PARALLEL_CALLS, "{calls:?}");
        assert!(
            calls.iter().all(|c| c["arguments"].is_object()),
            "{calls:?}"
        );
        t.parallel = false;
        assert_eq!(greediest_required_answer(&t).len(), 1);
    }

    #[test]
    fn each_family_syntax_parses_into_calls_of_offered_functions() {
        let t = tools(json!("auto"));
        let one = |name: &str, args: &str| ToolCall {
            name: name.into(),
            arguments: args.into(),
        };
        let p = parse(
            &t,
            Family::Hermes,
            "Sure.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        );
        assert_eq!(p.content.as_deref(), Some("Sure."));
        assert_eq!(p.calls, vec![one("get_weather", r#"{"city":"Paris"}"#)]);
        let p = parse(
            &t,
            Family::Mistral,
            r#"[TOOL_CALLS][{"name": "get_time", "arguments": {}}]"#,
        );
        assert_eq!(p.calls, vec![one("get_time", "{}")]);
        let p = parse(
            &t,
            Family::Mistral,
            r#"[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}"#,
        );
        assert_eq!(p.calls, vec![one("get_weather", r#"{"city": "Oslo"}"#)]);
        let p = parse(
            &t,
            Family::Llama3,
            r#"<|python_tag|>{"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": {"city": "Rome"}}"#,
        );
        assert_eq!(p.calls.len(), 2);
        let p = parse(
            &t,
            Family::Generic,
            "```json\n{\"name\": \"get_time\", \"arguments\": {}}\n```",
        );
        assert_eq!(p.calls, vec![one("get_time", "{}")]);
        // Not a call of an offered function: content.
        let p = parse(
            &t,
            Family::Generic,
            r#"{"name": "launch", "arguments": {}}"#,
        );
        assert!(p.calls.is_empty());
        assert!(p.content.is_some());
        // tool_choice none: never parsed.
        let p = parse(
            &tools(json!("none")),
            Family::Generic,
            r#"{"name": "get_time", "arguments": {}}"#,
        );
        assert!(p.calls.is_empty());
    }

    #[test]
    fn the_fallback_rendering_describes_tools_and_folds_tool_turns_into_user_turns() {
        let t = tools(json!("auto")).for_template();
        let history = vec![
            Message::new("user", "weather in Paris?"),
            Message {
                role: "assistant".into(),
                tool_calls: vec![
                    history_call(&json!({"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}))
                        .unwrap(),
                ],
                ..Default::default()
            },
            Message {
                role: "tool".into(),
                content: "21 C".into(),
                tool_call_id: Some("call_1".into()),
                ..Default::default()
            },
        ];
        let out = fallback_messages(&history, &t);
        let roles: Vec<&str> = out.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert!(out[0].content.contains("get_weather"));
        assert!(
            out[2].content.contains(r#""arguments":{"city":"Paris"}"#),
            "{}",
            out[2].content
        );
        assert!(out[3].content.contains(r#""name":"get_weather""#));
        // An existing system message is extended, not duplicated.
        let mut with_system = vec![Message::new("system", "be brief")];
        with_system.extend(history);
        let out = fallback_messages(&with_system, &t);
        assert_eq!(out.len(), 4);
        assert!(out[0].content.starts_with("be brief"));
    }
}
