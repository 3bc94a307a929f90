//! The ComfyUI dialect (`docs/comfyui-protocol.md` is the reference for every
//! shape): its node definitions, routes, WebSocket messages, prompt queue and
//! the graph executor that turns API-format prompts of our nodes into engine
//! jobs.
//!
//! - `nodes`: the node definitions in `/object_info` format (`node_defs/`).
//! - `graph`: parsing and validating prompts against node definitions, the
//!   execution order and the output-cache signatures (pure logic).
//! - `queue`: the prompt queue and history; `executor`: runs prompts (on its
//!   own thread), node by node, through the engine; `images`: how IMAGE values
//!   travel and are written; `loss_graph`: the loss curve as an image.
//! - `hub`: messages on their way to `/ws`; `socket`: the `/ws` route.
//! - Routes, each bare and under `/api/`: `routes` (discovery, `/view`),
//!   `prompt` (`/prompt`, `/fluxlora/run`), `history` (queue, history, jobs,
//!   interrupt), `upload` (`/upload/image`, with `multipart`), `userdata`
//!   (users, settings, saved workflows), `frontend` (the official front end's
//!   static files, our `js/` extension, the small boot routes).
//! - `state`: what the routes share; `folders`: output/input/temp; `ids`:
//!   ComfyUI's id forms.
//!
//! Must not: touch tensors, or import the other dialects (`native`, `ws`,
//! `webui`); what they share (AppState, admission, errors, paths) lives beside
//! them in `server/`.

mod executor;
mod folders;
mod frontend;
pub(crate) mod graph;
mod history;
mod hub;
mod ids;
mod images;
pub(crate) mod loss_graph;
pub(crate) mod multipart;
pub(crate) mod nodes;
mod prompt;
mod queue;
mod routes;
mod socket;
pub(crate) mod state;
mod upload;
mod userdata;

pub(crate) use routes::folder_lists;

/// Registers every ComfyUI route.
pub(crate) fn routes(table: &mut crate::server::route_table::RouteTable) {
    routes::routes(table);
    prompt::routes(table);
    history::routes(table);
    upload::routes(table);
    userdata::routes(table);
    frontend::routes(table);
    // Last: every GET path no route took is a file of the front end.
    frontend::static_routes(table);
}
