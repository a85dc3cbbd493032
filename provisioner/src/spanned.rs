//! YAML with positions: a document as a tree whose nodes know their line and column, so that
//! every problem of a cluster or scenario file can be reported at once, each where it is.
//!
//! `serde_yaml` stops at the first error and forgets positions once a document is a `Value`;
//! this module parses with `yaml-rust2`'s event parser (which marks every event), keeps the
//! marks, and hands sub-trees to serde as `serde_yaml::Value`s, so typed checks stay derived
//! from the same structs the program uses.

use serde::de::{self, DeserializeOwned, Visitor};
use serde_yaml::Value;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Where a node starts (1-based line and column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub col: usize,
}

impl From<Marker> for Pos {
    fn from(m: Marker) -> Self {
        // yaml-rust2 counts lines from 1 and columns from 0.
        Self {
            line: m.line(),
            col: m.col() + 1,
        }
    }
}

/// One problem of a file, at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where.
    pub pos: Pos,
    /// What is wrong and what to do.
    pub message: String,
}

impl Problem {
    /// A problem at `pos`.
    pub fn at(pos: Pos, message: impl Into<String>) -> Self {
        Self {
            pos,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.pos.line, self.pos.col, self.message
        )
    }
}

/// What a node is.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// A scalar and whether it was plain (unquoted: `3` is a number, `"3"` a string).
    Scalar(String, bool),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in document order.
    Map(Vec<(Node, Node)>),
}

/// A node and where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Where.
    pub pos: Pos,
    /// What.
    pub kind: Kind,
}

impl Node {
    /// The scalar's text, if a scalar.
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar(s, _) => Some(s),
            _ => None,
        }
    }

    /// The entries, if a mapping.
    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.kind {
            Kind::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The items, if a sequence.
    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.kind {
            Kind::Seq(s) => Some(s),
            _ => None,
        }
    }

    /// The value under `key` in a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// Whether this is a null (`~`, `null`, or nothing).
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar(s, true) if matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// The first scalar in this sub-tree equal to `text` (to point at a value serde rejected).
    pub fn find_scalar(&self, text: &str) -> Option<&Node> {
        match &self.kind {
            Kind::Scalar(s, _) => (s == text).then_some(self),
            Kind::Seq(items) => items.iter().find_map(|n| n.find_scalar(text)),
            Kind::Map(m) => m
                .iter()
                .find_map(|(k, v)| k.find_scalar(text).or_else(|| v.find_scalar(text))),
        }
    }

    /// The node as a `serde_yaml::Value` (YAML 1.2 core schema for plain scalars).
    pub fn to_value(&self) -> Value {
        match &self.kind {
            Kind::Scalar(s, false) => Value::String(s.clone()),
            Kind::Scalar(s, true) => plain_scalar(s),
            Kind::Seq(items) => Value::Sequence(items.iter().map(Node::to_value).collect()),
            Kind::Map(m) => Value::Mapping(
                m.iter()
                    .map(|(k, v)| (k.to_value(), v.to_value()))
                    .collect(),
            ),
        }
    }

    /// Deserializes the node; a failure is a problem at the node.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, Problem> {
        serde_yaml::from_value(self.to_value()).map_err(|e| Problem::at(self.pos, e.to_string()))
    }

    /// Checks that every key of this mapping is a field of `T` (a struct deriving
    /// `Deserialize`): one problem per unknown key, at the key, naming the known ones.
    pub fn unknown_keys<T: de::DeserializeOwned>(&self, what: &str, problems: &mut Vec<Problem>) {
        let Some(map) = self.as_map() else { return };
        let known = names_of::<T>();
        for (k, _) in map {
            let key = k.as_str().unwrap_or_default();
            if !known.contains(&key) {
                problems.push(Problem::at(
                    k.pos,
                    format!(
                        "unknown field {key:?} in {what}; known fields: {}",
                        known.join(", ")
                    ),
                ));
            }
        }
    }
}

fn plain_scalar(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Ok(n) = s.parse::<u64>() {
        return Value::Number(n.into());
    }
    if let Ok(n) = s.parse::<i64>() {
        return Value::Number(n.into());
    }
    if s.contains('.')
        && s.chars().all(|c| c.is_ascii_digit() || ".-+eE".contains(c))
        && let Ok(f) = s.parse::<f64>()
    {
        return Value::Number(f.into());
    }
    Value::String(s.to_owned())
}

/// The field names of a struct, or the variant names of an enum, as serde sees them (after
/// `rename_all`), by asking its `Deserialize` impl.
pub fn names_of<T: de::DeserializeOwned>() -> &'static [&'static str] {
    let mut capture = Capture(&[]);
    let _ = T::deserialize(&mut capture);
    capture.0
}

struct Capture(&'static [&'static str]);

#[derive(Debug)]
struct Captured;

impl std::fmt::Display for Captured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("names captured")
    }
}

impl std::error::Error for Captured {}

impl de::Error for Captured {
    fn custom<M: std::fmt::Display>(_msg: M) -> Self {
        Self
    }
}

impl<'de> de::Deserializer<'de> for &mut Capture {
    type Error = Captured;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Captured> {
        Err(Captured)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Captured> {
        self.0 = fields;
        Err(Captured)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Captured> {
        self.0 = variants;
        Err(Captured)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map identifier ignored_any
    }
}

/// Parses one YAML document; `None` when the text holds none. A syntax error is one problem.
pub fn parse(text: &str) -> Result<Option<Node>, Problem> {
    let mut builder = Builder::default();
    Parser::new_from_str(text)
        .load(&mut builder, false)
        .map_err(|e| Problem::at(Pos::from(*e.marker()), e.info().to_owned()))?;
    Ok(builder.root)
}

#[derive(Default)]
struct Builder {
    stack: Vec<(Node, Option<Node>)>,
    anchors: std::collections::HashMap<usize, Node>,
    anchor_of: Vec<usize>,
    root: Option<Node>,
}

impl Builder {
    fn push_value(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some((parent, pending_key)) => match &mut parent.kind {
                Kind::Seq(items) => items.push(node),
                Kind::Map(entries) => match pending_key.take() {
                    None => *pending_key = Some(node),
                    Some(k) => entries.push((k, node)),
                },
                Kind::Scalar(..) => {}
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos::from(mark);
        match ev {
            Event::Scalar(s, style, anchor, _tag) => self.push_value(
                Node {
                    pos,
                    kind: Kind::Scalar(s, style == TScalarStyle::Plain),
                },
                anchor,
            ),
            Event::SequenceStart(anchor, _) => {
                self.anchor_of.push(anchor);
                self.stack.push((
                    Node {
                        pos,
                        kind: Kind::Seq(Vec::new()),
                    },
                    None,
                ));
            }
            Event::MappingStart(anchor, _) => {
                self.anchor_of.push(anchor);
                self.stack.push((
                    Node {
                        pos,
                        kind: Kind::Map(Vec::new()),
                    },
                    None,
                ));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((mut node, _)) = self.stack.pop() {
                    // A block mapping's start is marked after its first key: a node starts
                    // where its first child does, when that is earlier.
                    let first = match &node.kind {
                        Kind::Map(m) => m.first().map(|(k, _)| k.pos),
                        Kind::Seq(s) => s.first().map(|n| n.pos),
                        Kind::Scalar(..) => None,
                    };
                    if let Some(f) = first
                        && (f.line, f.col) < (node.pos.line, node.pos.col)
                    {
                        node.pos = f;
                    }
                    let anchor = self.anchor_of.pop().unwrap_or(0);
                    self.push_value(node, anchor);
                }
            }
            Event::Alias(id) => {
                let node = self.anchors.get(&id).cloned().unwrap_or(Node {
                    pos,
                    kind: Kind::Scalar(String::new(), true),
                });
                self.push_value(node, 0);
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    struct S {
        first_field: u32,
        second: Option<String>,
    }

    #[test]
    fn positions_values_and_unknown_keys() {
        let text = "a: 1\nb:\n  - x\n  - \"2\"\nc: {firstField: 3, bogus: true}\n";
        let root = parse(text).unwrap().unwrap();
        assert_eq!(root.get("a").unwrap().to_value(), Value::Number(1.into()));
        let b = root.get("b").unwrap().as_seq().unwrap();
        assert_eq!(b[1].pos, Pos { line: 4, col: 5 });
        assert_eq!(b[1].to_value(), Value::String("2".into()));
        let c = root.get("c").unwrap();
        let mut problems = vec![];
        c.unknown_keys::<S>("c", &mut problems);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].pos, Pos { line: 5, col: 20 });
        assert!(problems[0].message.contains("firstField, second"));
        assert_eq!(names_of::<S>(), &["firstField", "second"]);
    }

    #[test]
    fn a_syntax_error_has_a_position() {
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.pos.line >= 1, "{e}");
    }
}
