//! fluxlora: train Flux LoRA adapters and sample images with them.
//!
//! The library holds everything; `main.rs` only parses the command line.

pub mod atomic_file;
pub mod bench;
pub mod clock;
pub mod commands;
pub mod config;
pub mod engine;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod hex;
pub mod model;
pub mod sample;
pub mod server;
pub mod train;

#[cfg(test)]
mod testing;
