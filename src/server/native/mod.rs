//! The native `/v1` API, one module per resource: `jobs` (submit, list, get,
//! delete, control, events, files), `sample` (synchronous sampling), `loras`,
//! `models`, `system` (the daemon, and its node definitions).
//!
//! Handlers translate HTTP into engine calls and back, nothing else: paths in
//! requests go through `paths`, events through `present`, failures through
//! `errors`. Each handler's `#[utoipa::path]` is its entry in the OpenAPI
//! document.
//!
//! Must not: touch tensors, or import the other dialects' routes (`ws`, `comfy`
//! routes).

pub(super) mod jobs;
pub(super) mod loras;
pub(super) mod models;
pub(super) mod sample;
pub(super) mod system;

use super::route_table::RouteTable;

/// Registers every `/v1` route of this module.
pub(super) fn routes(table: &mut RouteTable) {
    system::routes(table);
    models::routes(table);
    jobs::routes(table);
    sample::routes(table);
    loras::routes(table);
}
