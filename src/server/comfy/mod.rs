//! The ComfyUI dialect lives here: its node definitions (`nodes`, from the
//! top-level `node_defs/`), and — as they land — its routes, its WebSocket
//! messages and the graph executor that turns a graph of our nodes into engine
//! jobs.
//!
//! Must not: touch tensors, or import the other dialects (`native`, `ws`,
//! `webui`); what they share (AppState, errors, paths, the presentation of
//! events) lives beside them in `server/`.

pub mod nodes;
