//! W3C Trace Context (`traceparent`, `tracestate`) of an event: what a
//! partner sent or the service started at ingest, kept with the event, and
//! what each outgoing webhook call carries.
//!
//! The engine only parses, formats and derives contexts; whether spans are
//! recorded and exported is the service's business. A stage that calls out
//! asks [`TraceContext::for_call`] for the headers, which uses the current
//! span's context when the service installed a way to read it (OpenTelemetry
//! on), and otherwise continues the event's trace with a new parent id.

use std::fmt;
use std::sync::OnceLock;

/// One W3C trace context: version `00` `traceparent` fields, and the
/// opaque `tracestate` passed on as received.
#[derive(Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    /// The span the next hop is a child of.
    pub parent_id: u64,
    /// Trace flags; bit 0 is "sampled".
    pub flags: u8,
    pub state: Option<String>,
}

/// Longest `tracestate` kept: the W3C spec asks vendors to pass on at least
/// 512 characters and lets them drop a longer one whole, which we do.
const MAX_STATE_BYTES: usize = 512;
/// Most `tracestate` list members (W3C).
const MAX_STATE_MEMBERS: usize = 32;

impl TraceContext {
    /// Parses a `traceparent` (and `tracestate`). `None` for a malformed
    /// one: all-zero ids, upper-case hex, version `ff`, or a version `00`
    /// header with anything after the flags. A later version is read by its
    /// first four fields, as the spec asks.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<TraceContext> {
        let tp = traceparent.trim();
        let version = tp.get(0..2)?;
        if !is_lower_hex(version) || version == "ff" {
            return None;
        }
        if tp.len() < 55
            || (version == "00" && tp.len() != 55)
            || (tp.len() > 55 && tp.as_bytes()[55] != b'-')
        {
            return None;
        }
        let b = tp.as_bytes();
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let (trace, parent, flags) = (&tp[3..35], &tp[36..52], &tp[53..55]);
        if ![trace, parent, flags].iter().all(|f| is_lower_hex(f)) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let parent_id = u64::from_str_radix(parent, 16).ok()?;
        if trace_id == 0 || parent_id == 0 {
            return None;
        }
        Some(TraceContext {
            trace_id,
            parent_id,
            // Only "sampled" is defined; the other bits are passed on as 0.
            flags: u8::from_str_radix(flags, 16).ok()? & 0x01,
            state: tracestate.and_then(valid_state),
        })
    }

    /// A new trace, sampled, whose root is a span with a random id.
    pub fn new_root() -> TraceContext {
        TraceContext {
            trace_id: nonzero(rand::random()),
            parent_id: nonzero(rand::random()),
            flags: 1,
            state: None,
        }
    }

    /// The same trace, under a new (random) parent id: a hop of ours that
    /// is not recorded as a span.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            parent_id: nonzero(rand::random()),
            ..self.clone()
        }
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }

    /// The trace id as logged and exported: 32 lower-case hex digits.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The context an outgoing call made now carries: the current span's
    /// (see [`install_current_span`]) when there is one in this trace, else
    /// `event`'s under a new parent id.
    pub fn for_call(event: &TraceContext) -> TraceContext {
        match CURRENT_SPAN.get().and_then(|current| current()) {
            Some(mut span) if span.trace_id == event.trace_id => {
                if span.state.is_none() {
                    span.state = event.state.clone();
                }
                span
            }
            _ => event.child(),
        }
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

/// A `tracestate` worth passing on: at most 32 `key=value` members within
/// 512 characters of printable ASCII; anything else is dropped whole.
fn valid_state(state: &str) -> Option<String> {
    let state = state.trim();
    let members: Vec<&str> = state
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .collect();
    let member_ok = |m: &&str| {
        m.split_once('=').is_some_and(|(k, v)| {
            !k.is_empty() && !v.is_empty() && !k.contains(' ') && v.bytes().all(|b| (0x20..0x7f).contains(&b))
        })
    };
    let ok = !members.is_empty()
        && members.len() <= MAX_STATE_MEMBERS
        && state.len() <= MAX_STATE_BYTES
        && state.is_ascii()
        && members.iter().all(member_ok);
    ok.then(|| members.join(","))
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn nonzero<T: Default + PartialEq + From<u8>>(v: T) -> T {
    if v == T::default() { T::from(1) } else { v }
}

static CURRENT_SPAN: OnceLock<fn() -> Option<TraceContext>> = OnceLock::new();

/// Installs, once per process, how to read the current span's context (the
/// service's OpenTelemetry layer). Without it, outgoing calls continue the
/// event's trace with a fresh parent id.
pub fn install_current_span(current: fn() -> Option<TraceContext>) {
    let _ = CURRENT_SPAN.set(current);
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn round_trips_a_valid_traceparent() {
        let tc = TraceContext::parse(TP, Some(" congo=t61rcWkgMzE ")).expect("valid");
        assert_eq!(tc.traceparent(), TP);
        assert_eq!(tc.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tc.state.as_deref(), Some("congo=t61rcWkgMzE"));
        let child = tc.child();
        assert_eq!(child.trace_id, tc.trace_id);
        assert_ne!(child.parent_id, tc.parent_id);
        assert_eq!(child.flags, 1);
    }

    #[test]
    fn refuses_malformed_ones() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad, None).is_none(), "{bad:?}");
        }
        // A later version is read by its first four fields.
        let future = format!("cc{}-more", &TP[2..]);
        assert_eq!(
            TraceContext::parse(&future, None).map(|t| t.traceparent()),
            Some(TP.to_owned())
        );
    }

    #[test]
    fn keeps_only_the_sampled_flag_and_a_valid_state() {
        let ff = format!("{}ff", &TP[..53]);
        assert_eq!(TraceContext::parse(&ff, None).map(|t| t.flags), Some(1));
        let state = |s: &str| TraceContext::parse(TP, Some(s)).and_then(|t| t.state);
        assert_eq!(state("a=1, b=2 ,"), Some("a=1,b=2".to_owned()));
        assert_eq!(state("no-equals-sign"), None);
        assert_eq!(state("=v"), None);
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert_eq!(state(&many.join(",")), None);
        assert_eq!(state(&format!("k={}", "v".repeat(600))), None);
    }

    #[test]
    fn a_new_root_is_sampled_and_nonzero() {
        let a = TraceContext::new_root();
        let b = TraceContext::new_root();
        assert_ne!(a.trace_id, 0);
        assert_ne!(a.trace_id, b.trace_id);
        assert_eq!(TraceContext::parse(&a.traceparent(), None), Some(a));
    }
}
