//! Natural keys: canonical fields whose normalised values identify a record.

use crdt_model::{Record, Value};

use crate::config::Normalize;

/// The fields identifying a record of a collection, each with its normalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NaturalKey {
    fields: Vec<(String, Vec<Normalize>)>,
}

/// Separates the parts of a key made of several fields (a unit separator, which no
/// normalised part holds).
const PART_SEPARATOR: char = '\u{1f}';

/// How key fields are normalised when the configuration does not say.
pub(super) const NORMALIZE_DEFAULT: [Normalize; 2] = [Normalize::Trim, Normalize::Lowercase];

impl NaturalKey {
    /// A key made of `fields`, each normalised by its steps in order.
    pub fn new(fields: Vec<(String, Vec<Normalize>)>) -> NaturalKey {
        debug_assert!(!fields.is_empty(), "a natural key has a field");
        NaturalKey { fields }
    }

    /// The key's fields.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|(f, _)| f.as_str())
    }

    /// The normalised key of a record with canonical `fields`; `None` when a key
    /// field has no value (or nothing is left of it), so the record has no natural
    /// key and is never matched by one.
    pub fn of(&self, fields: &Record) -> Option<String> {
        let mut key = String::new();
        for (i, (field, steps)) in self.fields.iter().enumerate() {
            let text = match fields.get(field)? {
                Value::Null => return None,
                Value::Text(text) => text.clone(),
                Value::Decimal(d) => d.as_str().to_owned(),
                other => other.to_string(),
            };
            let part = steps
                .iter()
                .fold(text, |text, step| normalize(&text, *step));
            if part.is_empty() {
                return None;
            }
            if i > 0 {
                key.push(PART_SEPARATOR);
            }
            key.push_str(&part);
        }
        Some(key)
    }
}

fn normalize(text: &str, step: Normalize) -> String {
    match step {
        Normalize::Trim => text.split_whitespace().collect::<Vec<_>>().join(" "),
        Normalize::Lowercase => text.to_lowercase(),
        Normalize::Digits => text.chars().filter(char::is_ascii_digit).collect(),
        Normalize::Alphanumeric => text.chars().filter(|c| c.is_alphanumeric()).collect(),
    }
    .chars()
    .filter(|c| *c != PART_SEPARATOR)
    .collect()
}
