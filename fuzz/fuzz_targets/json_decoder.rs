//! Differential fuzzing of the strict event-body decoder `engine::json::decode`
//! against plain `serde_json` (built with `preserve_order`, as in the workspace).
//!
//! Properties checked on every input:
//! * `decode` never panics (default limits and small limits);
//! * if `decode` (default limits) accepts, `serde_json::from_slice::<Value>`
//!   accepts too and yields an equal value with the same member order;
//! * if `serde_json` refuses, `decode` refuses;
//! * with small limits (depth 4, strings 16 bytes, 3 items) `decode` accepts
//!   only what it accepts with the default limits, with the same value, and an
//!   `Invalid` refusal under small limits is also an `Invalid` refusal under the
//!   default limits (tighter limits can only turn errors into `Limit` errors
//!   earlier, never make a document valid or invalid in another way).
#![no_main]

use engine::json::{DecodeError, JsonLimits, decode};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const SMALL: JsonLimits = JsonLimits {
    max_depth: 4,
    max_string_bytes: 16,
    max_items: 3,
};

fuzz_target!(|data: &[u8]| {
    let strict = decode(data, &JsonLimits::default());
    let reference = serde_json::from_slice::<Value>(data);

    match (&strict, &reference) {
        (Ok(v), Ok(r)) => {
            assert_eq!(v, r, "decode and serde_json disagree on the value");
            // `Map` equality ignores order with preserve_order; check it too.
            assert_eq!(v.to_string(), r.to_string(), "member order differs");
        }
        (Ok(v), Err(e)) => panic!("decode accepted {v} but serde_json refuses it: {e}"),
        (Err(_), _) => {}
    }

    let small = decode(data, &SMALL);
    match (&small, &strict) {
        (Ok(s), Ok(v)) => assert_eq!(s, v, "small limits changed the value"),
        (Ok(s), Err(e)) => panic!("small limits accepted {s} but default limits refuse: {e:?}"),
        (Err(DecodeError::Invalid(m)), Ok(_)) => {
            panic!("small limits say Invalid ({m}) but default limits accept")
        }
        (Err(DecodeError::Invalid(m)), Err(DecodeError::Limit(d))) => {
            panic!("small limits say Invalid ({m}) but default limits say Limit ({d})")
        }
        _ => {}
    }
});
