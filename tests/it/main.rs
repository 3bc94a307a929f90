//! fluxlora's integration tests, one binary (`cargo test --test it`): each module
//! drives the library or the real server end to end on the built-in tiny model,
//! and `support` holds the helpers they share. One binary links candle once,
//! where one binary per file linked it seven times.
//!
//! Run one area with a filter: `cargo test --test it server::`.

mod support;

mod auth;
mod cli;
mod comfy;
mod demo;
mod engine;
mod faults;
mod frontend;
mod hostile;
mod load;
mod model_formats;
mod parity;
mod server;
mod train;
mod webui;
