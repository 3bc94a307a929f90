//! `/ws?clientId=`: ComfyUI's WebSocket (`docs/comfyui-protocol.md` §2). On
//! connect the socket gets `status` with its `sid` (the `clientId` given, else
//! a new hex id), and `executing` when its client's prompt is running a node;
//! then every [`Hub`](super::hub::Hub) message for its sid or for everyone.
//! The client's first text message may be `feature_flags`: it is answered with
//! the server's flags, and a client that sets `supports_preview_metadata`
//! gets previews as type 4 frames (with metadata) instead of type 1.
//!
//! Must not: change the queue or jobs; it only forwards.

use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{CloseCode, CloseReason, Message, MessageStream, Session};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use super::hub::{message, preview_frame, Addressed, Payload};
use super::ids;
use crate::server::errors::ApiError;
use crate::server::state::AppState;

const PING_EVERY: Duration = Duration::from_secs(20);
/// A client heard from neither pong nor message for this long is disconnected.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// A client that takes no frame for this long is disconnected.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Deserialize)]
pub(super) struct SocketQuery {
    #[serde(default, rename = "clientId")]
    client_id: Option<String>,
}

pub(super) async fn connect(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
    query: web::Query<SocketQuery>,
) -> Result<HttpResponse, ApiError> {
    let (response, session, messages) = actix_ws::handle(&req, body).map_err(|e| {
        ApiError::bad(format!(
            "/ws needs a WebSocket upgrade request (a WebSocket client): {e}"
        ))
    })?;
    let sid = query
        .client_id
        .clone()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(ids::hex32);
    // Subscribe before the first message: nothing sent after it is missed.
    let hub = state.comfy.hub.subscribe();
    let mut hello = vec![message(
        "status",
        json!({"status": state.comfy.queue.status()["status"], "sid": sid}),
    )];
    for (prompt_id, client, node) in state.comfy.queue.running() {
        if let (Some(client), Some(node)) = (client, node) {
            if client == sid {
                hello.push(message(
                    "executing",
                    json!({"node": node, "display_node": node, "prompt_id": prompt_id}),
                ));
            }
        }
    }
    let socket = Socket {
        sid,
        session,
        previews_with_metadata: false,
        flags_seen: false,
        server_flags: server_features(&state),
    };
    let stopping = state.stopping.subscribe();
    actix_web::rt::spawn(socket.run(hello, hub, messages, stopping));
    Ok(response)
}

/// The server's feature flags (also the answer to a client's `feature_flags`).
pub(super) fn server_features(state: &AppState) -> Value {
    json!({
        // Previews go out as type 4 frames to clients that ask, else type 1.
        "supports_preview_metadata": true,
        "supports_model_type_tags": false,
        "max_upload_size": state.comfy.max_upload,
        "extension": {"manager": {"supports_v4": false}},
        "node_replacements": false,
        "assets": false,
    })
}

struct Socket {
    sid: String,
    session: Session,
    previews_with_metadata: bool,
    /// Only the first text message may be `feature_flags`.
    flags_seen: bool,
    server_flags: Value,
}

/// The client went away or stopped taking frames.
struct Gone;

impl Socket {
    async fn run(
        mut self,
        hello: Vec<std::sync::Arc<str>>,
        mut hub: tokio::sync::broadcast::Receiver<Addressed>,
        mut messages: MessageStream,
        mut stopping: tokio::sync::watch::Receiver<bool>,
    ) {
        let served = self
            .serve(hello, &mut hub, &mut messages, &mut stopping)
            .await;
        let reason = matches!(served, Ok(true)).then(|| CloseReason {
            code: CloseCode::Away,
            description: Some("the daemon is stopping".into()),
        });
        let _ = self.session.close(reason).await;
    }

    /// Serves until the client leaves (`Ok(false)`) or the daemon stops (`Ok(true)`).
    async fn serve(
        &mut self,
        hello: Vec<std::sync::Arc<str>>,
        hub: &mut tokio::sync::broadcast::Receiver<Addressed>,
        messages: &mut MessageStream,
        stopping: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<bool, Gone> {
        for text in hello {
            self.text(&text).await?;
        }
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                received = hub.recv() => match received {
                    Ok(m) if m.is_for(&self.sid) => self.forward(m.payload).await?,
                    Ok(_) => {}
                    // Fell behind by more than the hub holds: go on with what is there.
                    Err(RecvError::Lagged(n)) => tracing::warn!(sid = %self.sid, skipped = n, "slow ComfyUI socket skipped messages"),
                    Err(RecvError::Closed) => return Ok(true),
                },
                message = messages.recv() => {
                    last_heard = Instant::now();
                    match message {
                        Some(Ok(Message::Ping(bytes))) => within(self.session.pong(&bytes)).await?,
                        Some(Ok(Message::Text(text))) => self.client_text(&text).await?,
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return Ok(false),
                        Some(Ok(_)) => {}
                    }
                },
                _ = stopping.wait_for(|stopping| *stopping) => return Ok(true),
                _ = ping.tick() => {
                    if last_heard.elapsed() > CLIENT_TIMEOUT {
                        return Err(Gone);
                    }
                    within(self.session.ping(b"")).await?;
                }
            }
        }
    }

    async fn forward(&mut self, payload: Payload) -> Result<(), Gone> {
        match payload {
            Payload::Text(text) => self.text(&text).await,
            Payload::Preview { png, metadata } => {
                let frame = preview_frame(&png, &metadata, self.previews_with_metadata);
                within(self.session.binary(frame)).await
            }
        }
    }

    /// The `feature_flags` exchange: only as the client's first text message.
    async fn client_text(&mut self, text: &str) -> Result<(), Gone> {
        if std::mem::replace(&mut self.flags_seen, true) {
            return Ok(());
        }
        let Ok(message) = serde_json::from_str::<Value>(text) else {
            return Ok(());
        };
        if message["type"] != "feature_flags" {
            return Ok(());
        }
        self.previews_with_metadata = message["data"]["supports_preview_metadata"] == true;
        let answer = super::hub::message("feature_flags", self.server_flags.clone());
        self.text(&answer).await
    }

    async fn text(&mut self, text: &str) -> Result<(), Gone> {
        within(self.session.text(text.to_string())).await
    }
}

async fn within(
    send: impl std::future::Future<Output = Result<(), actix_ws::Closed>>,
) -> Result<(), Gone> {
    match tokio::time::timeout(SEND_TIMEOUT, send).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(Gone),
    }
}
