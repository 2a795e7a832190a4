//! Configuration text from an operator: `--set KEY=VALUE` layering over a
//! filter's TOML, then the reference filter's configuration parser. No
//! panic; a merge that succeeds yields TOML that parses again and carries
//! every key that was set.
#![no_main]

use greyhook_fuzz::config::merge_settings;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // The first line is the TOML base, the others `--set` arguments.
    let mut lines = text.split('\n');
    let base = lines.next().unwrap_or("").replace('\u{1}', "\n");
    let sets: Vec<String> = lines.take(8).map(str::to_string).collect();
    let _ = greylist_guest::config::Config::parse(&base);
    if let Ok(merged) = merge_settings(&base, "fuzz", &sets) {
        let table: toml::Table = merged.parse().expect("merged configuration is TOML");
        for s in &sets {
            let key = s.split_once('=').map(|(k, _)| k.trim()).unwrap_or("");
            let mut t = &table;
            let parts: Vec<&str> = key.split('.').collect();
            for (i, p) in parts.iter().enumerate() {
                let v = t.get(*p).unwrap_or_else(|| panic!("{key} lost in {merged:?}"));
                if i + 1 < parts.len() {
                    match v.as_table() {
                        Some(inner) => t = inner,
                        // A later --set replaced the table with a value.
                        None => break,
                    }
                }
            }
        }
        let _ = greylist_guest::config::Config::parse(&merged);
    }
});
