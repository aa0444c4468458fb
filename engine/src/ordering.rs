//! Ordering keys: a pipeline's `ordering.key`, a JSON pointer into the
//! event, names what must happen in order. Events of one partner and type
//! with equal key values run one at a time, in acceptance order; the
//! service keeps that promise in its store, this module only says what the
//! key of an event is.

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::model::{OnDeadLetter, OrderingSpec};

/// A loaded pipeline's ordering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ordering {
    /// The pointer as written (`/dados/produto_id`, or `/tipo`).
    pub pointer: String,
    /// Under `block`, a dead letter holds its key until it is retried (or
    /// removed); under `skip` the key's next event proceeds.
    pub block: bool,
}

impl Ordering {
    /// Checks the pointer: `/tipo`, or `/dados` followed by reference
    /// tokens (RFC 6901: `~0` and `~1` the only escapes).
    pub fn from_spec(spec: &OrderingSpec) -> Result<Ordering, String> {
        let pointer = spec.key.trim();
        let rest = match pointer.strip_prefix("/dados") {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
            _ if pointer == "/tipo" => "",
            _ => {
                return Err(format!(
                    "ordering.key {pointer:?} must be a JSON pointer into the event: /dados/… (or /tipo)"
                ));
            }
        };
        for token in rest.split('/').skip(1) {
            let mut chars = token.chars();
            while let Some(c) = chars.next() {
                if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
                    return Err(format!(
                        "ordering.key {pointer:?}: '~' must be followed by 0 or 1 (RFC 6901)"
                    ));
                }
            }
        }
        Ok(Ordering {
            pointer: pointer.to_owned(),
            block: spec.on_dead_letter == OnDeadLetter::Block,
        })
    }

    /// The event's key: the text of the value at the pointer (a string as
    /// it is, so `7` and `"7"` are one key; any other value as its JSON
    /// text), or `None` when there is no value there (or it is `null`):
    /// that event is unordered.
    pub fn value_of<'a>(&self, tipo: &'a str, dados: &'a Value) -> Option<std::borrow::Cow<'a, str>> {
        let value = if self.pointer == "/tipo" {
            return Some(std::borrow::Cow::Borrowed(tipo));
        } else {
            dados.pointer(&self.pointer["/dados".len()..])?
        };
        match value {
            Value::Null => None,
            Value::String(s) => Some(std::borrow::Cow::Borrowed(s)),
            other => Some(std::borrow::Cow::Owned(other.to_string())),
        }
    }

    /// What the store keeps: a digest of type, partner and value, so keys
    /// of any length index alike and equal values of two partners or types
    /// never meet.
    pub fn key_of(&self, tipo: &str, partner: &str, dados: &Value) -> Option<String> {
        let value = self.value_of(tipo, dados)?;
        let mut h = Sha256::new();
        for part in [tipo, partner, &value] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        Some(hex::encode(&h.finalize()[..16]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ordering(key: &str) -> Result<Ordering, String> {
        Ordering::from_spec(&OrderingSpec {
            key: key.to_owned(),
            on_dead_letter: OnDeadLetter::Skip,
        })
    }

    #[test]
    fn pointers_into_the_event_only() {
        for ok in [
            "/dados/produto_id",
            "/dados",
            "/dados/a~1b/c~0d",
            "/tipo",
            "/dados/itens/0",
        ] {
            assert!(ordering(ok).is_ok(), "{ok}");
        }
        for bad in [
            "produto_id",
            "/produto_id",
            "/dadosx",
            "",
            "/dados/a~2",
            "/dados/~",
        ] {
            assert!(ordering(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_per_partner_type_and_value() {
        let o = ordering("/dados/produto_id").expect("valid");
        let d = |v: Value| json!({ "produto_id": v, "quantidade": 3 });
        let k = |tipo: &str, partner: &str, dados: &Value| o.key_of(tipo, partner, dados);
        let a = k("ESTOQUE", "acme", &d(json!("P1")));
        assert!(a.is_some());
        assert_eq!(a, k("ESTOQUE", "acme", &d(json!("P1"))));
        assert_ne!(a, k("ESTOQUE", "other", &d(json!("P1"))), "per partner");
        assert_ne!(a, k("VENDA", "acme", &d(json!("P1"))), "per type");
        assert_ne!(a, k("ESTOQUE", "acme", &d(json!("P2"))));
        // The key is the value's text: 7 and "7" are one product.
        assert_eq!(k("E", "p", &d(json!(7))), k("E", "p", &d(json!("7"))));
        // No value, or null: unordered.
        assert_eq!(k("E", "p", &json!({"quantidade": 1})), None);
        assert_eq!(k("E", "p", &d(Value::Null)), None);
    }
}
