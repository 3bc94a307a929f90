//! Fuzz target: `fluxlora::fuzzing::validate_graph` on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluxlora::fuzzing::validate_graph(data));
