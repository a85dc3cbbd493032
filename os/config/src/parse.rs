//! Reading a machine configuration document, with errors that name the field and line.

use serde::Deserialize as _;

use crate::types::MachineConfig;

/// A document that is not a well-formed v1alpha1 machine configuration.
#[derive(Debug, thiserror::Error)]
#[error("{message}{hint}", hint = hint(message))]
pub struct ParseError {
    /// The field path and what was wrong, as the decoder said it, with `at line L column C`.
    pub message: String,
    /// 1-based line of the problem, when known.
    pub line: Option<usize>,
    /// 1-based column of the problem, when known.
    pub column: Option<usize>,
}

fn hint(message: &str) -> &'static str {
    if message.contains("unknown field") {
        "; remove the field or fix its spelling (docs/machine-config.md lists every field)"
    } else if message.contains("YAML documents") {
        "; give one machine configuration document per file"
    } else {
        ""
    }
}

impl From<serde_yaml::Error> for ParseError {
    fn from(e: serde_yaml::Error) -> Self {
        let location = e.location();
        Self {
            message: e.to_string(),
            line: location.as_ref().map(|l| l.line()),
            column: location.as_ref().map(|l| l.column()),
        }
    }
}

/// Parses a document. Unknown fields are errors naming the field path and the line.
pub fn from_yaml(text: &str) -> Result<MachineConfig, ParseError> {
    // Count documents, stopping at the first that does not parse: serde_yaml's document
    // iterator never ends after a syntax error (found by the fuzz tests).
    let mut documents = 0;
    for doc in serde_yaml::Deserializer::from_str(text) {
        documents += 1;
        if documents > 1 || serde::de::IgnoredAny::deserialize(doc).is_err() {
            break;
        }
    }
    if documents > 1 {
        return Err(ParseError {
            message: format!("the text holds {documents} YAML documents"),
            line: None,
            column: None,
        });
    }
    Ok(serde_yaml::from_str(text)?)
}

/// Renders a document as YAML.
pub fn to_yaml(config: &MachineConfig) -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "version: v1alpha1\nmachine:\n  type: worker\ncluster: {}\n";

    #[test]
    fn minimal_document_parses() {
        let cfg = from_yaml(MINIMAL).unwrap();
        assert!(cfg.persist);
    }

    #[test]
    fn unknown_field_names_path_and_line() {
        let text = "version: v1alpha1\nmachine:\n  type: worker\n  network:\n    interfaces:\n      - interface: eth0\n        adresses: [10.0.0.1/24]\ncluster: {}\n";
        let err = from_yaml(text).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("machine.network.interfaces[0]"), "{msg}");
        assert!(msg.contains("unknown field `adresses`"), "{msg}");
        assert_eq!(err.line, Some(7), "{msg}");
        assert!(msg.contains("remove the field"), "{msg}");
    }

    #[test]
    fn malformed_yaml_fails_promptly() {
        // Regression: these used to hang in the document count.
        for text in ["- a\nb: c", "\t", "key: \"unterminated", "]", "a: ["] {
            assert!(from_yaml(text).is_err(), "{text:?}");
        }
        let err = from_yaml("version: v1alpha1\n---\nversion: v1alpha1\n").unwrap_err();
        assert!(err.to_string().contains("2 YAML documents"), "{err}");
    }

    #[test]
    fn bad_enum_names_the_choices() {
        let err = from_yaml("version: v1alpha1\nmachine:\n  type: master\ncluster: {}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("machine.type"), "{err}");
        assert!(err.contains("controlplane"), "{err}");
    }
}
