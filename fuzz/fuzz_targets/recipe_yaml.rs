#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mmx::fuzzing::feed(mmx::fuzzing::Target::RecipeYaml, data);
});
