//! The introspection agent protocol's wire format, one JSON object per
//! line: defined once here, for the VMM (`vmm::introspection`) and the
//! agent client (`api_client::introspect`, `hk-introspect`).
//!
//! From the agent: a command `{"id", "cmd", "args"}`, or a reply to an event
//! `{"reply": SEQ, "action"}`. From the VMM: `{"hello": ...}` on connect,
//! `{"id", "result"}` / `{"id", "error": {"errno", "message"}}` for each
//! command, and `{"event", "seq", "vcpu", ...}` events. Every number the
//! agent sends may be a JSON integer or a `"0x…"` string.

use serde_json::{Map, Value, json};

/// Protocol version in `hello`.
pub const PROTOCOL_VERSION: u64 = 1;
/// Longest line accepted from the agent; a longer one is answered with
/// `E2BIG` and skipped up to its newline.
pub const MAX_LINE: usize = 256 << 10;
/// Most bytes one `read-memory` / `write-memory` moves.
pub const MAX_MEMORY_ACCESS: u64 = 64 << 10;

/// An error reply: an errno name and a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{errno}: {message}")]
pub struct AgentError {
    pub errno: &'static str,
    pub message: String,
}

impl AgentError {
    pub fn new(errno: &'static str, message: impl Into<String>) -> Self {
        AgentError { errno, message: message.into() }
    }
    pub fn inval(message: impl Into<String>) -> Self {
        Self::new("EINVAL", message)
    }
    pub fn to_json(&self) -> Value {
        json!({"errno": self.errno, "message": self.message})
    }
}

pub type AgentResult = Result<Value, AgentError>;

/// What the agent answers to an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Perform the access.
    Continue,
    /// Drop the write, or raise #GP for an MSR write; fail a hypercall with -EPERM.
    Deny,
    /// Evaluate the access again against the tracking now in place.
    Retry,
    /// Stop the VM.
    Crash,
}

impl Action {
    pub const ALL: [Action; 4] = [Action::Continue, Action::Deny, Action::Retry, Action::Crash];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Continue => "continue",
            Action::Deny => "deny",
            Action::Retry => "retry",
            Action::Crash => "crash",
        }
    }

    pub fn parse(text: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == text)
    }
}

/// The agent's answer to event `seq`, as one line (newline included), in
/// the compact form the VMM reads without a JSON tree.
pub fn reply_line(seq: u64, action: Action) -> String {
    format!("{{\"reply\":{seq},\"action\":\"{}\"}}\n", action.as_str())
}

/// A command from the agent: `{"id", "cmd", "args"}`.
pub fn command(id: u64, cmd: &str, args: Value) -> Value {
    json!({"id": id, "cmd": cmd, "args": args})
}

/// One message from the agent.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    Command { id: Value, cmd: String, args: Map<String, Value> },
    Reply { seq: u64, action: Action },
}

/// The common reply forms `{"reply":N,"action":"A"}` and
/// `{"action":"A","reply":N}` (compact, as clients write them), read without
/// a JSON tree; anything else goes to the full parser.
fn parse_compact_reply(line: &[u8]) -> Option<Incoming> {
    let text = std::str::from_utf8(line).ok()?.trim_end();
    let body = text.strip_prefix('{')?.strip_suffix('}')?;
    let (mut seq, mut action) = (None, None);
    for field in body.split(',') {
        let (key, value) = field.split_once(':')?;
        let value = value.trim();
        match key.trim() {
            "\"reply\"" if seq.is_none() => {
                // A JSON integer, or a decimal or 0x-hex string, as every number the agent sends.
                let digits = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
                let quoted = digits.len() != value.len();
                seq = Some(match digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
                    Some(hex) if quoted && !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                        u64::from_str_radix(hex, 16).ok()?
                    }
                    _ if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => digits.parse().ok()?,
                    _ => return None,
                })
            }
            "\"action\"" if action.is_none() => {
                action = Some(Action::parse(value.strip_prefix('"')?.strip_suffix('"')?)?)
            }
            _ => return None,
        }
    }
    Some(Incoming::Reply { seq: seq?, action: action? })
}

/// Parses one line. An error carries the `id` to answer with, if one was found.
pub fn parse_line(line: &[u8]) -> Result<Incoming, (Value, AgentError)> {
    match parse_compact_reply(line) {
        Some(reply) => Ok(reply),
        None => parse_full(line),
    }
}

/// `parse_line` through a JSON tree: every form, with its errors.
fn parse_full(line: &[u8]) -> Result<Incoming, (Value, AgentError)> {
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| (Value::Null, AgentError::inval(format!("not a JSON message: {e}"))))?;
    let Value::Object(mut object) = value else {
        return Err((Value::Null, AgentError::inval("a message is a JSON object")));
    };
    if let Some(seq) = object.get("reply") {
        if let Some(unknown) = object.keys().find(|k| !matches!(k.as_str(), "reply" | "action")) {
            return Err((Value::Null, AgentError::inval(format!("unknown field '{unknown}' in a reply"))));
        }
        let seq = number(seq).ok_or((
            Value::Null,
            AgentError::inval("reply: the event's seq, an integer or a decimal or 0x-hex string"),
        ))?;
        let action = object
            .get("action")
            .and_then(Value::as_str)
            .and_then(Action::parse)
            .ok_or((Value::Null, AgentError::inval("action: continue, deny, retry or crash")))?;
        return Ok(Incoming::Reply { seq, action });
    }
    let id = object.remove("id").unwrap_or(Value::Null);
    if !(id.is_u64() || id.is_string()) {
        return Err((Value::Null, AgentError::inval("a command needs an id (an integer or a string)")));
    }
    if let Some(unknown) = object.keys().find(|k| !matches!(k.as_str(), "cmd" | "args")) {
        return Err((id, AgentError::inval(format!("unknown field '{unknown}' in a command"))));
    }
    let cmd = match object.get("cmd").and_then(Value::as_str) {
        Some(cmd) => cmd.to_string(),
        None => return Err((id, AgentError::inval("cmd: the command name, a string"))),
    };
    let args = match object.remove("args") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(args)) => args,
        Some(_) => return Err((id, AgentError::inval("args: an object"))),
    };
    Ok(Incoming::Command { id, cmd, args })
}

/// An event line written straight into a string, without a JSON tree: the
/// hot path of a synchronous event. Names and the kind are fixed
/// identifiers (no escaping needed); values are integers and booleans.
pub struct EventLine(String);

impl EventLine {
    pub fn new(kind: &'static str) -> Self {
        let mut line = String::with_capacity(192);
        line.push_str("{\"event\":\"");
        line.push_str(kind);
        line.push('"');
        EventLine(line)
    }

    pub fn num(mut self, name: &'static str, value: u64) -> Self {
        use std::fmt::Write;
        // Writing into a String cannot fail.
        let _ = write!(self.0, ",\"{name}\":{value}");
        self
    }

    pub fn flag(mut self, name: &'static str, value: bool) -> Self {
        use std::fmt::Write;
        let _ = write!(self.0, ",\"{name}\":{value}");
        self
    }

    pub fn nums(mut self, name: &'static str, values: &[u64]) -> Self {
        use std::fmt::Write;
        let _ = write!(self.0, ",\"{name}\":[");
        for (i, value) in values.iter().enumerate() {
            let _ = write!(self.0, "{}{value}", if i == 0 { "" } else { "," });
        }
        self.0.push(']');
        self
    }

    /// The finished line, without its newline.
    pub fn finish(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

/// A reply line for a command.
pub fn reply(id: &Value, result: &AgentResult) -> Value {
    match result {
        Ok(result) => json!({"id": id, "result": result}),
        Err(e) => json!({"id": id, "error": e.to_json()}),
    }
}

/// A number the agent sent: an integer or a hex string.
pub fn number(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => {
            let s = s.trim();
            match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => s.parse().ok(),
            }
        }
        _ => None,
    }
}

/// Typed access to a command's arguments.
pub struct Args<'a>(pub &'a Map<String, Value>);

impl Args<'_> {
    /// Refuses any argument not in `known` (a misspelt one would otherwise be ignored).
    pub fn only(&self, known: &[&str]) -> Result<(), AgentError> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(unknown) => Err(AgentError::inval(format!("unknown field 'args.{unknown}'"))),
            None => Ok(()),
        }
    }

    pub fn u64(&self, key: &str) -> Result<u64, AgentError> {
        self.opt_u64(key)?.ok_or_else(|| AgentError::inval(format!("{key}: required")))
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, AgentError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => number(v).map(Some).ok_or_else(|| AgentError::inval(format!("{key}: not a number"))),
        }
    }

    pub fn vcpu(&self, count: usize) -> Result<u8, AgentError> {
        let id = self.u64("vcpu")?;
        u8::try_from(id)
            .ok()
            .filter(|&id| usize::from(id) < count)
            .ok_or_else(|| AgentError::new("ENOENT", format!("vcpu: no vCPU {id}")))
    }

    pub fn opt_vcpu(&self, count: usize) -> Result<Option<u8>, AgentError> {
        match self.0.get("vcpu") {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.vcpu(count).map(Some),
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool, AgentError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(AgentError::inval(format!("{key}: true or false"))),
        }
    }

    pub fn str(&self, key: &str) -> Result<&str, AgentError> {
        self.0.get(key).and_then(Value::as_str).ok_or_else(|| AgentError::inval(format!("{key}: a string")))
    }

    pub fn u64_list(&self, key: &str) -> Result<Vec<u64>, AgentError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => {
                items.iter().map(|v| number(v).ok_or_else(|| AgentError::inval(format!("{key}: numbers")))).collect()
            }
            Some(_) => Err(AgentError::inval(format!("{key}: an array of numbers"))),
        }
    }
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(text: &str) -> Result<Vec<u8>, AgentError> {
    if !text.len().is_multiple_of(2) {
        return Err(AgentError::inval("data: an even number of hex digits"));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| AgentError::inval("data: hex digits only"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_client_writes_is_what_the_vmm_reads() {
        for action in Action::ALL {
            let line = reply_line(0x1234, action);
            assert!(line.ends_with('\n'));
            assert_eq!(parse_line(line.trim_end().as_bytes()), Ok(Incoming::Reply { seq: 0x1234, action }));
            assert_eq!(parse_full(line.trim_end().as_bytes()), Ok(Incoming::Reply { seq: 0x1234, action }));
        }
        let sent = command(9, "read-memory", json!({"gpa": "0x1000", "len": 4}));
        let Ok(Incoming::Command { id, cmd, args }) = parse_line(sent.to_string().as_bytes()) else {
            panic!("a command: {sent}");
        };
        assert_eq!((id, cmd.as_str(), args.get("len")), (json!(9), "read-memory", Some(&json!(4))));
    }

    #[test]
    fn compact_replies_parse_as_the_full_parser_would() {
        for line in [
            &br#"{"reply":12,"action":"deny"}"#[..],
            br#"{"action":"deny","reply":12}"#,
            br#"{"reply": 12, "action": "deny"}"#,
        ] {
            assert_eq!(parse_line(line), Ok(Incoming::Reply { seq: 12, action: Action::Deny }), "{line:?}");
        }
        // Not the compact form: the full parser decides, with its errors.
        assert!(parse_compact_reply(br#"{"reply":12,"action":"deny","x":1}"#).is_none());
        assert!(parse_compact_reply(br#"{"reply":-1,"action":"deny"}"#).is_none());
        assert!(parse_compact_reply(br#"{"reply":0x12,"action":"deny"}"#).is_none(), "not JSON");
        assert!(parse_compact_reply(br#"{"reply":"0x","action":"deny"}"#).is_none());
        assert!(parse_compact_reply(br#"{"reply":"","action":"deny"}"#).is_none());
        assert!(parse_line(br#"{"reply":1,"action":"maybe"}"#).is_err());
        assert!(parse_compact_reply(br#"{"reply":1,"reply":2,"action":"deny"}"#).is_none());
    }

    #[test]
    fn a_reply_seq_may_be_an_integer_a_decimal_string_or_a_hex_string() {
        for line in [
            &br#"{"reply":18,"action":"continue"}"#[..],
            br#"{"reply":"18","action":"continue"}"#,
            br#"{"reply":"0x12","action":"continue"}"#,
            br#"{"action":"continue","reply":"0X12"}"#,
            br#"{"reply": "0x12", "action": "continue"}"#,
            br#"{ "reply" : "18" , "action" : "continue" }"#,
        ] {
            let text = String::from_utf8_lossy(line);
            let want = Incoming::Reply { seq: 18, action: Action::Continue };
            assert_eq!(
                parse_compact_reply(line),
                Some(Incoming::Reply { seq: 18, action: Action::Continue }),
                "{text}"
            );
            // The full parser agrees (the fast one is only a shortcut).
            assert_eq!(parse_full(line), Ok(want), "{text}");
        }
        for bad in [&br#"{"reply":"0xzz","action":"continue"}"#[..], br#"{"reply":"-1","action":"continue"}"#] {
            assert_eq!(parse_line(bad).map_err(|e| e.1.errno), Err("EINVAL"), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let refusal = |line: &[u8]| parse_line(line).map_err(|(id, e)| (id, e.errno, e.message));
        let (id, errno, message) = refusal(br#"{"id": 4, "cmd": "hello", "arg": {}}"#).expect_err("refused");
        assert_eq!((id, errno), (json!(4), "EINVAL"));
        assert!(message.contains("'arg'"), "{message}");
        let (_, errno, message) = refusal(br#"{"reply": 3, "action": "deny", "vcpu": 0}"#).expect_err("refused");
        assert_eq!(errno, "EINVAL");
        assert!(message.contains("'vcpu'"), "{message}");
        let args = json!({"gpa": 1, "sise": 8});
        let Value::Object(args) = args else { unreachable!() };
        let err = Args(&args).only(&["gpa", "size"]).expect_err("refused");
        assert_eq!((err.errno, err.message.as_str()), ("EINVAL", "unknown field 'args.sise'"));
        assert!(Args(&args).only(&["gpa", "sise"]).is_ok());
    }

    #[test]
    fn an_event_line_is_the_json_object_it_names() {
        let line = EventLine::new("hypercall")
            .num("seq", 7)
            .num("nr", u64::MAX)
            .flag("reply_required", true)
            .nums("args", &[1, 2, 3])
            .nums("none", &[])
            .finish();
        let parsed: Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(
            parsed,
            json!({"event": "hypercall", "seq": 7, "nr": u64::MAX, "reply_required": true, "args": [1, 2, 3], "none": []})
        );
    }

    #[test]
    fn a_command_keeps_its_id_and_args() {
        let parsed = parse_line(br#"{"id": 7, "cmd": "read-memory", "args": {"gpa": "0x1000", "size": 8}}"#);
        let Ok(Incoming::Command { id, cmd, args }) = parsed else { panic!("{parsed:?}") };
        assert_eq!((id, cmd.as_str()), (json!(7), "read-memory"));
        assert_eq!(Args(&args).u64("gpa"), Ok(0x1000));
        assert_eq!(Args(&args).u64("size"), Ok(8));
    }

    #[test]
    fn a_reply_names_its_event_and_action() {
        assert_eq!(
            parse_line(br#"{"reply": 3, "action": "deny"}"#),
            Ok(Incoming::Reply { seq: 3, action: Action::Deny })
        );
        assert!(parse_line(br#"{"reply": 3, "action": "maybe"}"#).is_err());
    }

    #[test]
    fn malformed_messages_are_errors_with_the_id_when_there_is_one() {
        assert_eq!(parse_line(b"{not json").map_err(|e| e.1.errno), Err("EINVAL"));
        assert_eq!(parse_line(b"[1,2]").map_err(|e| e.1.errno), Err("EINVAL"));
        assert_eq!(parse_line(br#"{"cmd": "hello"}"#).map_err(|e| e.0), Err(Value::Null));
        assert_eq!(parse_line(br#"{"id": "a", "args": {}}"#).map_err(|e| e.0), Err(json!("a")));
        assert_eq!(parse_line(br#"{"id": 1, "cmd": "x", "args": 5}"#).map_err(|e| e.0), Err(json!(1)));
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        assert_eq!(from_hex(&to_hex(&[0, 0xab, 0xff])), Ok(vec![0, 0xab, 0xff]));
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").is_err());
        assert!(from_hex("é1").is_err());
    }
}
