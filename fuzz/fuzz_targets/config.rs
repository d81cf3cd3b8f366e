//! The config loader: TOML text to a checked `Config`, `${VAR}` expansion
//! included.
//!
//! Variables named `SET_*` are set (to a value of their own name), `SELF*`
//! are set to a reference to themselves (expansion must not recurse), every
//! other one is unset. Properties:
//! - nothing panics, whatever the text;
//! - a refusal names at least one problem, and the same text gives the same
//!   problems again;
//! - an accepted config's catalog answers lookups for every name in it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fn lookup(name: &str) -> Option<String> {
    if name.starts_with("SET_") {
        Some(name.to_ascii_lowercase())
    } else if name.starts_with("SELF") {
        Some(format!("${{{name}}}"))
    } else {
        None
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match iris::config::parse(text, &lookup) {
        Err(problems) => {
            assert!(!problems.0.is_empty(), "a refusal names a problem");
            let again =
                iris::config::parse(text, &lookup).expect_err("refused once, refused again");
            assert_eq!(problems.to_string(), again.to_string());
        }
        Ok(config) => {
            let catalog = &config.catalog;
            for upstream in catalog.upstreams() {
                let _ = format!("{upstream:?}");
            }
            for client in catalog.clients() {
                for model in catalog.models_for(client) {
                    assert!(catalog.model(&model.name).is_some());
                    assert!(client.may_use(&model.name));
                }
            }
        }
    }
});
