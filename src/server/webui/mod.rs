//! The A1111 / Forge dialect: the `/sdapi/v1` routes that tools written for
//! AUTOMATIC1111's web UI call (`webuiapi`, editor plug-ins, bots), answered with
//! Flux and our LoRAs. Shapes follow A1111's `modules/api/api.py` and
//! `models.py`; Flux guidance follows Forge (`distilled_cfg_scale`).
//!
//! - `request`: the txt2img request with A1111's defaults, and the checks that
//!   turn it into a plan (what is served, what is refused: see there, including
//!   how `cfg_scale` 7 is read); `lora_tags`: `<lora:name:multiplier>` in prompts.
//! - `txt2img`: runs a plan through the engine (txt2img and img2img); `img2img`:
//!   the start image and denoising strength; `info`: the `info` JSON.
//! - `lists`: scripts, samplers, schedulers, models, modules, upscalers,
//!   embeddings, LoRAs, options; `system`: `/cmd-flags`, `/memory`;
//!   `progress`: `/progress`, `/interrupt`, `/skip`; `state`: what they share.
//! - `png_info`: `/png-info`, our PNGs' parameters read back.
//! - `errors`: A1111's error shapes, mapped once, and the 404 of the routes we
//!   do not implement.
//!
//! Must not: touch tensors, or import the other dialects (`native`, `comfy`,
//! `ws`); what they share lives beside them in `server/`.

use actix_web::http::Method;

mod errors;
mod img2img;
mod info;
mod lists;
mod lora_tags;
mod png_info;
mod progress;
mod request;
pub(crate) mod state;
mod system;
mod txt2img;

/// Registers every A1111 route.
pub(crate) fn routes(table: &mut crate::server::route_table::RouteTable) {
    txt2img::routes(table);
    lists::routes(table);
    progress::routes(table);
    png_info::routes(table);
    system::routes(table);
    // Last: whatever `/sdapi/…` route the others did not take.
    for method in [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
    ] {
        table.add(method, "/sdapi/{rest:.*}", errors::not_implemented);
    }
}
