//! Model code: the Flux DiT, LoRA adapters and their files, text encoders,
//! the autoencoder and model bundles. Nothing here knows about HTTP or jobs.

pub mod adapter;
pub mod bundle;
pub(crate) mod clip;
pub mod flux;
pub(crate) mod frozen_linear;
pub(crate) mod fused_grad;
pub mod keymap;
pub(crate) mod layers;
pub mod lora_io;
pub mod seeded;
pub(crate) mod text;
pub(crate) mod vae;
