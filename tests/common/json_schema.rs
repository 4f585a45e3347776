//! A JSON Schema (draft 2020-12) validator for the subset our schemas use:
//! `type`, `enum`, `const`, `properties`, `required`,
//! `additionalProperties`, `items`, `minItems`/`maxItems`,
//! `minimum`/`maximum`, `oneOf`, `anyOf` and local `$ref`s. Any other
//! keyword is an error, so a schema cannot silently rely on one this does
//! not check (`pattern` is left unchecked and said so: only messages from
//! the agent use it). Used to hold `docs/introspection.schema.json` to what
//! the VMM actually sends.

use serde_json::Value;

/// Keywords that only annotate.
const ANNOTATIONS: [&str; 5] = ["$schema", "$id", "title", "description", "$comment"];

pub struct Schema {
    root: Value,
}

impl Schema {
    pub fn new(root: Value) -> Schema {
        Schema { root }
    }

    /// Validates `value` against the root schema.
    pub fn validate(&self, value: &Value) -> Result<(), String> {
        self.check(&self.root, value, "$")
    }

    /// Validates `value` against the schema at a JSON pointer (`#/$defs/...`).
    pub fn validate_at(&self, pointer: &str, value: &Value) -> Result<(), String> {
        let schema = self.resolve(pointer)?;
        self.check(schema, value, "$")
    }

    fn resolve(&self, reference: &str) -> Result<&Value, String> {
        let pointer = reference.strip_prefix('#').ok_or_else(|| format!("only local $refs: {reference}"))?;
        self.root.pointer(pointer).ok_or_else(|| format!("no schema at {reference}"))
    }

    fn check(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        let rules = match schema {
            Value::Bool(true) => return Ok(()),
            Value::Bool(false) => return Err(format!("{at}: nothing is allowed here")),
            Value::Object(rules) => rules,
            _ => return Err(format!("{at}: a schema is an object or a boolean")),
        };
        for (keyword, rule) in rules {
            match keyword.as_str() {
                "$ref" => self.check(self.resolve(rule.as_str().unwrap_or_default())?, value, at)?,
                "type" => {
                    let wanted = rule.as_str().ok_or("type: one name")?;
                    if !has_type(value, wanted) {
                        return Err(format!("{at}: {value} is not of type {wanted}"));
                    }
                }
                "enum" => {
                    if !rule.as_array().is_some_and(|options| options.contains(value)) {
                        return Err(format!("{at}: {value} is not one of {rule}"));
                    }
                }
                "const" => {
                    if rule != value {
                        return Err(format!("{at}: {value} is not {rule}"));
                    }
                }
                "required" => {
                    if let Value::Object(fields) = value {
                        for name in rule.as_array().into_iter().flatten().filter_map(Value::as_str) {
                            if !fields.contains_key(name) {
                                return Err(format!("{at}: '{name}' is missing"));
                            }
                        }
                    }
                }
                "properties" => {
                    if let (Value::Object(fields), Value::Object(props)) = (value, rule) {
                        for (name, field) in fields {
                            if let Some(schema) = props.get(name) {
                                self.check(schema, field, &format!("{at}.{name}"))?;
                            }
                        }
                    }
                }
                "additionalProperties" => {
                    if let Value::Object(fields) = value {
                        let known = rules.get("properties").and_then(Value::as_object);
                        for (name, field) in fields {
                            if known.is_some_and(|k| k.contains_key(name)) {
                                continue;
                            }
                            self.check(rule, field, &format!("{at}.{name}"))
                                .map_err(|e| format!("{e} (field '{name}' is not in the schema)"))?;
                        }
                    }
                }
                "items" => {
                    if let Value::Array(items) = value {
                        for (i, item) in items.iter().enumerate() {
                            self.check(rule, item, &format!("{at}[{i}]"))?;
                        }
                    }
                }
                "minItems" | "maxItems" => {
                    if let (Value::Array(items), Some(bound)) = (value, rule.as_u64()) {
                        let n = items.len() as u64;
                        if (keyword == "minItems" && n < bound) || (keyword == "maxItems" && n > bound) {
                            return Err(format!("{at}: {n} items breaks {keyword} {bound}"));
                        }
                    }
                }
                "minimum" | "maximum" => {
                    if let Some(n) = value.as_number() {
                        let below = compare(n, rule).ok_or("minimum/maximum: a number")?;
                        if (keyword == "minimum" && below == std::cmp::Ordering::Less)
                            || (keyword == "maximum" && below == std::cmp::Ordering::Greater)
                        {
                            return Err(format!("{at}: {value} breaks {keyword} {rule}"));
                        }
                    }
                }
                "oneOf" | "anyOf" => {
                    let options = rule.as_array().ok_or("oneOf/anyOf: an array")?;
                    let mut errors = Vec::new();
                    let matched =
                        options.iter().filter(|s| self.check(s, value, at).map_err(|e| errors.push(e)).is_ok());
                    let count = matched.count();
                    if count == 0 || (keyword == "oneOf" && count > 1) {
                        return Err(format!("{at}: {count} of {keyword} match {value}: {}", errors.join("; ")));
                    }
                }
                "pattern" => {}
                other if ANNOTATIONS.contains(&other) || other == "$defs" => {}
                other => return Err(format!("{at}: keyword '{other}' is not supported by this validator")),
            }
        }
        Ok(())
    }
}

fn has_type(value: &Value, wanted: &str) -> bool {
    match wanted {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "number" => value.is_number(),
        "integer" => value.is_u64() || value.is_i64(),
        _ => false,
    }
}

/// `n` against a bound, exactly for integers.
fn compare(n: &serde_json::Number, bound: &Value) -> Option<std::cmp::Ordering> {
    let bound = bound.as_number()?;
    match (n.as_i64(), n.as_u64(), bound.as_i64(), bound.as_u64()) {
        (Some(a), _, Some(b), _) => Some(a.cmp(&b)),
        (_, Some(a), _, Some(b)) => Some(a.cmp(&b)),
        (Some(_), _, _, Some(_)) => Some(std::cmp::Ordering::Less),
        (_, Some(_), Some(_), _) => Some(std::cmp::Ordering::Greater),
        _ => n.as_f64()?.partial_cmp(&bound.as_f64()?),
    }
}

/// The introspection protocol's schema (`docs/introspection.schema.json`).
pub fn introspection() -> Schema {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/introspection.schema.json");
    let text = std::fs::read_to_string(&path).expect("docs/introspection.schema.json");
    Schema::new(serde_json::from_str(&text).expect("the schema is JSON"))
}
