//! The ComfyUI dialect: its node definitions (`nodes`, from the top-level
//! `node_defs/`), and, as they land, its routes, its WebSocket messages and the
//! graph executor that turns API-format prompts of our nodes into engine jobs
//! (`docs/comfyui-protocol.md` is the reference for every shape).
//!
//! - `nodes`: the node definitions in `/object_info` format.
//! - `routes`: the HTTP routes, bare and under `/api/`; `state`: what they
//!   share; `folders`: ComfyUI's output/input/temp folders; `prompt`:
//!   `POST /prompt` (validation; execution not yet).
//! - `graph`: parsing and validating prompts against node definitions, the
//!   execution order and the output-cache signatures (pure logic).
//!
//! Must not: touch tensors, or import the other dialects (`native`, `ws`,
//! `webui`); what they share (AppState, errors, paths, the presentation of
//! events) lives beside them in `server/`.

mod folders;
pub(crate) mod graph;
pub(crate) mod loss_graph;
pub(crate) mod multipart;
pub(crate) mod nodes;
mod prompt;
mod routes;
pub(crate) mod state;

/// Registers every ComfyUI route.
pub(crate) fn routes(table: &mut crate::server::route_table::RouteTable) {
    routes::routes(table);
    prompt::routes(table);
}
