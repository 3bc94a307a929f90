//! `/v1/ws`: the engine's events as WebSocket frames.
//!
//! Text frames carry events as JSON, `{"seq", "job", "type", "time", "data"}`; the
//! first frame is a `hello` whose `seq` is the newest event's. Binary frames carry
//! preview images (a sampling job's latent preview after each step, a training
//! run's sample images at their optimizer step) behind a small big-endian header:
//!
//! | bytes      | field                                          |
//! |------------|------------------------------------------------|
//! | 0..4       | frame type, u32: 1 = preview                   |
//! | 4..8       | image format, u32: 1 = JPEG, 2 = PNG (ComfyUI's codes) |
//! | 8..16      | seq, u64                                       |
//! | 16..20     | step, u32                                      |
//! | 20..22     | job id length n, u16                           |
//! | 22..22+n   | job id, UTF-8                                  |
//! | rest       | the image                                      |
//!
//! Query: `jobs=a,b` (default: all jobs), `since=SEQ` (first replay the stored
//! events after SEQ, for a client that reconnects), `previews=false`, `queue=N`
//! (events held while the client is behind, default 256), `token=`.
//!
//! The engine never waits for a client: each connection has a bounded bus queue
//! that its task drains towards the socket as fast as the client takes frames. A
//! client that falls behind loses previews first; events dropped from its queue are replayed from the
//! job store, so text frames arrive complete and in order. The server pings every
//! 20 s and closes a connection that has been silent for 60 s or has not taken a
//! frame for 60 s. When the daemon stops, every connection is closed with code
//! 1001 (going away), so open clients do not hold up the stop.
//!
//! Must not: touch tensors or change jobs; it only reads events.

use std::future::Future;
use std::time::{Duration, Instant};

use actix_web::http::Method;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{CloseCode, CloseReason, Closed, Message, MessageStream, Session};
use serde::Deserialize;
use serde_json::json;
use utoipa::IntoParams;

use super::errors::{ApiError, BadRequest, NotFound};
use super::present;
use super::route_table::RouteTable;
use super::state::AppState;
use crate::engine::bus::{Received, Subscription};
use crate::engine::events::{Event, EventKind};
use crate::engine::Engine;

/// Events a connection's bus queue holds by default before previews and then
/// events are dropped (`queue=` chooses 1 to [`QUEUE_MAX`]).
const QUEUE_CAPACITY: usize = 256;
const QUEUE_MAX: usize = 4096;
const PING_EVERY: Duration = Duration::from_secs(20);
/// A client heard from neither pong nor message for this long is disconnected.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// A client that takes no frame for this long is disconnected.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Binary frame type of a preview image.
pub(crate) const FRAME_PREVIEW: u32 = 1;
/// Image format code of PNG (ComfyUI uses 1 for JPEG, 2 for PNG).
pub(crate) const FORMAT_PNG: u32 = 2;

pub(super) fn routes(table: &mut RouteTable) {
    table.add(Method::GET, "/v1/ws", connect);
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct WsQuery {
    /// Comma-separated job ids to follow; all jobs when absent.
    #[serde(default)]
    #[param(example = "18f0c2a1b3d-0000,18f0c2a1b3d-0001")]
    jobs: Option<String>,
    /// Replay the stored events with a greater `seq` before live ones.
    #[serde(default)]
    since: Option<u64>,
    /// Send binary preview frames.
    #[serde(default = "yes")]
    #[param(default = yes)]
    previews: bool,
    /// Events the server holds for this connection while the client is behind;
    /// beyond it previews are dropped, then events (replayed from the store when
    /// the client catches up).
    #[serde(default = "default_queue")]
    #[param(default = default_queue, minimum = 1, maximum = 4096)]
    queue: usize,
}

fn default_queue() -> usize {
    QUEUE_CAPACITY
}

fn yes() -> bool {
    true
}

/// What `GET /v1/openapi.json` says of this route, besides its parameters.
const WS_DESCRIPTION: &str = "Upgrades to a WebSocket that streams events of all jobs, or \
of the jobs named in `jobs` (an unknown job id is answered 404 before the upgrade; a request \
that is not a WebSocket upgrade is answered 400).\n\n**Text frames** are JSON `Event` \
objects. The first frame is a `hello` (`HelloEvent`): `{\"seq\": <the newest event's seq at \
connect>, \"job\": null, \"type\": \"hello\", \"time\", \"data\": {\"version\", \"jobs\"}}`. \
With `since`, the stored events with `seq > since` of the subscribed jobs are replayed next, \
then live events follow; a client that reconnects passes the last `seq` it saw.\n\n**Binary \
frames** are preview images (a sampling job's latent preview at each step, and a training run's sample images at their optimizer step), with a big-endian header:\n\n| bytes | \
field |\n|---|---|\n| 0..4 | frame type, u32: 1 = preview |\n| 4..8 | image format, u32: 1 \
= JPEG, 2 = PNG (ComfyUI's codes; the daemon sends PNG) |\n| 8..16 | seq, u64 |\n| 16..20 | \
step, u32 |\n| 20..22 | job id length n, u16 |\n| 22..22+n | job id, UTF-8 |\n| rest | the \
image bytes |\n\nPreviews are sent unless `previews=false` and are never stored or \
replayed.\n\nThe server pings every 20 s and closes a connection that has not been heard from \
(pong or message) for 60 s, or that has not taken a frame for 60 s; client pings are \
answered with pongs; client text frames are ignored. The engine never waits for a client: a \
client that falls behind loses previews first, and events it missed are replayed from the \
store, so text events arrive complete and in `seq` order.";

/// Upgrades to a WebSocket and streams events until the client leaves.
#[utoipa::path(
    get,
    path = "/v1/ws",
    tag = "events",
    operation_id = "connectEvents",
    summary = "Live events over a WebSocket",
    description = WS_DESCRIPTION,
    params(WsQuery),
    responses(
        (status = 101, description = "Switching protocols: the WebSocket is open."),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
pub(crate) async fn connect(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
    query: web::Query<WsQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = query.into_inner();
    let jobs: Option<Vec<String>> = query.jobs.as_deref().map(|s| {
        s.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    });
    for id in jobs.iter().flatten() {
        state.engine.job(id)?;
    }
    if !(1..=QUEUE_MAX).contains(&query.queue) {
        return Err(ApiError::BadRequest {
            message: format!("queue must be between 1 and {QUEUE_MAX} events"),
            field: Some("queue".into()),
        });
    }
    let (response, session, messages) = actix_ws::handle(&req, body).map_err(|e| {
        ApiError::bad(format!(
            "/v1/ws needs a WebSocket upgrade request (a WebSocket client): {e}"
        ))
    })?;
    // Subscribe before reading the store, so nothing falls between replay and live.
    let subscription = state
        .engine
        .subscribe(jobs.clone(), query.queue, query.previews);
    let connection = Connection {
        engine: state.engine.clone(),
        session,
        jobs,
        last_sent: subscription.after(),
    };
    let stopping = state.stopping.subscribe();
    actix_web::rt::spawn(connection.run(query.since, subscription, messages, stopping));
    Ok(response)
}

/// The client went away or stopped taking frames.
struct Gone;

/// Why a connection ended in order.
enum Ending {
    ClientLeft,
    Stopping,
}

/// One client's connection.
struct Connection {
    engine: Engine,
    session: Session,
    jobs: Option<Vec<String>>,
    /// The newest event sent (at first: the newest before the subscription);
    /// older ones from the live queue were replayed already.
    last_sent: u64,
}

impl Connection {
    /// Serves until the client leaves or `stopping` turns `true`.
    async fn run(
        mut self,
        since: Option<u64>,
        events: Subscription,
        mut messages: MessageStream,
        mut stopping: tokio::sync::watch::Receiver<bool>,
    ) {
        let served = self.serve(since, &events, &mut messages, &mut stopping);
        let reason = match served.await {
            Ok(Ending::Stopping) => Some(CloseReason {
                code: CloseCode::Away,
                description: Some("the daemon is stopping".into()),
            }),
            _ => None,
        };
        let _ = self.session.close(reason).await;
    }

    async fn serve(
        &mut self,
        since: Option<u64>,
        events: &Subscription,
        messages: &mut MessageStream,
        stopping: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<Ending, Gone> {
        let hello = json!({
            "seq": self.last_sent,
            "job": null,
            "type": "hello",
            "time": crate::clock::unix_now(),
            "data": {"version": env!("CARGO_PKG_VERSION"), "jobs": self.jobs},
        });
        self.send_text(hello.to_string()).await?;
        if let Some(since) = since {
            // A `since` beyond the newest event (from before a restart) replays
            // nothing and must not hide the events to come.
            self.last_sent = since.min(self.last_sent);
            self.replay().await?;
        }
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                received = events.next() => match received {
                    Received::Event(e) => self.deliver(e).await?,
                    // Events were dropped while this client was behind: from the store.
                    Received::Missed(_) => self.replay().await?,
                    Received::Timeout => return Err(Gone),
                },
                message = messages.recv() => {
                    last_heard = Instant::now();
                    match message {
                        Some(Ok(Message::Ping(bytes))) => {
                            within(self.session.pong(&bytes)).await?;
                        }
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return Ok(Ending::ClientLeft),
                        // Pongs, and client text is not part of the protocol: ignored.
                        Some(Ok(_)) => {}
                    }
                },
                _ = stopping.wait_for(|stopping| *stopping) => return Ok(Ending::Stopping),
                _ = ping.tick() => {
                    if last_heard.elapsed() > CLIENT_TIMEOUT {
                        return Err(Gone);
                    }
                    within(self.session.ping(b"")).await?;
                }
            }
        }
    }

    /// Sends a live event, unless a replay already covered it.
    async fn deliver(&mut self, event: Event) -> Result<(), Gone> {
        if event.seq <= self.last_sent {
            return Ok(());
        }
        if let EventKind::Preview { step, png } = &event.kind {
            let frame = preview_frame(&event.job, event.seq, *step, png);
            return within(self.session.binary(frame)).await;
        }
        self.last_sent = event.seq;
        let json = present::event(&self.engine, &event);
        self.send_text(json.to_string()).await
    }

    /// Sends the stored events after `last_sent` of the subscribed jobs.
    async fn replay(&mut self) -> Result<(), Gone> {
        let engine = self.engine.clone();
        let jobs = self.jobs.clone();
        let since = self.last_sent;
        let events = web::block(move || engine.replay(jobs.as_deref(), since))
            .await
            .map_err(|_| Gone)?;
        for event in events {
            self.last_sent = self.last_sent.max(event.seq);
            let json = present::event(&self.engine, &event);
            self.send_text(json.to_string()).await?;
        }
        Ok(())
    }

    async fn send_text(&mut self, text: String) -> Result<(), Gone> {
        within(self.session.text(text)).await
    }
}

/// Waits for a send, giving up on a client that takes no frame for [`SEND_TIMEOUT`].
async fn within(send: impl Future<Output = Result<(), Closed>>) -> Result<(), Gone> {
    match tokio::time::timeout(SEND_TIMEOUT, send).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(Gone),
    }
}

/// A binary preview frame (layout in the module comment).
pub(crate) fn preview_frame(job: &str, seq: u64, step: u64, png: &[u8]) -> Vec<u8> {
    let job = &job.as_bytes()[..job.len().min(u16::MAX as usize)];
    let mut frame = Vec::with_capacity(22 + job.len() + png.len());
    frame.extend_from_slice(&FRAME_PREVIEW.to_be_bytes());
    frame.extend_from_slice(&FORMAT_PNG.to_be_bytes());
    frame.extend_from_slice(&seq.to_be_bytes());
    frame.extend_from_slice(&u32::try_from(step).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(&(job.len() as u16).to_be_bytes());
    frame.extend_from_slice(job);
    frame.extend_from_slice(png);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_queue_bounds_are_the_checked_ones() {
        let params = WsQuery::into_params(|| None);
        let queue = params.iter().find(|p| p.name == "queue").unwrap();
        let schema = serde_json::to_value(&queue.schema).unwrap();
        assert_eq!(schema["maximum"], json!(QUEUE_MAX));
        assert_eq!(schema["minimum"], json!(1));
        assert_eq!(schema["default"], json!(QUEUE_CAPACITY));
    }

    #[test]
    fn preview_frames_follow_the_documented_layout() {
        let png = [0x89, b'P', b'N', b'G'];
        let frame = preview_frame("job-7", 0x0102_0304_0506_0708, 12, &png);
        assert_eq!(&frame[0..4], &[0, 0, 0, 1]);
        assert_eq!(&frame[4..8], &[0, 0, 0, 2]);
        assert_eq!(&frame[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&frame[16..20], &[0, 0, 0, 12]);
        assert_eq!(&frame[20..22], &[0, 5]);
        assert_eq!(&frame[22..27], b"job-7");
        assert_eq!(&frame[27..], &png);
    }
}
