//! Fuzz target: `fluxlora::fuzzing::parse_train_config` on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluxlora::fuzzing::parse_train_config(data));
