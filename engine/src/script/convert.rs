//! JSON ↔ Rhai `Dynamic`: how events enter a script and how its changes and
//! result come back.
//!
//! The conversion keeps the JSON number kinds apart (integers stay `INT`,
//! other numbers `FLOAT`), refuses values JSON cannot hold (NaN, infinity,
//! custom types) and bounds nesting, so a hostile document cannot overflow
//! the stack. Rhai maps are sorted by key, so [`restore_order`] puts the
//! event's original key order back. [`crate::tables`] uses [`json_to_dynamic`]
//! to convert table rows once, at load.

use rhai::{Array, Dynamic, Map};
use serde_json::Value;

use crate::stage::Event;

/// Maximum nesting of JSON values converted to/from Rhai values.
const MAX_VALUE_DEPTH: usize = 200;

/// The event as the script's `event` map.
pub(super) fn event_to_dynamic(event: &Event) -> Result<Dynamic, String> {
    let mut map = Map::new();
    map.insert("id".into(), event.id.clone().into());
    map.insert("tipo".into(), event.tipo.clone().into());
    map.insert("partner_id".into(), event.partner_id.clone().into());
    map.insert("received_at".into(), event.received_at.clone().into());
    map.insert("dados".into(), json_to_dynamic(&event.dados, 0)?);
    map.insert("meta".into(), json_to_dynamic(&event.meta, 0)?);
    Ok(Dynamic::from_map(map))
}

/// JSON → Rhai. Integers become `INT`, other numbers `FLOAT`, null becomes unit.
pub(crate) fn json_to_dynamic(value: &Value, depth: usize) -> Result<Dynamic, String> {
    if depth > MAX_VALUE_DEPTH {
        return Err(format!("value nested deeper than {MAX_VALUE_DEPTH} levels"));
    }
    Ok(match value {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Dynamic::from_int(i)
            } else {
                // u64 above i64::MAX or a float.
                Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => s.as_str().into(),
        Value::Array(items) => {
            let mut array = Array::with_capacity(items.len());
            for item in items {
                array.push(json_to_dynamic(item, depth + 1)?);
            }
            Dynamic::from_array(array)
        }
        Value::Object(entries) => {
            let mut map = Map::new();
            for (key, item) in entries {
                map.insert(key.as_str().into(), json_to_dynamic(item, depth + 1)?);
            }
            Dynamic::from_map(map)
        }
    })
}

/// Rhai → JSON. `INT` stays an integer, `FLOAT` a float (NaN/infinity are
/// errors), unit becomes null, chars become strings, BLOBs arrays of bytes.
pub(super) fn dynamic_to_json(value: Dynamic, depth: usize) -> Result<Value, String> {
    if depth > MAX_VALUE_DEPTH {
        return Err(format!("value nested deeper than {MAX_VALUE_DEPTH} levels"));
    }
    let value = value.flatten();
    if value.is_unit() {
        return Ok(Value::Null);
    }
    if let Ok(b) = value.as_bool() {
        return Ok(Value::Bool(b));
    }
    if let Ok(i) = value.as_int() {
        return Ok(Value::from(i));
    }
    if let Ok(f) = value.as_float() {
        return serde_json::Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| format!("number {f} (NaN or infinite) is not valid JSON"));
    }
    if let Ok(c) = value.as_char() {
        return Ok(Value::String(c.to_string()));
    }
    if value.is_string() {
        let s = value
            .into_immutable_string()
            .map_err(|t| format!("unexpected {t}"))?;
        return Ok(Value::String(s.to_string()));
    }
    if value.is_blob() {
        let blob = value.into_blob().map_err(|t| format!("unexpected {t}"))?;
        return Ok(Value::Array(blob.into_iter().map(Value::from).collect()));
    }
    if value.is_array() {
        let array = value.into_array().map_err(|t| format!("unexpected {t}"))?;
        let mut out = Vec::with_capacity(array.len());
        for item in array {
            out.push(dynamic_to_json(item, depth + 1)?);
        }
        return Ok(Value::Array(out));
    }
    if value.is_map() {
        let type_name = value.type_name();
        let map = value
            .try_cast::<Map>()
            .ok_or_else(|| format!("unexpected {type_name}"))?;
        let mut out = serde_json::Map::with_capacity(map.len());
        for (key, item) in map {
            out.insert(key.to_string(), dynamic_to_json(item, depth + 1)?);
        }
        return Ok(Value::Object(out));
    }
    Err(format!(
        "values of type '{}' have no JSON form",
        value.type_name()
    ))
}

/// Rhai maps are sorted by key; put keys that existed in `original` back in
/// their original order (recursively), followed by new keys.
pub(super) fn restore_order(original: &Value, updated: Value) -> Value {
    match (original, updated) {
        (Value::Object(orig), Value::Object(mut upd)) => {
            let mut out = serde_json::Map::with_capacity(upd.len());
            for (key, orig_item) in orig {
                if let Some(slot) = upd.get_mut(key) {
                    let item = std::mem::take(slot);
                    out.insert(key.clone(), restore_order(orig_item, item));
                }
            }
            for (key, item) in upd {
                if !orig.contains_key(&key) {
                    out.insert(key, item);
                }
            }
            Value::Object(out)
        }
        (Value::Array(orig), Value::Array(upd)) => Value::Array(
            upd.into_iter()
                .enumerate()
                .map(|(i, item)| match orig.get(i) {
                    Some(orig_item) => restore_order(orig_item, item),
                    None => item,
                })
                .collect(),
        ),
        (_, updated) => updated,
    }
}

/// The kind of a JSON value, for messages about what a script made of a field.
pub(super) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null / unit",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::super::ScriptError;
    use super::super::ScriptHost;
    use super::super::testkit::{event, run_src};

    #[test]
    fn integers_stay_integers_and_floats_stay_floats() {
        let host = ScriptHost::default();
        let mut ev = event();
        ev.dados = json!({"quantidade": 3, "preco": 2.0, "big": 9007199254740993_i64, "lista": [1, 2.5, null, "x"], "n": {"a": 1}});
        run_src(&host, "event.dados.x = 1;", &mut ev).expect("runs");
        assert!(ev.dados["quantidade"].is_i64());
        assert_eq!(ev.dados["quantidade"], json!(3));
        assert_eq!(serde_json::to_string(&ev.dados["quantidade"]).expect("ser"), "3");
        assert!(ev.dados["preco"].is_f64());
        assert_eq!(ev.dados["big"], json!(9007199254740993_i64));
        assert_eq!(ev.dados["lista"], json!([1, 2.5, null, "x"]));
        assert!(ev.dados["lista"][0].is_i64());
        assert_eq!(ev.dados["n"], json!({"a": 1}));
    }

    #[test]
    fn non_json_results_are_errors() {
        let host = ScriptHost::default();
        let mut ev = event();
        let err = run_src(&host, "0.0 / 0.0", &mut ev).expect_err("NaN");
        assert!(matches!(err, ScriptError::Runtime { .. }), "{err:?}");
        assert_eq!(run_src(&host, "'c'", &mut ev).expect("char"), json!("c"));
        assert_eq!(run_src(&host, "()", &mut ev).expect("unit"), Value::Null);
    }
}
