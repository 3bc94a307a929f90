//! Fuzz target: `fluxlora::fuzzing::read_lora` on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluxlora::fuzzing::read_lora(data));
