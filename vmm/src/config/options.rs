//! Parsing of cloud-hypervisor style option values: `key=value,key=value`,
//! and sizes with K/M/G suffixes.

use std::collections::BTreeMap;

use super::ConfigError;

/// A parsed `key=value,...` option. A bare word (no `=`) is kept under "".
pub struct OptionValues<'a> {
    option: &'static str,
    values: BTreeMap<&'a str, &'a str>,
}

impl<'a> OptionValues<'a> {
    /// Splits `input`; every key must be one of `known` (or "" when bare words are allowed).
    pub fn parse(option: &'static str, input: &'a str, known: &[&str]) -> Result<Self, ConfigError> {
        let mut values = BTreeMap::new();
        for part in input.split(',') {
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k.trim(), v.trim()),
                None => ("", part.trim()),
            };
            if !known.contains(&key) {
                return Err(ConfigError::Cli {
                    option,
                    message: if key.is_empty() {
                        format!("'{part}' is not of the form key=value")
                    } else {
                        format!("unknown key '{key}' (expected one of: {})", known.join(", "))
                    },
                });
            }
            if values.insert(key, value).is_some() {
                return Err(ConfigError::Cli { option, message: format!("'{key}' given twice") });
            }
        }
        Ok(OptionValues { option, values })
    }

    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.values.get(key).copied()
    }

    pub fn error(&self, message: String) -> ConfigError {
        ConfigError::Cli { option: self.option, message }
    }

    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        self.get(key)
            .map(|v| v.parse::<u64>().map_err(|_| self.error(format!("{key}={v}: not a whole number"))))
            .transpose()
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        self.get(key)
            .map(|v| match v {
                "on" | "true" | "yes" => Ok(true),
                "off" | "false" | "no" => Ok(false),
                _ => Err(self.error(format!("{key}={v}: expected on or off"))),
            })
            .transpose()
    }
}

/// Why a size does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("'{0}' is not a size (examples: 512M, 2G, 1048576)")]
    NotASize(String),
    #[error("'{0}' is too large")]
    TooLarge(String),
}

/// Parses `512M`, `2G`, `4096`, `64K` into bytes.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let input = input.trim();
    let (digits, shift) = match input.char_indices().last() {
        Some((i, 'K' | 'k')) => (&input[..i], 10),
        Some((i, 'M' | 'm')) => (&input[..i], 20),
        Some((i, 'G' | 'g')) => (&input[..i], 30),
        Some((i, 'T' | 't')) => (&input[..i], 40),
        _ => (input, 0),
    };
    let value: u64 = digits.parse().map_err(|_| SizeError::NotASize(input.to_string()))?;
    value.checked_mul(1u64 << shift).ok_or_else(|| SizeError::TooLarge(input.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_suffixes_and_reject_garbage() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999999999G").unwrap_err().to_string().contains("too large"));
    }

    #[test]
    fn options_reject_unknown_and_repeated_keys() {
        assert!(OptionValues::parse("--cpus", "boot=2", &["boot"]).is_ok());
        let unknown = OptionValues::parse("--cpus", "boot=2,bogus=1", &["boot"]).err().expect("unknown key");
        assert!(unknown.to_string().contains("unknown key 'bogus'"));
        assert!(OptionValues::parse("--cpus", "boot=2,boot=3", &["boot"]).is_err());
        assert!(OptionValues::parse("--cpus", "2", &["boot"]).is_err());
    }
}
