//! Reading a machine configuration document, with errors that name the field and line.

use serde::Deserialize as _;

use crate::types::{EXTENSION_SERVICE_CONFIG, ExtensionServiceConfig, MachineConfig};

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
    } else if message.contains("machine configuration documents") {
        "; give one v1alpha1 document per file (any others must be `kind: ExtensionServiceConfig`)"
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

/// What a document of a configuration file is, by its `kind`.
enum DocKind {
    /// No `kind`: the v1alpha1 machine configuration.
    Machine,
    /// `kind: ExtensionServiceConfig`.
    ExtensionServiceConfig,
    /// Any other `kind`: refused, with its line (see [`KindProbe`]).
    Other,
}

impl DocKind {
    fn of(doc: &serde_yaml::Value) -> Self {
        match doc.get("kind") {
            None => Self::Machine,
            Some(k) if k.as_str() == Some(EXTENSION_SERVICE_CONFIG) => Self::ExtensionServiceConfig,
            Some(_) => Self::Other,
        }
    }
}

/// Decodes only the `kind` of a document whose kind Kiln does not read, so that the error names
/// the kinds it does and carries the line.
#[derive(serde::Deserialize)]
struct KindProbe {
    #[allow(dead_code)] // decoding it is the check
    kind: KnownKind,
}

#[derive(serde::Deserialize)]
enum KnownKind {
    ExtensionServiceConfig,
}

/// Parses a configuration file: one v1alpha1 machine configuration document and any number of
/// `ExtensionServiceConfig` documents, separated by `---`. Unknown fields and kinds are errors
/// naming the field path and the line.
pub fn from_yaml(text: &str) -> Result<MachineConfig, ParseError> {
    // First pass: each document's kind. Stop at the first that does not parse: serde_yaml's
    // document iterator never ends after a syntax error (found by the fuzz tests).
    let mut kinds = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        kinds.push(DocKind::of(&serde_yaml::Value::deserialize(doc)?));
    }
    let machines = kinds
        .iter()
        .filter(|k| matches!(k, DocKind::Machine))
        .count();
    if machines != 1 {
        return Err(ParseError {
            message: format!("the text holds {machines} v1alpha1 machine configuration documents"),
            line: None,
            column: None,
        });
    }
    // Second pass: each document as its type, so that errors carry their line.
    let mut machine = None;
    let mut extension_configs: Vec<ExtensionServiceConfig> = Vec::new();
    for (doc, kind) in serde_yaml::Deserializer::from_str(text).zip(&kinds) {
        match kind {
            DocKind::Machine => machine = Some(MachineConfig::deserialize(doc)?),
            DocKind::ExtensionServiceConfig => {
                let c = ExtensionServiceConfig::deserialize(doc)?;
                if extension_configs.iter().any(|e| e.name == c.name) {
                    return Err(ParseError {
                        message: format!(
                            "two ExtensionServiceConfig documents are named {:?}",
                            c.name
                        ),
                        line: None,
                        column: None,
                    });
                }
                extension_configs.push(c);
            }
            DocKind::Other => {
                KindProbe::deserialize(doc)?;
            }
        }
    }
    let mut machine = machine.ok_or_else(|| ParseError {
        message: "no v1alpha1 machine configuration document".to_owned(),
        line: None,
        column: None,
    })?;
    machine.extension_service_configs = extension_configs;
    Ok(machine)
}

/// Renders a configuration: the machine configuration document, then each
/// `ExtensionServiceConfig` as a document of its own.
pub fn to_yaml(config: &MachineConfig) -> Result<String, serde_yaml::Error> {
    let mut text = serde_yaml::to_string(config)?;
    for c in &config.extension_service_configs {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(c)?);
    }
    Ok(text)
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
        assert!(
            err.to_string()
                .contains("2 v1alpha1 machine configuration documents"),
            "{err}"
        );
    }

    const EXT: &str = "apiVersion: v1alpha1\nkind: ExtensionServiceConfig\nname: hello\nconfigFiles:\n  - content: greeting=hi\n    mountPath: /etc/hello.conf\nenvironment:\n  - GREETING=hi\n";

    #[test]
    fn extension_service_configs_are_documents_of_their_own() {
        let text = format!("{MINIMAL}---\n{EXT}");
        let cfg = from_yaml(&text).unwrap();
        assert_eq!(cfg.extension_service_configs.len(), 1);
        let e = &cfg.extension_service_configs[0];
        assert_eq!(e.name, "hello");
        assert_eq!(e.config_files[0].mount_path, "/etc/hello.conf");
        assert_eq!(e.environment, ["GREETING=hi"]);
        // The order of documents does not matter, and rendering gives them back.
        let first = from_yaml(&format!("{EXT}---\n{MINIMAL}")).unwrap();
        assert_eq!(first, cfg);
        assert_eq!(from_yaml(&to_yaml(&cfg).unwrap()).unwrap(), cfg);
    }

    #[test]
    fn other_kinds_and_fields_are_named_with_their_line() {
        let err = from_yaml(&format!(
            "{MINIMAL}---\napiVersion: v1alpha1\nkind: Bogus\n"
        ))
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown variant `Bogus`"), "{msg}");
        assert!(msg.contains("ExtensionServiceConfig"), "{msg}");
        assert_eq!(err.line, Some(7), "{msg}");
        let err = from_yaml(&format!("{MINIMAL}---\n{EXT}enviroment: []\n")).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `enviroment`"),
            "{err}"
        );
        assert_eq!(err.line, Some(14), "{err}");
        let err = from_yaml(&format!("{MINIMAL}---\n{EXT}---\n{EXT}")).unwrap_err();
        assert!(
            err.to_string()
                .contains("two ExtensionServiceConfig documents are named \"hello\""),
            "{err}"
        );
        let err = from_yaml(EXT).unwrap_err();
        assert!(
            err.to_string()
                .contains("0 v1alpha1 machine configuration documents"),
            "{err}"
        );
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
