//! Configuration patches: strategic-merge YAML patches and RFC 6902 JSON patches, read from a
//! file (`@file.yaml`) or given inline, applied in order.
//!
//! A patch that is a YAML map is a strategic merge: maps merge key by key, lists append, except
//! `machine.network.interfaces` (merged by `interface`) and `vlans` (merged by `vlanId`); a map
//! holding `$patch: delete` removes the key or list item it replaces. A patch that is a list is
//! a JSON patch (`[{op: replace, path: /machine/network/hostname, value: cp-1}]`).

use std::path::PathBuf;

use serde::Deserialize as _;
use serde_yaml::{Mapping, Value};

use crate::parse::{self, ParseError};
use crate::types::{EXTENSION_SERVICE_CONFIG, ExtensionServiceConfig, MachineConfig};

/// One patch and where it came from (for messages).
#[derive(Debug, Clone)]
pub struct Patch {
    /// `@path` or `inline patch`.
    pub source: String,
    /// What it does.
    pub kind: PatchKind,
    /// `ExtensionServiceConfig` documents in the patch (`---` separated from the rest): each
    /// replaces the configuration's document of the same name, or is added.
    pub extension_service_configs: Vec<ExtensionServiceConfig>,
}

/// The two kinds of patches.
#[derive(Debug, Clone)]
pub enum PatchKind {
    /// A YAML map merged into the document.
    StrategicMerge(Mapping),
    /// RFC 6902 operations.
    Json(json_patch::Patch),
}

/// Why a patch could not be read or applied.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// `@file` could not be read.
    #[error("patch {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text is not YAML.
    #[error("patch {source_name}: not valid YAML: {error}")]
    Yaml {
        /// Where it came from.
        source_name: String,
        /// The parser's message.
        error: serde_yaml::Error,
    },
    /// Two documents that are not `ExtensionServiceConfig`.
    #[error(
        "patch {source_name}: holds two patches of the machine configuration; give one per file \
         (other documents must be `kind: ExtensionServiceConfig`)"
    )]
    TwoMachinePatches {
        /// Where it came from.
        source_name: String,
    },
    /// Neither a map nor a list.
    #[error(
        "patch {source_name}: a patch is either a YAML map (strategic merge) or a list of JSON \
         patch operations, not {found}"
    )]
    Shape {
        /// Where it came from.
        source_name: String,
        /// What it was.
        found: &'static str,
    },
    /// A list that is not made of RFC 6902 operations.
    #[error(
        "patch {source_name}: operation #{index}: {error}; each JSON patch operation needs `op` \
         (add, remove, replace, move, copy, test) and `path`, e.g. \
         {{op: replace, path: /machine/network/hostname, value: cp-1}}"
    )]
    JsonShape {
        /// Where it came from.
        source_name: String,
        /// 1-based index of the bad operation.
        index: usize,
        /// The decoder's message.
        error: serde_json::Error,
    },
    /// A JSON patch operation failed against the document.
    #[error("patch {source_name}: operation #{index} ({operation}) failed: {reason}")]
    Operation {
        /// Where it came from.
        source_name: String,
        /// 1-based index of the failing operation.
        index: usize,
        /// The operation, as JSON.
        operation: String,
        /// Why it failed.
        reason: String,
    },
    /// The document is not representable as JSON (JSON patches need string keys).
    #[error("patch {source_name}: the document cannot be converted to JSON: {error}")]
    Convert {
        /// Where it came from.
        source_name: String,
        /// The converter's message.
        error: String,
    },
    /// The patched document is not a valid machine configuration.
    #[error("the document after applying the patches is not valid: {0}")]
    Result(#[source] ParseError),
}

impl Patch {
    /// Reads `@file` or parses an inline patch.
    pub fn load(arg: &str) -> Result<Self, PatchError> {
        match arg.strip_prefix('@') {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| PatchError::Read {
                    path: PathBuf::from(path),
                    source,
                })?;
                Self::parse(&text, &format!("@{path}"))
            }
            None => Self::parse(arg, "inline patch"),
        }
    }

    /// Parses patch text; `source_name` names it in errors. The text is one patch of the
    /// machine configuration (a map or RFC 6902 operations) and any number of
    /// `ExtensionServiceConfig` documents, separated by `---`.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, PatchError> {
        let yaml_error = |error| PatchError::Yaml {
            source_name: source_name.to_owned(),
            error,
        };
        let mut machine: Option<Value> = None;
        let mut extension_service_configs: Vec<ExtensionServiceConfig> = Vec::new();
        // Stop at the first document that does not parse: the iterator does not end after a
        // syntax error.
        for doc in serde_yaml::Deserializer::from_str(text) {
            let value = Value::deserialize(doc).map_err(yaml_error)?;
            if value.get("kind").and_then(Value::as_str) == Some(EXTENSION_SERVICE_CONFIG) {
                let c: ExtensionServiceConfig =
                    serde_yaml::from_value(value).map_err(yaml_error)?;
                extension_service_configs.retain(|e| e.name != c.name);
                extension_service_configs.push(c);
            } else if machine.is_some() {
                return Err(PatchError::TwoMachinePatches {
                    source_name: source_name.to_owned(),
                });
            } else {
                machine = Some(value);
            }
        }
        let value = machine.unwrap_or(Value::Null);
        let kind = match value {
            Value::Mapping(m) => PatchKind::StrategicMerge(m),
            Value::Null => PatchKind::StrategicMerge(Mapping::new()),
            Value::Sequence(ops) => {
                let mut parsed = Vec::with_capacity(ops.len());
                for (i, op) in ops.into_iter().enumerate() {
                    let op = serde_json::to_value(op)
                        .and_then(serde_json::from_value::<json_patch::PatchOperation>)
                        .map_err(|error| PatchError::JsonShape {
                            source_name: source_name.to_owned(),
                            index: i + 1,
                            error,
                        })?;
                    parsed.push(op);
                }
                PatchKind::Json(json_patch::Patch(parsed))
            }
            other => {
                return Err(PatchError::Shape {
                    source_name: source_name.to_owned(),
                    found: kind_name(&other),
                });
            }
        };
        Ok(Self {
            source: source_name.to_owned(),
            kind,
            extension_service_configs,
        })
    }

    /// Applies the patch to a YAML document.
    pub fn apply(&self, doc: &mut Value) -> Result<(), PatchError> {
        match &self.kind {
            PatchKind::StrategicMerge(m) => {
                merge(doc, &Value::Mapping(m.clone()), &mut Vec::new());
                Ok(())
            }
            PatchKind::Json(ops) => self.apply_json(doc, ops),
        }
    }

    fn apply_json(&self, doc: &mut Value, ops: &json_patch::Patch) -> Result<(), PatchError> {
        let convert = |error: String| PatchError::Convert {
            source_name: self.source.clone(),
            error,
        };
        let mut json = serde_json::to_value(&*doc).map_err(|e| convert(e.to_string()))?;
        // One operation at a time, so an error names the operation that failed.
        for (i, op) in ops.0.iter().enumerate() {
            json_patch::patch(&mut json, std::slice::from_ref(op)).map_err(|e| {
                PatchError::Operation {
                    source_name: self.source.clone(),
                    index: i + 1,
                    operation: serde_json::to_string(op).unwrap_or_else(|_| format!("{op:?}")),
                    reason: describe(&e),
                }
            })?;
        }
        *doc = serde_yaml::to_value(json).map_err(|e| convert(e.to_string()))?;
        Ok(())
    }
}

fn describe(e: &json_patch::PatchError) -> String {
    match e.kind {
        json_patch::PatchErrorKind::TestFailed => {
            format!("the value at {} is not the one the test expects", e.path)
        }
        json_patch::PatchErrorKind::InvalidPointer => format!(
            "path {} does not exist in the document (add creates only the last element; \
             remove and replace need an existing one)",
            e.path
        ),
        _ => e.to_string(),
    }
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "an empty document",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a map",
        Value::Tagged(_) => "a tagged value",
    }
}

fn is_delete_directive(v: &Value) -> bool {
    v.as_mapping()
        .and_then(|m| m.get("$patch"))
        .and_then(Value::as_str)
        .is_some_and(|d| d == "delete")
}

/// The key by which list items at `path` are merged, if any.
fn list_merge_key(path: &[String]) -> Option<&'static str> {
    match path {
        [.., a, b, c] if a == "machine" && b == "network" && c == "interfaces" => Some("interface"),
        [.., last] if last == "vlans" => Some("vlanId"),
        _ => None,
    }
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Mapping(m) => Value::Mapping(
            m.iter()
                .filter(|(k, _)| k.as_str() != Some("$patch"))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Sequence(s) => Value::Sequence(s.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn merge(base: &mut Value, patch: &Value, path: &mut Vec<String>) {
    match (base, patch) {
        (Value::Mapping(b), Value::Mapping(p)) => {
            for (k, v) in p {
                if k.as_str() == Some("$patch") {
                    continue;
                }
                if is_delete_directive(v) {
                    b.remove(k);
                    continue;
                }
                path.push(k.as_str().unwrap_or_default().to_owned());
                match b.get_mut(k) {
                    Some(existing) => merge(existing, v, path),
                    None => {
                        b.insert(k.clone(), strip_directives(v));
                    }
                }
                path.pop();
            }
        }
        (Value::Sequence(b), Value::Sequence(p)) => {
            let key = list_merge_key(path);
            for item in p {
                let id = key.and_then(|k| item.get(k)).cloned();
                let existing = id.as_ref().and_then(|id| {
                    b.iter()
                        .position(|x| key.and_then(|k| x.get(k)) == Some(id))
                });
                match existing {
                    Some(pos) if is_delete_directive(item) => {
                        b.remove(pos);
                    }
                    Some(pos) => merge(&mut b[pos], item, path),
                    None if is_delete_directive(item) => {}
                    None => b.push(strip_directives(item)),
                }
            }
        }
        (base, patch) => *base = strip_directives(patch),
    }
}

/// Applies `patches` in order to the document `text` and parses the result.
pub fn apply_to_text(text: &str, patches: &[Patch]) -> Result<MachineConfig, PatchError> {
    let mut doc: Value = serde_yaml::from_str(text).map_err(|error| PatchError::Yaml {
        source_name: "the document being patched".to_owned(),
        error,
    })?;
    for p in patches {
        p.apply(&mut doc)?;
    }
    let rendered =
        serde_yaml::to_string(&doc).map_err(|e| PatchError::Result(ParseError::from(e)))?;
    parse::from_yaml(&rendered).map_err(PatchError::Result)
}

/// Applies `patches` in order to a configuration: each patch's machine part to the v1alpha1
/// document, then its `ExtensionServiceConfig` documents (replacing those of the same name).
pub fn apply(config: &MachineConfig, patches: &[Patch]) -> Result<MachineConfig, PatchError> {
    if patches.is_empty() {
        return Ok(config.clone());
    }
    // The v1alpha1 document alone (`extension_service_configs` is not one of its fields).
    let text =
        serde_yaml::to_string(config).map_err(|e| PatchError::Result(ParseError::from(e)))?;
    let mut patched = apply_to_text(&text, patches)?;
    let mut configs = config.extension_service_configs.clone();
    for c in patches.iter().flat_map(|p| &p.extension_service_configs) {
        match configs.iter_mut().find(|e| e.name == c.name) {
            Some(e) => *e = c.clone(),
            None => configs.push(c.clone()),
        }
    }
    patched.extension_service_configs = configs;
    Ok(patched)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Value {
        serde_yaml::from_str(s).unwrap()
    }

    #[test]
    fn maps_merge_and_lists_append() {
        let mut doc = yaml("a: {b: 1, c: [x]}\n");
        Patch::parse("a: {d: 2, c: [y]}", "t")
            .unwrap()
            .apply(&mut doc)
            .unwrap();
        assert_eq!(doc, yaml("a: {b: 1, c: [x, y], d: 2}"));
    }

    #[test]
    fn interfaces_merge_by_name_and_delete() {
        let mut doc = yaml(
            "machine:\n  network:\n    interfaces:\n      - {interface: eth0, mtu: 1500}\n      - {interface: eth1, dhcp: true}\n",
        );
        let p = "machine:\n  network:\n    interfaces:\n      - {interface: eth0, mtu: 9000, addresses: [10.0.0.2/24]}\n      - {interface: eth1, $patch: delete}\n      - {interface: eth2, dhcp: true}\n";
        Patch::parse(p, "t").unwrap().apply(&mut doc).unwrap();
        assert_eq!(
            doc,
            yaml(
                "machine:\n  network:\n    interfaces:\n      - {interface: eth0, mtu: 9000, addresses: [10.0.0.2/24]}\n      - {interface: eth2, dhcp: true}\n"
            )
        );
    }

    #[test]
    fn key_delete_directive() {
        let mut doc = yaml("machine: {install: {disk: /dev/sda}, type: worker}");
        Patch::parse("machine: {install: {$patch: delete}}", "t")
            .unwrap()
            .apply(&mut doc)
            .unwrap();
        assert_eq!(doc, yaml("machine: {type: worker}"));
    }

    #[test]
    fn json_patch_names_the_failing_operation() {
        let mut doc = yaml("machine: {type: worker}");
        let p = Patch::parse(
            "- {op: add, path: /machine/token, value: abc}\n- {op: remove, path: /machine/nothere}\n",
            "@p.yaml",
        )
        .unwrap();
        let err = p.apply(&mut doc).unwrap_err().to_string();
        assert!(err.contains("operation #2"), "{err}");
        assert!(err.contains("\"remove\""), "{err}");
        assert!(err.contains("/machine/nothere"), "{err}");
        assert!(err.contains("@p.yaml"), "{err}");
    }

    #[test]
    fn malformed_json_patch_is_rejected() {
        let err = Patch::parse("- {op: frobnicate, path: /a}", "inline patch")
            .unwrap_err()
            .to_string();
        assert!(err.contains("operation #1"), "{err}");
        let err = Patch::parse("42", "inline patch").unwrap_err().to_string();
        assert!(err.contains("not a number"), "{err}");
    }
}
