//! Configuration layering: the filter's own configuration text (TOML), with
//! `--set KEY=VALUE` overrides from the command line on top.

use thiserror::Error;

/// A bad configuration or override.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// A `--set` argument is not `KEY=VALUE`.
    #[error("--set {0:?}: expected KEY=VALUE, e.g. delay=300 or stage=data")]
    Set(String),
    /// The configuration text is not TOML.
    #[error("{origin}: {message}")]
    Toml {
        /// Where the text came from (a file name).
        origin: String,
        /// The parser's message, with line and key.
        message: String,
    },
}

/// Applies `KEY=VALUE` overrides to the TOML `base` and returns the merged
/// TOML. A VALUE that is valid TOML (`300`, `true`, `"5m"`, `["a", "b"]`)
/// is taken as such; anything else is taken as a string (`stage=data`).
/// Dotted keys (`a.b=1`) set nested tables.
pub fn merge_settings(base: &str, origin: &str, sets: &[String]) -> Result<String, ConfigError> {
    let mut table: toml::Table = base
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Toml { origin: origin.to_string(), message: e.to_string().trim().to_string() })?;
    for s in sets {
        let (key, value) = s.split_once('=').ok_or_else(|| ConfigError::Set(s.clone()))?;
        let key = key.trim();
        if key.is_empty()
            || !key.split('.').all(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
        {
            return Err(ConfigError::Set(s.clone()));
        }
        let value = value.trim();
        let parsed: toml::Value = match format!("v = {value}").parse::<toml::Table>() {
            Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(value.to_string())),
            Err(_) => toml::Value::String(value.to_string()),
        };
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().unwrap_or(key);
        let mut t = &mut table;
        for p in parts {
            let entry = t.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            t = match entry {
                toml::Value::Table(t) => t,
                _ => return Err(ConfigError::Set(s.clone())),
            };
        }
        t.insert(last.to_string(), parsed);
    }
    Ok(table.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides() {
        let out = merge_settings(
            "delay = 300\nstage = \"rcpt\"",
            "f",
            &["delay=2".into(), "stage=data".into(), "whitelist_clients=[\"10.0.0.0/8\"]".into()],
        )
        .unwrap();
        let t: toml::Table = out.parse().unwrap();
        assert_eq!(t["delay"].as_integer(), Some(2));
        assert_eq!(t["stage"].as_str(), Some("data"));
        assert_eq!(t["whitelist_clients"].as_array().map(Vec::len), Some(1));
        assert!(merge_settings("", "f", &["novalue".into()]).is_err());
        assert!(merge_settings("x = ", "file.toml", &[]).unwrap_err().to_string().contains("file.toml"));
    }
}
