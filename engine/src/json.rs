//! The event document decoder: strict JSON (RFC 8259, with RFC 7493 I-JSON's
//! rules on duplicate names and Unicode) with limits on nesting, string and
//! container size, checked while parsing so a hostile body costs no more
//! than its bytes. Every refusal says where in the document it happened.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Limits on what a request body may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonLimits {
    /// Deepest nesting of arrays and objects (the top level counts as 1).
    pub max_depth: usize,
    /// Longest string or member name, in bytes (UTF-8).
    pub max_string_bytes: usize,
    /// Most elements in one array, or members in one object.
    pub max_items: usize,
}

impl Default for JsonLimits {
    fn default() -> Self {
        Self {
            max_depth: 32,
            max_string_bytes: 64 * 1024,
            max_items: 10_000,
        }
    }
}

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON, or JSON this service refuses (duplicate names, NUL characters,
    /// invalid UTF-8, numbers out of range).
    #[error("{0}")]
    Invalid(String),
    /// Valid JSON beyond a configured limit.
    #[error("{0}")]
    Limit(String),
}

/// Decodes one JSON document (surrounding whitespace allowed, nothing else).
pub fn decode(bytes: &[u8], limits: &JsonLimits) -> Result<Value, DecodeError> {
    let state = State {
        limits,
        path: RefCell::new(Vec::new()),
        limit_hit: RefCell::new(false),
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let result = ValueSeed {
        state: &state,
        depth: 0,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    result.map_err(|e| {
        let message = e.to_string();
        if *state.limit_hit.borrow() {
            DecodeError::Limit(message)
        } else {
            DecodeError::Invalid(message)
        }
    })
}

struct State<'a> {
    limits: &'a JsonLimits,
    /// Path of the value being read, for messages (JSON pointer tokens).
    path: RefCell<Vec<String>>,
    limit_hit: RefCell<bool>,
}

impl State<'_> {
    fn pointer(&self) -> String {
        let path = self.path.borrow();
        if path.is_empty() {
            return "the document".to_owned();
        }
        path.iter()
            .map(|t| format!("/{}", t.replace('~', "~0").replace('/', "~1")))
            .collect()
    }

    fn limit<E: de::Error>(&self, what: fmt::Arguments<'_>) -> E {
        *self.limit_hit.borrow_mut() = true;
        E::custom(format!("{what} at {}", self.pointer()))
    }

    fn invalid<E: de::Error>(&self, what: &str) -> E {
        E::custom(format!("{what} at {}", self.pointer()))
    }

    fn check_str<E: de::Error>(&self, s: &str, what: &str) -> Result<(), E> {
        if s.len() > self.limits.max_string_bytes {
            return Err(self.limit(format_args!(
                "{what} of {} bytes is longer than the limit of {} bytes",
                s.len(),
                self.limits.max_string_bytes
            )));
        }
        if s.contains('\0') {
            return Err(self.invalid(&format!("{what} contains a NUL character (\\u0000)")));
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct ValueSeed<'s, 'a> {
    state: &'s State<'a>,
    depth: usize,
}

impl ValueSeed<'_, '_> {
    fn enter<E: de::Error>(&self) -> Result<(), E> {
        if self.depth + 1 > self.state.limits.max_depth {
            return Err(self.state.limit(format_args!(
                "nesting is deeper than the limit of {} levels",
                self.state.limits.max_depth
            )));
        }
        Ok(())
    }

    fn child(&self) -> Self {
        Self {
            state: self.state,
            depth: self.depth + 1,
        }
    }
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_, '_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| self.state.invalid("number out of range"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.state.check_str(v, "string")?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.state.check_str(&v, "string")?;
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.enter()?;
        let mut out = Vec::new();
        loop {
            self.state.path.borrow_mut().push(out.len().to_string());
            let next = seq.next_element_seed(self.child());
            self.state.path.borrow_mut().pop();
            let Some(v) = next? else { break };
            if out.len() == self.state.limits.max_items {
                return Err(self.state.limit(format_args!(
                    "array has more than the limit of {} elements",
                    self.state.limits.max_items
                )));
            }
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.enter()?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            self.state.path.borrow_mut().push(key);
            let checked = {
                let path = self.state.path.borrow();
                let key = path.last().map(String::as_str).unwrap_or_default();
                self.state
                    .check_str::<A::Error>(key, "member name")
                    .and_then(|()| {
                        if out.contains_key(key) {
                            Err(self.state.invalid("duplicate member name"))
                        } else if out.len() == self.state.limits.max_items {
                            Err(self.state.limit(format_args!(
                                "object has more than the limit of {} members",
                                self.state.limits.max_items
                            )))
                        } else {
                            Ok(())
                        }
                    })
            };
            let value = checked.and_then(|()| map.next_value_seed(self.child()));
            let key = self.state.path.borrow_mut().pop().unwrap_or_default();
            out.insert(key, value?);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> JsonLimits {
        JsonLimits {
            max_depth: 4,
            max_string_bytes: 16,
            max_items: 3,
        }
    }

    fn invalid(body: &str) -> String {
        match decode(body.as_bytes(), &limits()) {
            Err(DecodeError::Invalid(m)) => m,
            other => panic!("{body}: expected Invalid, got {other:?}"),
        }
    }

    fn limit(body: &str) -> String {
        match decode(body.as_bytes(), &limits()) {
            Err(DecodeError::Limit(m)) => m,
            other => panic!("{body}: expected Limit, got {other:?}"),
        }
    }

    #[test]
    fn accepts_ordinary_documents_unchanged() {
        let body = r#"{"tipo":"VENDA","dados":{"a":[1,-2,3.5],"b":null,"c":true}}"#;
        let v = decode(body.as_bytes(), &limits()).expect("decodes");
        assert_eq!(v, serde_json::from_str::<Value>(body).expect("json"));
        assert_eq!(v.to_string(), body, "member order is kept");
        assert_eq!(
            decode(b" [\"\\u00e9\"] \n", &limits()).expect("decodes"),
            serde_json::json!(["é"])
        );
        assert_eq!(
            decode(b"18446744073709551615", &limits()).expect("u64"),
            serde_json::json!(u64::MAX)
        );
    }

    #[test]
    fn refuses_what_json_parsers_disagree_on() {
        assert!(invalid(r#"{"a":1,"b":{"x":1,"x":2}}"#).contains("duplicate member name at /b/x"));
        assert!(invalid(r#"{"a":"x\u0000y"}"#).contains("NUL character"));
        assert!(invalid(r#"{"a\u0000":1}"#).contains("NUL character"));
        assert!(invalid(r#"{"a":1e999}"#).contains("number out of range"));
        let m = invalid(r#"{"a":"\ud800"}"#);
        assert!(m.contains("surrogate") || m.contains("escape"), "{m}");
        assert!(matches!(
            decode(b"{\"a\":\"\xff\"}", &limits()),
            Err(DecodeError::Invalid(_))
        ));
        invalid(r#"{"a":1} {"b":2}"#);
        invalid(r#"{"a":1,}"#);
        invalid("");
    }

    #[test]
    fn limits_name_the_place() {
        assert!(limit(r#"{"a":[[[[1]]]]}"#).contains("deeper than the limit of 4 levels at /a/0/0/0"));
        decode(br#"{"a":[[[1]]]}"#, &limits()).expect("depth 4 is allowed");
        assert!(limit(r#"{"a":"12345678901234567"}"#).contains("17 bytes"));
        assert!(limit(r#"{"12345678901234567":1}"#).contains("member name"));
        assert!(limit(r#"{"a":[1,2,3,4]}"#).contains("more than the limit of 3 elements at /a"));
        assert!(limit(r#"{"a":1,"b":2,"c":3,"d":4}"#).contains("3 members"));
        assert!(limit(r#"{"a~/b":[[[[]]]]}"#).contains("/a~0~1b/0"));
    }
}
