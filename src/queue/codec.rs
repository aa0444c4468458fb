//! The wire format of queue tasks: JSON of [`QueueTask`], under ULID task ids
//! chosen by us (apalis's `push` returns no id, and its SQL backends fail to
//! decode every later fetch of a task whose id is not a ULID).

use std::convert::Infallible;

use apalis::prelude::Codec;

use super::{QueueError, QueueTask};

/// What a worker receives: the decoded task, or why it could not be decoded.
///
/// Decoding never fails at the apalis level (a codec error there is a *backend* error
/// that kills the worker, and the task would come back forever); we log and drop instead.
#[derive(Debug, Clone)]
pub(crate) struct Incoming(pub(super) Result<QueueTask, String>);

/// JSON codec that never fails to decode (see [`Incoming`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TaskCodec;

impl Codec<Incoming> for TaskCodec {
    type Error = Infallible;
    type Compact = Vec<u8>;

    fn encode(&self, val: &Incoming) -> Result<Vec<u8>, Infallible> {
        // Only used if someone pushes through apalis's own sink; serializing this enum cannot fail.
        Ok(match &val.0 {
            Ok(task) => encode_task(task).unwrap_or_default(),
            Err(raw) => raw.clone().into_bytes(),
        })
    }

    fn decode(&self, val: &Vec<u8>) -> Result<Incoming, Infallible> {
        Ok(Incoming(serde_json::from_slice::<QueueTask>(val).map_err(|e| {
            let shown = String::from_utf8_lossy(&val[..val.len().min(200)]).into_owned();
            format!("{e} (payload: {shown})")
        })))
    }
}

pub(crate) fn encode_task(task: &QueueTask) -> Result<Vec<u8>, QueueError> {
    serde_json::to_vec(task).map_err(|e| QueueError::Other(format!("cannot encode task: {e}")))
}

/// A fresh ULID task id (the SQL backends require ULIDs; we use them everywhere).
pub(crate) fn new_task_id() -> String {
    ulid::Ulid::new().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_wire_format_is_versioned() {
        let t = QueueTask::Process {
            event_id: "e1".into(),
            pipeline_version: "p2".into(),
        };
        let json = serde_json::to_value(&t).expect("encode");
        assert_eq!(
            json,
            serde_json::json!({"v": "1", "event_id": "e1", "pipeline_version": "p2"})
        );
        let back: QueueTask = serde_json::from_value(json).expect("decode");
        assert_eq!(back, t);
    }

    #[test]
    fn codec_never_fails() {
        let c = TaskCodec;
        let ok = c
            .decode(&br#"{"v":"1","event_id":"a","pipeline_version":"b"}"#.to_vec())
            .expect("infallible");
        assert!(ok.0.is_ok());
        let bad = c.decode(&b"not json".to_vec()).expect("infallible");
        assert!(bad.0.is_err());
        let future = c.decode(&br#"{"v":"2","x":1}"#.to_vec()).expect("infallible");
        assert!(future.0.is_err());
    }

    #[test]
    fn task_ids_are_ulids() {
        let id = new_task_id();
        assert!(id.parse::<ulid::Ulid>().is_ok());
    }
}
