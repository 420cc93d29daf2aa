#![no_main]
//! Fuzz target: see `ctrlbus::__fuzz::block` for what it checks.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ctrlbus::__fuzz::block(data));
