//! YAML into serde types, on yaml_rust2's parser: the one YAML parser of the gateway.
//!
//! The text becomes a tree of nodes with their positions (an alias shares its anchor's node;
//! what it would expand to is counted against [`MAX_NODES`]), and a serde `Deserializer`
//! walks the tree. Scalars are read by the YAML 1.2
//! core schema: a plain `~`, `null` or nothing is null, `true`/`false` (also `True`, `TRUE`...)
//! are booleans (`yes`, `on` are text), `12`, `-3`, `0x1F`, `0o17`, `0b101` are integers
//! (`012` is text), `1.5`, `1e3`, `.inf`, `.nan` are floats; a quoted or block scalar is always
//! text, and a text field takes any scalar (`name: 12` is the text `12`).
//!
//! Errors carry the path of the node (`devices[0].points[3]`), its position and serde's
//! message (`unknown field `adress`, expected one of ...`); `config::from_serde` turns them into
//! the loader's messages. This replaced serde_yaml (deprecated upstream, a C-to-Rust translation
//! of libyaml inside): one YAML parser in the binary instead of two.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeOwned, Expected, IntoDeserializer, Unexpected, Visitor};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::locate::{Pos, MAX_NODES};

/// A deserialization or syntax error: where, and what.
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    /// The node's path, `` for the document itself.
    pub path: String,
    pub pos: Option<Pos>,
    pub message: String,
}

impl Error {
    fn new(message: impl Into<String>, pos: Option<Pos>) -> Error {
        Error {
            path: String::new(),
            pos,
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(p) = self.pos {
            write!(f, " at line {} column {}", p.line, p.column)?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Error {
        Error::new(msg.to_string(), None)
    }
}

/// Reads one YAML document into `T`. An empty text is a document that is an empty scalar (a
/// struct then reports its first required key as missing).
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Error> {
    let tree = parse(text)?;
    T::deserialize(Des {
        tree: &tree,
        node: &tree.nodes[tree.root as usize],
        path: Path::Root,
    })
}

// ---------------------------------------------------------------------------------------------
// The tree

/// The document as a few large arrays, not one allocation per node: the nodes (20 bytes each),
/// the children of every container as node indices, and every scalar's text in one string. A
/// 10,000-point file is about 60,000 nodes. Freed after the load, such blocks go back to the
/// system whole, without leaving holes among the allocations that stay (the model's).
#[derive(Default)]
struct Tree {
    nodes: Vec<Node>,
    /// A container's children are `kids[start..start + len]`; a mapping's alternate key, value.
    kids: Vec<u32>,
    text: String,
    root: u32,
}

#[derive(Debug, Clone, Copy)]
struct Node {
    kind: Kind,
    pos: At,
    /// A scalar's text is `text[start..start + len]`; a container's children are in `kids`.
    start: u32,
    len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Unquoted: read by the core schema.
    Plain,
    /// Quoted, a block scalar or `!!str`: always text.
    Text,
    Seq,
    Map,
}

/// A node as the deserializer looks at it.
enum View<'a> {
    Scalar { text: &'a str, plain: bool },
    Seq(&'a [u32]),
    Map(&'a [u32]),
}

impl Tree {
    fn view(&self, n: &Node) -> View<'_> {
        let (a, b) = (n.start as usize, (n.start + n.len) as usize);
        match n.kind {
            Kind::Plain => View::Scalar {
                text: &self.text[a..b],
                plain: true,
            },
            Kind::Text => View::Scalar {
                text: &self.text[a..b],
                plain: false,
            },
            Kind::Seq => View::Seq(&self.kids[a..b]),
            Kind::Map => View::Map(&self.kids[a..b]),
        }
    }

    fn node(&self, i: u32) -> &Node {
        &self.nodes[i as usize]
    }
}

/// A node's line and column, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct At {
    line: u32,
    column: u32,
}

impl From<At> for Pos {
    fn from(a: At) -> Pos {
        Pos {
            line: a.line as usize,
            column: a.column as usize,
        }
    }
}

fn pos(m: Marker) -> At {
    let n = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
    // yaml_rust2 lines are 1-based, columns 0-based.
    At {
        line: n(m.line()),
        column: n(m.col() + 1),
    }
}

fn index(n: usize) -> u32 {
    // A text or a node count past u32 is far past MAX_NODES and the loader's byte cap.
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn parse(text: &str) -> Result<Tree, Error> {
    let mut b = Builder::default();
    b.tree.text.reserve(text.len());
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut b, true) {
        return Err(Error::new(
            e.info().to_string(),
            Some(pos(*e.marker()).into()),
        ));
    }
    if let Some(e) = b.error {
        return Err(e);
    }
    if b.docs.len() > 1 {
        return Err(Error::new(
            "the file holds more than one YAML document (`---` between them)",
            Some(b.tree.nodes[b.docs[1] as usize].pos.into()),
        ));
    }
    let mut tree = b.tree;
    tree.root = match b.docs.first() {
        Some(&root) => root,
        None => {
            tree.nodes.push(Node {
                kind: Kind::Plain,
                pos: At { line: 1, column: 1 },
                start: 0,
                len: 0,
            });
            index(tree.nodes.len() - 1)
        }
    };
    Ok(tree)
}

/// A container being read.
struct Open {
    kind: Kind,
    anchor: usize,
    pos: At,
    /// Where its children start in `Builder::pending`.
    first: usize,
    /// `Builder::nodes` when it opened: its expanded size is the difference at its end.
    nodes_before: u64,
}

#[derive(Default)]
struct Builder {
    tree: Tree,
    stack: Vec<Open>,
    /// The children of the open containers, innermost last.
    pending: Vec<u32>,
    /// Anchor id → its node and expanded size.
    anchors: HashMap<usize, (u32, u64)>,
    docs: Vec<u32>,
    /// Nodes made, aliases counted as the size of what they repeat.
    nodes: u64,
    error: Option<Error>,
}

impl Builder {
    /// The loader's locator refuses such a file first, with its own message; this bound keeps
    /// every other reader (a profile, `scan`'s output in tests) from walking a billion laughs.
    fn count(&mut self, n: u64, at: At) -> bool {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > MAX_NODES {
            self.error = Some(Error::new(
                format!("the file has more than {MAX_NODES} YAML nodes (aliases expanded)"),
                Some(at.into()),
            ));
            return false;
        }
        true
    }

    fn push(&mut self, node: Node) -> u32 {
        self.tree.nodes.push(node);
        index(self.tree.nodes.len() - 1)
    }

    /// A complete node goes into its container (or becomes a document).
    fn done(&mut self, id: u32, anchor: usize, size: u64) {
        if anchor != 0 {
            self.anchors.insert(anchor, (id, size));
        }
        let Some(open) = self.stack.last_mut() else {
            self.docs.push(id);
            return;
        };
        if open.kind == Kind::Map {
            let n = self.pending.len() - open.first;
            let node = self.tree.nodes[id as usize];
            if n == 0 {
                // A block mapping's start mark lies past its first key: such a mapping is
                // where that key is (as the locator has it). A flow mapping starts at its
                // `{`, before the key.
                if node.pos < open.pos {
                    open.pos = node.pos;
                }
            } else if n % 2 == 1 {
                // yaml_rust2 puts an empty value (`gateway:` and nothing) where the next token
                // is, often the next line: report it at its key instead.
                let key = self.tree.nodes[self.pending[self.pending.len() - 1] as usize];
                if node.kind == Kind::Plain && node.len == 0 && node.pos.line > key.pos.line {
                    self.tree.nodes[id as usize].pos = key.pos;
                }
            }
        }
        self.pending.push(id);
    }
}

/// A scalar's tag: `!!str` (and the non-specific `!`) make it text, `!!int`, `!!float`,
/// `!!bool`, `!!null` keep it as written; `container` takes `!!seq` and `!!map`. Other tags are
/// refused: a configuration has no use for them.
fn tag_plain(tag: &Option<Tag>, plain: bool, container: bool) -> Result<bool, String> {
    let Some(t) = tag else { return Ok(plain) };
    let full = format!("{}{}", t.handle, t.suffix);
    match (full.strip_prefix("tag:yaml.org,2002:"), container) {
        (Some("str"), false) => Ok(false),
        (Some("int" | "float" | "bool" | "null"), false) => Ok(plain),
        (Some("seq" | "map"), true) => Ok(plain),
        _ if t.handle == "!" && t.suffix.is_empty() && !container => Ok(false),
        _ => Err(format!(
            "the YAML tag `{}{}` is not used here in a configuration",
            t.handle, t.suffix
        )),
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let at = pos(mark);
        let is_seq = matches!(ev, Event::SequenceStart(..));
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                if !self.count(1, at) {
                    return;
                }
                let plain = match tag_plain(&tag, style == TScalarStyle::Plain, false) {
                    Ok(p) => p,
                    Err(m) => {
                        self.error = Some(Error::new(m, Some(at.into())));
                        return;
                    }
                };
                let start = index(self.tree.text.len());
                self.tree.text.push_str(&text);
                let id = self.push(Node {
                    kind: if plain { Kind::Plain } else { Kind::Text },
                    pos: at,
                    start,
                    len: index(text.len()),
                });
                self.done(id, anchor, 1);
            }
            Event::Alias(anchor) => {
                let Some(&(target, size)) = self.anchors.get(&anchor) else {
                    self.error = Some(Error::new(
                        "the alias names a node that contains it",
                        Some(at.into()),
                    ));
                    return;
                };
                if !self.count(size, at) {
                    return;
                }
                // The alias shares its anchor's children and text; it is reported where the
                // alias is.
                let node = Node {
                    pos: at,
                    ..self.tree.nodes[target as usize]
                };
                let id = self.push(node);
                self.done(id, 0, size);
            }
            Event::SequenceStart(anchor, tag) | Event::MappingStart(anchor, tag) => {
                let before = self.nodes;
                if !self.count(1, at) {
                    return;
                }
                if tag.is_some() {
                    if let Err(m) = tag_plain(&tag, true, true) {
                        self.error = Some(Error::new(m, Some(at.into())));
                        return;
                    }
                }
                self.stack.push(Open {
                    kind: if is_seq { Kind::Seq } else { Kind::Map },
                    anchor,
                    pos: at,
                    first: self.pending.len(),
                    nodes_before: before,
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let Some(open) = self.stack.pop() else {
                    return;
                };
                let start = index(self.tree.kids.len());
                self.tree.kids.extend(self.pending.drain(open.first..));
                let len = index(self.tree.kids.len()) - start;
                let id = self.push(Node {
                    kind: open.kind,
                    pos: open.pos,
                    start,
                    len,
                });
                self.done(id, open.anchor, self.nodes - open.nodes_before);
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalars by the core schema (the rules serde_yaml 0.9 applied)

fn is_null(s: &str) -> bool {
    matches!(s, "" | "~" | "null" | "Null" | "NULL")
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

/// `012`: leading zeros make text, not a number.
fn digits_but_not_number(s: &str) -> bool {
    let s = s.strip_prefix(['-', '+']).unwrap_or(s);
    s.len() > 1 && s.starts_with('0') && s[1..].bytes().all(|b| b.is_ascii_digit())
}

/// An integer by the core schema, with its sign: decimal, `0x`, `0o`, `0b`, an optional sign.
fn parse_int(s: &str) -> Option<i128> {
    let (neg, rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest.starts_with(['+', '-']) || rest.is_empty() {
        return None;
    }
    let (radix, digits) = if let Some(d) = rest.strip_prefix("0x") {
        (16, d)
    } else if let Some(d) = rest.strip_prefix("0o") {
        (8, d)
    } else if let Some(d) = rest.strip_prefix("0b") {
        (2, d)
    } else {
        if digits_but_not_number(s) {
            return None;
        }
        (10, rest)
    };
    if digits.is_empty() || digits.starts_with(['+', '-']) {
        return None;
    }
    let v = i128::from_str_radix(digits, radix).ok()?;
    Some(if neg { -v } else { v })
}

fn parse_f64(s: &str) -> Option<f64> {
    let unsigned = match s.strip_prefix('+') {
        Some(u) if u.starts_with(['+', '-']) => return None,
        Some(u) => u,
        None => s,
    };
    match unsigned {
        ".inf" | ".Inf" | ".INF" => return Some(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    // Rust also reads `inf`, `nan`, `infinity`: text in YAML.
    if !unsigned
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
    {
        return None;
    }
    unsigned.parse::<f64>().ok().filter(|f| f.is_finite())
}

/// What a plain scalar is.
enum Plain<'a> {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(&'a str),
}

fn resolve(s: &str) -> Plain<'_> {
    if is_null(s) {
        return Plain::Null;
    }
    if let Some(b) = parse_bool(s) {
        return Plain::Bool(b);
    }
    if let Some(i) = parse_int(s) {
        return Plain::Int(i);
    }
    if !digits_but_not_number(s) {
        if let Some(f) = parse_f64(s) {
            return Plain::Float(f);
        }
    }
    Plain::Str(s)
}

// ---------------------------------------------------------------------------------------------
// The deserializer

/// The path of a node, built only when an error needs it.
#[derive(Clone, Copy)]
enum Path<'a> {
    Root,
    Seq { parent: &'a Path<'a>, index: usize },
    Map { parent: &'a Path<'a>, key: &'a str },
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Path::Root => Ok(()),
            Path::Seq { parent, index } => write!(f, "{parent}[{index}]"),
            Path::Map { parent, key } => match parent {
                Path::Root => f.write_str(key),
                p => write!(f, "{p}.{key}"),
            },
        }
    }
}

#[derive(Clone, Copy)]
struct Des<'a> {
    tree: &'a Tree,
    node: &'a Node,
    path: Path<'a>,
}

impl<'a> Des<'a> {
    /// The innermost node that fails names the position and path.
    fn fix(&self, mut e: Error) -> Error {
        if e.pos.is_none() {
            e.pos = Some(self.node.pos.into());
            e.path = self.path.to_string();
        }
        e
    }

    fn view(&self) -> View<'a> {
        self.tree.view(self.node)
    }

    fn plain(&self) -> Option<&'a str> {
        match self.view() {
            View::Scalar { text, plain: true } => Some(text),
            _ => None,
        }
    }

    fn unexpected(&self) -> Unexpected<'a> {
        match self.view() {
            View::Scalar { text, plain: true } => match resolve(text) {
                Plain::Null => Unexpected::Unit,
                Plain::Bool(b) => Unexpected::Bool(b),
                Plain::Int(i) => match (u64::try_from(i), i64::try_from(i)) {
                    (Ok(u), _) => Unexpected::Unsigned(u),
                    (_, Ok(s)) => Unexpected::Signed(s),
                    _ => Unexpected::Other("an integer out of range"),
                },
                Plain::Float(f) => Unexpected::Float(f),
                Plain::Str(s) => Unexpected::Str(s),
            },
            View::Scalar { text, .. } => Unexpected::Str(text),
            View::Seq(_) => Unexpected::Seq,
            View::Map(_) => Unexpected::Map,
        }
    }

    fn invalid(&self, exp: &dyn Expected) -> Error {
        self.fix(de::Error::invalid_type(self.unexpected(), exp))
    }

    fn is_empty_plain(&self) -> bool {
        self.plain().is_some_and(str::is_empty)
    }
}

struct SeqAccess<'a> {
    tree: &'a Tree,
    items: std::slice::Iter<'a, u32>,
    index: usize,
    path: &'a Path<'a>,
}

impl<'de> de::SeqAccess<'de> for SeqAccess<'_> {
    type Error = Error;

    fn next_element_seed<T: de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        let Some(&id) = self.items.next() else {
            return Ok(None);
        };
        let path = Path::Seq {
            parent: self.path,
            index: self.index,
        };
        self.index += 1;
        seed.deserialize(Des {
            tree: self.tree,
            node: self.tree.node(id),
            path,
        })
        .map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapAccess<'a> {
    tree: &'a Tree,
    /// Key, value, key, value...
    entries: std::slice::ChunksExact<'a, u32>,
    value: Option<&'a Node>,
    key: Option<&'a str>,
    path: &'a Path<'a>,
}

impl<'de> de::MapAccess<'de> for MapAccess<'_> {
    type Error = Error;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some(&[k, v]) = self.entries.next() else {
            return Ok(None);
        };
        let k = self.tree.node(k);
        self.value = Some(self.tree.node(v));
        self.key = match self.tree.view(k) {
            View::Scalar { text, .. } => Some(text),
            _ => None,
        };
        // A key reports at the mapping's path, at its own position.
        seed.deserialize(Des {
            tree: self.tree,
            node: k,
            path: *self.path,
        })
        .map(Some)
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let node = self.value.take().expect("a value follows its key");
        let path = Path::Map {
            parent: self.path,
            key: self.key.unwrap_or("?"),
        };
        seed.deserialize(Des {
            tree: self.tree,
            node,
            path,
        })
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

macro_rules! forward_int {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.deserialize_i64(visitor)
        }
    )*};
}

macro_rules! forward_uint {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.deserialize_u64(visitor)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for Des<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let r = match self.view() {
            View::Scalar { text, plain: true } => match resolve(text) {
                Plain::Null => visitor.visit_unit(),
                Plain::Bool(b) => visitor.visit_bool(b),
                Plain::Int(i) => match (u64::try_from(i), i64::try_from(i)) {
                    (Ok(u), _) => visitor.visit_u64(u),
                    (_, Ok(s)) => visitor.visit_i64(s),
                    _ => visitor.visit_i128(i),
                },
                Plain::Float(f) => visitor.visit_f64(f),
                Plain::Str(s) => visitor.visit_str(s),
            },
            View::Scalar { text, .. } => visitor.visit_str(text),
            View::Seq(_) => return self.deserialize_seq(visitor),
            View::Map(_) => return self.deserialize_map(visitor),
        };
        r.map_err(|e| self.fix(e))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.plain().and_then(parse_bool) {
            Some(b) => visitor.visit_bool(b).map_err(|e| self.fix(e)),
            None => Err(self.invalid(&visitor)),
        }
    }

    forward_int!(deserialize_i8 deserialize_i16 deserialize_i32);
    forward_uint!(deserialize_u8 deserialize_u16 deserialize_u32);

    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self
            .plain()
            .and_then(parse_int)
            .and_then(|i| i64::try_from(i).ok())
        {
            Some(i) => visitor.visit_i64(i).map_err(|e| self.fix(e)),
            None => Err(self.invalid(&visitor)),
        }
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self
            .plain()
            .and_then(parse_int)
            .and_then(|i| u64::try_from(i).ok())
        {
            Some(u) => visitor.visit_u64(u).map_err(|e| self.fix(e)),
            None => Err(self.invalid(&visitor)),
        }
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let f = self
            .plain()
            .and_then(|s| parse_f64(s).or_else(|| parse_int(s).map(|i| i as f64)));
        match f {
            Some(f) => visitor.visit_f64(f).map_err(|e| self.fix(e)),
            None => Err(self.invalid(&visitor)),
        }
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.view() {
            View::Scalar { text, .. } => visitor.visit_str(text).map_err(|e| self.fix(e)),
            _ => Err(self.invalid(&visitor)),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        Err(self.invalid(&visitor))
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        Err(self.invalid(&visitor))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if self.plain().is_some_and(is_null) {
            visitor.visit_none().map_err(|e| self.fix(e))
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if self.plain().is_some_and(is_null) {
            visitor.visit_unit().map_err(|e| self.fix(e))
        } else {
            Err(self.invalid(&visitor))
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    /// A sequence, or nothing (`points:` with no items) as an empty one.
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let items = match self.view() {
            View::Seq(items) => items,
            _ if self.is_empty_plain() => &[],
            _ => return Err(self.invalid(&visitor)),
        };
        visitor
            .visit_seq(SeqAccess {
                tree: self.tree,
                items: items.iter(),
                index: 0,
                path: &self.path,
            })
            .map_err(|e| self.fix(e))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    /// A mapping, or nothing (`store:` with no keys) as an empty one.
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let entries = match self.view() {
            View::Map(entries) => entries,
            _ if self.is_empty_plain() => &[],
            _ => return Err(self.invalid(&visitor)),
        };
        visitor
            .visit_map(MapAccess {
                tree: self.tree,
                entries: entries.chunks_exact(2),
                value: None,
                key: None,
                path: &self.path,
            })
            .map_err(|e| self.fix(e))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_map(visitor)
    }

    /// Unit variants only, written as their name.
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.view() {
            View::Scalar { text, .. } => visitor
                .visit_enum(text.into_deserializer())
                .map_err(|e: Error| self.fix(e)),
            _ => Err(self.invalid(&visitor)),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
}

// ---------------------------------------------------------------------------------------------
// Values kept loose for the validator

/// A YAML value as the validator looks at it (durations, ranges, label maps).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
    Sequence(Vec<Value>),
    Mapping(Mapping),
}

/// An integer or a float, as written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(i128),
    Float(f64),
}

impl Number {
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Number::Int(i) => i64::try_from(i).ok(),
            Number::Float(_) => None,
        }
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match *self {
            Number::Int(i) => write!(f, "{i}"),
            Number::Float(x) if x.is_nan() => f.write_str(".nan"),
            Number::Float(x) if x.is_infinite() => {
                f.write_str(if x > 0.0 { ".inf" } else { "-.inf" })
            }
            // `5.0` stays `5.0`, as written.
            Number::Float(x) if x.fract() == 0.0 && x.abs() < 1e16 => write!(f, "{x:.1}"),
            Number::Float(x) => write!(f, "{x}"),
        }
    }
}

/// A mapping in the file's order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mapping(Vec<(Value, Value)>);

type Entry<'a> = fn(&'a (Value, Value)) -> (&'a Value, &'a Value);

impl Mapping {
    pub fn iter(&self) -> std::iter::Map<std::slice::Iter<'_, (Value, Value)>, Entry<'_>> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// Sets `key` to `value`: in place if the key is there (its old value returned), else at
    /// the end.
    pub fn insert(&mut self, key: Value, value: Value) -> Option<Value> {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => Some(std::mem::replace(v, value)),
            None => {
                self.0.push((key, value));
                None
            }
        }
    }

    /// The value of a text key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.iter()
            .find(|(k, _)| matches!(k, Value::String(s) if s == key))
            .map(|(_, v)| v)
    }
}

impl<'a> IntoIterator for &'a Mapping {
    type Item = (&'a Value, &'a Value);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (Value, Value)>, Entry<'a>>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl Value {
    pub fn as_sequence(&self) -> Option<&Vec<Value>> {
        match self {
            Value::Sequence(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_mapping(&self) -> Option<&Mapping> {
        match self {
            Value::Mapping(m) => Some(m),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Number(Number::Int(i)) => u64::try_from(*i).ok(),
            _ => None,
        }
    }

    /// The value of a text key of a mapping (`None` elsewhere).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_mapping()?.get(key)
    }

    /// How a key is named in messages.
    fn key_text(&self) -> String {
        match self {
            Value::Null => "null".into(),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            Value::Sequence(_) | Value::Mapping(_) => "?".into(),
        }
    }
}

/// `value["key"]`: the key's value, or null when there is none.
impl std::ops::Index<&str> for Value {
    type Output = Value;
    fn index(&self, key: &str) -> &Value {
        self.get(key).unwrap_or(&Value::Null)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
        Ok(Value::Number(Number::Int(i.into())))
    }
    fn visit_u64<E>(self, u: u64) -> Result<Value, E> {
        Ok(Value::Number(Number::Int(u.into())))
    }
    fn visit_i128<E>(self, i: i128) -> Result<Value, E> {
        Ok(Value::Number(Number::Int(i)))
    }
    fn visit_f64<E>(self, f: f64) -> Result<Value, E> {
        Ok(Value::Number(Number::Float(f)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_string()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(v) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Sequence(items))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        MappingVisitor.visit_map(map).map(Value::Mapping)
    }
}

impl<'de> de::Deserialize<'de> for Value {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

struct MappingVisitor;

impl<'de> Visitor<'de> for MappingVisitor {
    type Value = Mapping;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a YAML mapping")
    }
    fn visit_unit<E>(self) -> Result<Mapping, E> {
        Ok(Mapping::default())
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Mapping, A::Error> {
        let mut entries: Vec<(Value, Value)> = Vec::new();
        while let Some(k) = map.next_key::<Value>()? {
            if entries.iter().any(|(e, _)| *e == k) {
                return Err(de::Error::custom(match &k {
                    Value::Null => "duplicate entry with null key".to_string(),
                    Value::String(s) => format!("duplicate entry with key {s:?}"),
                    Value::Sequence(_) | Value::Mapping(_) => "duplicate entry in YAML map".into(),
                    other => format!("duplicate entry with key `{}`", other.key_text()),
                }));
            }
            let v = map.next_value()?;
            entries.push((k, v));
        }
        Ok(Mapping(entries))
    }
}

impl<'de> de::Deserialize<'de> for Mapping {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Mapping, D::Error> {
        d.deserialize_map(MappingVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Point {
        name: String,
        address: Option<i64>,
        scale: Option<f64>,
        writable: Option<bool>,
        min: Option<Value>,
        labels: Option<Mapping>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        points: Vec<Point>,
        #[serde(default)]
        more: Vec<String>,
    }

    fn err(text: &str) -> Error {
        from_str::<Doc>(text).unwrap_err()
    }

    #[test]
    fn scalars_follow_the_core_schema() {
        let d: Doc = from_str(
            "points:\n  - name: 012\n    address: 0x1F\n    scale: 5\n    writable: True\n    min: 1.50\n  - { name: 'x', address: -3, min: '5', labels: { 0: off, 1: yes } }\nmore: [1, ~, \"a\"]\n",
        )
        .unwrap();
        assert_eq!(d.points[0].name, "012");
        assert_eq!(d.points[0].address, Some(31));
        assert_eq!(d.points[0].scale, Some(5.0));
        assert_eq!(d.points[0].writable, Some(true));
        assert_eq!(d.points[0].min, Some(Value::Number(Number::Float(1.5))));
        assert_eq!(d.points[1].address, Some(-3));
        assert_eq!(d.points[1].min, Some(Value::String("5".into())));
        let labels: Vec<_> = d.points[1].labels.as_ref().unwrap().iter().collect();
        assert_eq!(labels[0].0, &Value::Number(Number::Int(0)));
        assert_eq!(labels[1].1, &Value::String("yes".into()));
        assert_eq!(d.more, ["1", "~", "a"]);
        assert_eq!(resolve("1e3").key(), "float");
        assert_eq!(resolve("inf").key(), "str");
        assert_eq!(resolve("0o17").key(), "int");
        assert_eq!(resolve("").key(), "null");
        assert_eq!(Number::Float(5.0).to_string(), "5.0");
    }

    impl Plain<'_> {
        fn key(&self) -> &'static str {
            match self {
                Plain::Null => "null",
                Plain::Bool(_) => "bool",
                Plain::Int(_) => "int",
                Plain::Float(_) => "float",
                Plain::Str(_) => "str",
            }
        }
    }

    #[test]
    fn errors_name_the_path_and_the_position() {
        let e = err("points:\n  - name: a\n    adress: 3\n");
        assert_eq!(e.path, "points[0]");
        assert!(
            e.message
                .starts_with("unknown field `adress`, expected one of `name`"),
            "{e}"
        );
        assert_eq!(e.pos, Some(Pos { line: 3, column: 5 }));

        let e = err("points:\n  - address: 3\n");
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            ("points[0]", "missing field `name`")
        );
        assert_eq!(e.pos.unwrap().line, 2);

        let e = err("points:\n  - name: a\n    address: zero\n");
        assert_eq!(e.path, "points[0].address");
        assert_eq!(e.message, "invalid type: string \"zero\", expected i64");
        assert_eq!(
            e.pos,
            Some(Pos {
                line: 3,
                column: 14
            })
        );

        let e = err("points:\n  - { name: a, writable: yes }\n");
        assert_eq!(
            e.message,
            "invalid type: string \"yes\", expected a boolean"
        );

        let e = err("points:\n  - { name: a, labels: { 1: x, 1: y } }\n");
        assert_eq!(e.path, "points[0].labels");
        assert_eq!(e.message, "duplicate entry with key `1`");
        let e = err("points:\n  - { name: a, labels: { x: 1, x: 2 } }\n");
        assert_eq!(e.message, "duplicate entry with key \"x\"");

        let e = err("points:\n  - { name: a, address: 99999999999999999999 }\n");
        assert_eq!(
            e.message,
            "invalid type: an integer out of range, expected i64"
        );
        #[derive(Debug, Deserialize)]
        struct Outer {
            #[allow(dead_code)]
            gateway: Point,
        }
        let e = from_str::<Outer>("gateway:\n\nother: 1\n").unwrap_err();
        assert_eq!(e.message, "missing field `name`");
        assert_eq!(e.pos, Some(Pos { line: 1, column: 1 }));
        let e = err("points: 3\n");
        assert_eq!(e.message, "invalid type: integer `3`, expected a sequence");
        assert_eq!(err("").message, "missing field `points`");
        let e = err("points: [\n");
        assert!(e.pos.is_some(), "{e}");
        let e = err("points: []\n---\npoints: []\n");
        assert!(e.message.contains("more than one YAML document"), "{e}");
        assert_eq!(e.pos.unwrap().line, 3);
        let e = err("points: !custom []\n");
        assert!(e.message.contains("`!custom`"), "{e}");
        let d: Doc =
            from_str("points: !!seq [!!map { name: !!str 5, address: !!int 3 }]\n").unwrap();
        assert_eq!(
            (d.points[0].name.as_str(), d.points[0].address),
            ("5", Some(3))
        );
        let e = err("points: !!str []\n");
        assert!(e.message.contains("`tag:yaml.org,2002:str`"), "{e}");
        // A flow mapping is where its `{` is (yaml_rust2's start mark), a block mapping where
        // its first key is.
        let e = err("points:\n  - name: {a: 1}\n");
        assert_eq!(
            (e.path.as_str(), e.pos),
            (
                "points[0].name",
                Some(Pos {
                    line: 2,
                    column: 11
                })
            )
        );
    }

    #[test]
    fn nodes_stay_small() {
        // The whole tree is held while serde reads it: 10,000 points are about 60,000 nodes.
        assert_eq!(std::mem::size_of::<Node>(), 20);
    }

    #[test]
    fn aliases_are_copies_and_their_expansion_is_bounded() {
        let d: Doc = from_str("more: &m [a, b]\npoints: []\n").unwrap();
        assert_eq!(d.more, ["a", "b"]);
        let v: Value = from_str("a: &x [1, 2]\nb: *x\n").unwrap();
        assert_eq!(v.get("b"), v.get("a"));
        // A bad value reached through an alias: the path where it is used, the line where
        // its text is; the alias itself is where it is written.
        #[derive(Debug, Deserialize)]
        struct Anchored {
            #[allow(dead_code)]
            p: Value,
            #[allow(dead_code)]
            points: Vec<Point>,
        }
        let err = |text| from_str::<Anchored>(text).unwrap_err();
        let e = err("p: &p { name: a, address: x }\npoints:\n  - *p\n");
        assert_eq!(e.path, "points[0].address");
        assert_eq!(
            e.pos,
            Some(Pos {
                line: 1,
                column: 27
            })
        );
        let e = err("p: &p [1]\npoints:\n  - *p\n");
        assert_eq!(
            (e.path.as_str(), e.pos.map(|p| p.line)),
            ("points[0]", Some(3))
        );
        // An alias inside its own anchor's node would be infinite.
        let e = from_str::<Value>("a: &x [1, *x]\n").unwrap_err();
        assert!(e.message.contains("alias"), "{e}");
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let e = from_str::<Value>(&text).unwrap_err();
        assert!(e.message.contains("more than"), "{e}");
        assert_eq!(e.pos.unwrap().line, 6);
    }
}
