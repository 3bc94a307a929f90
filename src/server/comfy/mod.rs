//! The ComfyUI dialect: ComfyUI's routes, its WebSocket messages and a graph
//! executor that turns API-format prompts into the engine's jobs
//! (`docs/comfyui-protocol.md` is the reference for every shape).
//!
//! - `graph`: parsing and validating prompts against node definitions, the
//!   execution order and the output-cache signatures (pure logic).
//!
//! Must not: touch tensors; nodes become engine jobs, nothing runs here directly.

pub mod graph;
