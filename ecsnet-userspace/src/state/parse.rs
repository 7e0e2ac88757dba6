//! Reading state and SG files: at most `MAX_FILE_BYTES`, no string over `MAX_STRING_BYTES`
//! (checked before anything is built), and every error named by its JSON path.

use std::{fmt::Write as _, fs, io, io::Read as _, path::Path};

use crate::state::{Problem, StateError};

/// Largest state or SG file ecsnet reads, bytes. The biggest policy the datapath holds (32,768
/// CIDR entries per generation, `sg::TooBig`) written out as `aws ec2
/// describe-security-groups` prints it is about 10 MB; 300,000 bare groups are about 7 MB.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// Longest string accepted anywhere in a state or SG file, or in a state built from the command
/// line (names, ARNs, ids, descriptions), bytes. AWS's longest here are ARNs (ECS task ARNs are
/// under 400 bytes) and descriptions (255).
pub const MAX_STRING_BYTES: usize = 1024;

/// Reading a state or SG file failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Io(#[from] io::Error),
    /// It is larger than `MAX_FILE_BYTES`; nothing of it was kept.
    #[error("{}", Problem::FileTooLarge)]
    TooLarge,
}

/// Reads a state or SG file of at most `MAX_FILE_BYTES`.
pub fn read_limited(path: &Path) -> Result<String, ReadError> {
    let file = fs::File::open(path)?;
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(ReadError::TooLarge);
    }
    Ok(text)
}

/// Refuses a string longer than `MAX_STRING_BYTES`, at the JSON path `path` gives.
pub(super) fn check_len(path: impl FnOnce() -> String, s: &str) -> Result<(), StateError> {
    if s.len() > MAX_STRING_BYTES {
        return Err(StateError::at(
            path(),
            Problem::StringTooLong { len: s.len() },
        ));
    }
    Ok(())
}

/// Walks a JSON document without building it, checking every string (keys included) against
/// `MAX_STRING_BYTES`; the first one too long is left in `found` with its JSON path. A key is
/// checked like any string, then appended to the path of its value.
struct StringCheck<'a> {
    path: &'a mut String,
    found: &'a mut Option<StateError>,
    /// This is an object key, not a value.
    key: bool,
}

impl StringCheck<'_> {
    /// The check of the next value, or object key, below this one.
    fn below(&mut self, key: bool) -> StringCheck<'_> {
        StringCheck {
            path: &mut *self.path,
            found: &mut *self.found,
            key,
        }
    }

    fn check<E: serde::de::Error>(self, s: &str) -> Result<(), E> {
        let key = self.key;
        let path = || {
            if key {
                format!("{} (a key)", self.path)
            } else {
                self.path.clone()
            }
        };
        if let Err(e) = check_len(path, s) {
            *self.found = Some(e);
            return Err(E::custom(if key {
                "key too long"
            } else {
                "string too long"
            }));
        }
        if key {
            self.path.push('.');
            self.path.push_str(s);
        }
        Ok(())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for StringCheck<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.key {
            d.deserialize_str(self)
        } else {
            d.deserialize_any(self)
        }
    }
}

impl<'de> serde::de::Visitor<'de> for StringCheck<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(if self.key {
            "an object key"
        } else {
            "any JSON value"
        })
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<(), E> {
        self.check(s)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let base = self.path.len();
        for i in 0.. {
            self.path.truncate(base);
            write!(self.path, "[{i}]").expect("writing to a String");
            if seq.next_element_seed(self.below(false))?.is_none() {
                break;
            }
        }
        self.path.truncate(base);
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let base = self.path.len();
        loop {
            self.path.truncate(base);
            if map.next_key_seed(self.below(true))?.is_none() {
                break;
            }
            map.next_value_seed(self.below(false))?;
        }
        self.path.truncate(base);
        Ok(())
    }
}

/// The first string of `text` (a JSON document) longer than `MAX_STRING_BYTES`, if any.
fn long_string(text: &str) -> Option<StateError> {
    let mut found = None;
    let mut path = "$".to_owned();
    let check = StringCheck {
        path: &mut path,
        found: &mut found,
        key: false,
    };
    let de = &mut serde_json::Deserializer::from_str(text);
    // Malformed text gets its error, with line and column, from the typed parse.
    let _ = serde::de::DeserializeSeed::deserialize(check, de);
    found
}

/// Parses JSON text into `T`, naming the JSON path of the first bad value. Text over
/// `MAX_FILE_BYTES` and strings over `MAX_STRING_BYTES` are refused before anything is built.
pub fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StateError> {
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(StateError::at("$", Problem::FileTooLarge));
    }
    if let Some(e) = long_string(text) {
        return Err(e);
    }
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." {
            "$".to_owned()
        } else {
            format!("$.{path}")
        };
        // serde_json appends " at line L column C"; keep it, it helps in long files.
        StateError::at(path, Problem::Json(e.into_inner().to_string()))
    })
}
