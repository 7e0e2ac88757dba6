//! SG files for `sg apply`: a state file, the output of `aws ec2 describe-security-groups`, or a
//! bare list of groups. Only the groups are read; errors name their path in the file given.

use std::{io, path::Path};

use crate::state::{Problem, ReadError, SecurityGroup, StateError, parse, read_limited};

#[derive(Debug, thiserror::Error)]
pub enum SgFileError {
    #[error("cannot read {path}")]
    Read { path: String, source: io::Error },
    #[error("{file}: {error}")]
    Invalid { file: String, error: StateError },
}

impl SgFileError {
    /// Exit code: 2 for a file that is not an SG file, 1 for one that cannot be read.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Invalid { .. } => 2,
            Self::Read { .. } => 1,
        }
    }
}

/// The security groups of an SG file, and the JSON path of their list in it (`$` for a bare
/// list), which names the file's groups in later errors.
pub fn read(file: &Path) -> Result<(&'static str, Vec<SecurityGroup>), SgFileError> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum SgFile {
        Aws {
            #[serde(rename = "SecurityGroups")]
            security_groups: serde_json::Value,
        },
        State {
            #[serde(rename = "securityGroups")]
            security_groups: serde_json::Value,
        },
        List(serde_json::Value),
    }
    let bad = |error| SgFileError::Invalid {
        file: file.display().to_string(),
        error,
    };
    let text = read_limited(file).map_err(|e| match e {
        ReadError::Io(source) => SgFileError::Read {
            path: file.display().to_string(),
            source,
        },
        ReadError::TooLarge => bad(StateError::at("$", Problem::FileTooLarge)),
    })?;
    let value: SgFile = parse(&text).map_err(bad)?;
    let (prefix, list) = match value {
        SgFile::Aws { security_groups } => ("$.SecurityGroups", security_groups),
        SgFile::State { security_groups } => ("$.securityGroups", security_groups),
        SgFile::List(v) => ("$", v),
    };
    let groups = parse(&list.to_string()).map_err(|mut e| {
        e.path = e.path.replacen('$', prefix, 1);
        bad(e)
    })?;
    Ok((prefix, groups))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_text(
        name: &str,
        text: &str,
    ) -> Result<(&'static str, Vec<SecurityGroup>), SgFileError> {
        let dir = std::env::temp_dir().join(format!("ecsnet-sgfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join(name);
        std::fs::write(&f, text).unwrap();
        let r = read(&f);
        let _ = std::fs::remove_file(&f);
        r
    }

    #[test]
    fn reads_the_three_shapes_and_names_paths_in_the_file() {
        let g = r#"{"GroupId": "sg-1"}"#;
        for (text, prefix) in [
            (
                format!(r#"{{"SecurityGroups": [{g}]}}"#),
                "$.SecurityGroups",
            ),
            (
                format!(r#"{{"securityGroups": [{g}], "tasks": []}}"#),
                "$.securityGroups",
            ),
            (format!("[{g}]"), "$"),
        ] {
            let (p, groups) = read_text("ok.json", &text).unwrap();
            assert_eq!((p, groups[0].group_id.as_str()), (prefix, "sg-1"));
        }
        let e = read_text("bad.json", r#"{"SecurityGroups": [{"GroupId": 3}]}"#).unwrap_err();
        let SgFileError::Invalid { error, .. } = &e else {
            panic!("want Invalid, got {e}");
        };
        // (`parse` writes a root list's paths as `$.[0]`, so this reads `$.SecurityGroups.[0]`.)
        assert!(
            error.path.starts_with("$.SecurityGroups") && error.path.ends_with("[0].GroupId"),
            "{error}"
        );
        assert_eq!(e.exit_code(), 2);
        let e = read(Path::new("/nonexistent/sg.json")).unwrap_err();
        assert_eq!(e.exit_code(), 1);
    }
}
