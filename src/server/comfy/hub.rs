//! [`Hub`]: ComfyUI's WebSocket messages on their way from the executor and
//! the queue to the `/ws` connections (`docs/comfyui-protocol.md` §2).
//!
//! A message is addressed to one client id (the prompt's `client_id`) or to
//! every socket. Per-prompt messages of a prompt queued without a client id
//! are not sent at all, except those ComfyUI broadcasts then (progress,
//! previews, `execution_interrupted`): [`Hub::to_client`] and
//! [`Hub::to_client_or_all`] make that choice. Previews carry their image and
//! metadata; each connection frames them as its client's feature flags ask
//! (type 1, or type 4 with metadata).
//!
//! The hub never waits for a socket: it is a bounded broadcast channel, and a
//! connection that falls more than [`CAPACITY`] messages behind skips ahead.
//!
//! Must not: know about prompts or jobs; it only carries.

use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::broadcast;

/// Messages held for a slow connection before it skips ahead.
pub(crate) const CAPACITY: usize = 4096;

/// What goes to the sockets.
#[derive(Clone, Debug)]
pub(crate) enum Payload {
    /// A JSON text message `{"type", "data"}`, serialized once.
    Text(Arc<str>),
    /// A preview image (PNG) and the metadata of ComfyUI's type 4 frame.
    Preview {
        png: Arc<[u8]>,
        metadata: Arc<Value>,
    },
}

/// One message and whom it is for (`None`: every socket).
#[derive(Clone, Debug)]
pub(crate) struct Addressed {
    pub to: Option<Arc<str>>,
    pub payload: Payload,
}

impl Addressed {
    /// Whether the socket of client `sid` gets it.
    pub(crate) fn is_for(&self, sid: &str) -> bool {
        self.to.as_deref().is_none_or(|to| to == sid)
    }
}

/// The fan-out to every `/ws` connection.
#[derive(Clone)]
pub(crate) struct Hub {
    tx: broadcast::Sender<Addressed>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(CAPACITY).0,
        }
    }
}

/// The text of a `{"type", "data"}` message.
pub(crate) fn message(kind: &str, data: Value) -> Arc<str> {
    json!({"type": kind, "data": data}).to_string().into()
}

impl Hub {
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Addressed> {
        self.tx.subscribe()
    }

    fn send(&self, to: Option<&str>, payload: Payload) {
        // No receiver is not an error: nobody listens.
        let _ = self.tx.send(Addressed {
            to: to.map(Arc::from),
            payload,
        });
    }

    /// To every socket.
    pub(crate) fn broadcast(&self, kind: &str, data: Value) {
        self.send(None, Payload::Text(message(kind, data)));
    }

    /// To the client's sockets; nowhere when the prompt has no client id.
    pub(crate) fn to_client(&self, client: Option<&str>, kind: &str, data: Value) {
        if let Some(client) = client {
            self.send(Some(client), Payload::Text(message(kind, data)));
        }
    }

    /// To the client's sockets, or to every socket when the prompt has none.
    pub(crate) fn to_client_or_all(&self, client: Option<&str>, kind: &str, data: Value) {
        self.send(client, Payload::Text(message(kind, data)));
    }

    /// A preview image for the client (every socket when none).
    pub(crate) fn preview(&self, client: Option<&str>, png: Arc<[u8]>, metadata: Value) {
        self.send(
            client,
            Payload::Preview {
                png,
                metadata: Arc::new(metadata),
            },
        );
    }
}

/// ComfyUI's binary event type of a preview image, and of one with metadata.
pub(crate) const PREVIEW_IMAGE: u32 = 1;
pub(crate) const PREVIEW_IMAGE_WITH_METADATA: u32 = 4;
/// ComfyUI's image format code of PNG in a type 1 frame.
const FORMAT_PNG: u32 = 2;

/// A preview as ComfyUI frames it: type 1 `[1][2 = PNG][png]`, or type 4
/// `[4][n][n bytes of JSON metadata][png]`; integers big-endian u32.
pub(crate) fn preview_frame(png: &[u8], metadata: &Value, with_metadata: bool) -> Vec<u8> {
    let mut frame = Vec::with_capacity(png.len() + 256);
    if with_metadata {
        let meta = metadata.to_string();
        frame.extend_from_slice(&PREVIEW_IMAGE_WITH_METADATA.to_be_bytes());
        frame.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        frame.extend_from_slice(meta.as_bytes());
    } else {
        frame.extend_from_slice(&PREVIEW_IMAGE.to_be_bytes());
        frame.extend_from_slice(&FORMAT_PNG.to_be_bytes());
    }
    frame.extend_from_slice(png);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_follow_comfyui_layouts() {
        let png = [0x89, b'P', b'N', b'G'];
        let one = preview_frame(&png, &json!({"node_id": "3"}), false);
        assert_eq!(&one[..8], &[0, 0, 0, 1, 0, 0, 0, 2]);
        assert_eq!(&one[8..], &png);
        let four = preview_frame(&png, &json!({"node_id": "3"}), true);
        let n = u32::from_be_bytes(four[4..8].try_into().unwrap()) as usize;
        assert_eq!(&four[..4], &[0, 0, 0, 4]);
        let meta: Value = serde_json::from_slice(&four[8..8 + n]).unwrap();
        assert_eq!(meta["node_id"], "3");
        assert_eq!(&four[8 + n..], &png);
    }

    #[test]
    fn messages_reach_their_client_or_everyone() {
        let hub = Hub::default();
        let mut rx = hub.subscribe();
        hub.to_client(None, "executing", json!({}));
        hub.to_client(Some("a"), "executing", json!({"node": "1"}));
        hub.to_client_or_all(None, "progress", json!({}));
        let first = rx.try_recv().unwrap();
        assert!(first.is_for("a") && !first.is_for("b"));
        let second = rx.try_recv().unwrap();
        assert!(second.is_for("a") && second.is_for("b"));
        assert!(
            rx.try_recv().is_err(),
            "a prompt without a client id is not announced"
        );
        let Payload::Text(text) = &first.payload else {
            panic!()
        };
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(v, json!({"type": "executing", "data": {"node": "1"}}));
    }
}
