//! Maps a YAML path (`devices[2].points[5].address`) to the line and column of its node.
//!
//! The YAML reader (`yaml.rs`) knows positions only while serde reads the tree; validation
//! errors found later need them too, so the text is walked with yaml_rust2's event parser,
//! recording where every node starts. Positions are 1-based.
//!
//! The same walk counts the nodes the document has once its aliases are expanded, without
//! expanding them (an alias adds the size of its anchor's node), so that a file whose aliases
//! would multiply it (`points: *p` on many devices, or "billion laughs") is refused before
//! the YAML reader builds its tree.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    fn from_marker(m: Marker) -> Pos {
        // yaml_rust2 lines are 1-based, columns 0-based.
        Pos {
            line: m.line(),
            column: m.col() + 1,
        }
    }
}

/// Most YAML nodes a configuration may have with its aliases expanded. A large real file
/// (thousands of points, 5 to 15 nodes each) has well under 100 000; 50 000 points of one
/// flow mapping each (`{ name: r1, address: 1 }`: 5 nodes) need about 251 000. `check` needs
/// a few hundred bytes per node, so the bound keeps a load (about 1.7 KiB a point at peak)
/// under the unit's `MemoryMax=128M`.
pub const MAX_NODES: u64 = 300_000;

/// Where the expanded document first grew past [`MAX_NODES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyNodes {
    pub pos: Pos,
    /// Whether an alias took it past the bound (else the file itself is that large).
    pub by_alias: bool,
}

#[derive(Debug, Default)]
pub struct Locator {
    /// Path → position of the node's value (for a mapping entry) or of the item.
    values: HashMap<String, Pos>,
    /// Path → position of the key, for mapping entries.
    keys: HashMap<String, Pos>,
    /// Set when the document has more than [`MAX_NODES`] nodes once expanded.
    pub too_many_nodes: Option<TooManyNodes>,
}

impl Locator {
    /// Walks `text`; a text that does not parse gives an empty locator (serde reports why).
    pub fn new(text: &str) -> Locator {
        let mut walker = Walker::default();
        let mut parser = Parser::new_from_str(text);
        let _ = parser.load(&mut walker, false);
        Locator {
            values: walker.values,
            keys: walker.keys,
            too_many_nodes: walker.count.over,
        }
    }

    /// Position of the value at `path`, or of its nearest ancestor that exists.
    pub fn value(&self, path: &str) -> Option<Pos> {
        let mut p = path;
        loop {
            if let Some(pos) = self.values.get(p) {
                return Some(*pos);
            }
            p = parent(p)?;
        }
    }

    /// Whether the YAML has a node exactly at `path`.
    pub fn has(&self, path: &str) -> bool {
        self.values.contains_key(path)
    }

    /// Position of the key at `path` (falls back like [`Locator::value`]).
    pub fn key(&self, path: &str) -> Option<Pos> {
        self.keys.get(path).copied().or_else(|| self.value(path))
    }
}

/// `a.b[2].c` → `a.b[2]` → `a.b` → `a` → `` → None.
fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

pub fn join_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

enum Frame {
    Map {
        path: String,
        /// The key just read, waiting for its value.
        key: Option<String>,
        /// No key seen yet: the first one becomes the mapping's own position (the start mark
        /// of a block mapping lies past its first key).
        empty: bool,
    },
    Seq {
        path: String,
        next: usize,
    },
}

#[derive(Default)]
struct Walker {
    stack: Vec<Frame>,
    values: HashMap<String, Pos>,
    keys: HashMap<String, Pos>,
    count: NodeCount,
}

/// Counts nodes as serde sees them, aliases replaced by what they name.
#[derive(Default)]
struct NodeCount {
    /// Nodes so far, expanded (saturating: a billion laughs stays a number).
    total: u64,
    /// Anchor id → expanded node count of its node, once the node is complete.
    sizes: HashMap<usize, u64>,
    /// Open containers: their anchor id (0: none) and `total` before them.
    open: Vec<(usize, u64)>,
    over: Option<TooManyNodes>,
}

impl NodeCount {
    fn add(&mut self, n: u64, mark: Marker, by_alias: bool) {
        self.total = self.total.saturating_add(n);
        if self.total > MAX_NODES && self.over.is_none() {
            self.over = Some(TooManyNodes {
                pos: Pos::from_marker(mark),
                by_alias,
            });
        }
    }

    fn on_event(&mut self, ev: &Event, mark: Marker) {
        match ev {
            Event::Scalar(_, _, anchor, _) => {
                self.add(1, mark, false);
                if *anchor != 0 {
                    self.sizes.insert(*anchor, 1);
                }
            }
            // An alias to a node still open (a recursive alias) counts as one node; the YAML
            // reader refuses it anyway.
            Event::Alias(id) => {
                let n = self.sizes.get(id).copied().unwrap_or(1);
                self.add(n, mark, true);
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                self.open.push((*anchor, self.total));
                self.add(1, mark, false);
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((anchor, before)) = self.open.pop() {
                    if anchor != 0 {
                        self.sizes.insert(anchor, self.total - before);
                    }
                }
            }
            _ => {}
        }
    }
}

impl Walker {
    /// A node starts: either a key of the enclosing mapping, or a value whose path is returned.
    fn node(&mut self, ev: &Event, mark: Marker) -> Option<String> {
        let pos = Pos::from_marker(mark);
        match self.stack.last_mut() {
            None => {
                self.values.insert(String::new(), pos);
                Some(String::new())
            }
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                self.values.insert(p.clone(), pos);
                Some(p)
            }
            Some(Frame::Map { path, key, empty }) => match key.take() {
                None => {
                    if std::mem::take(empty) {
                        self.values.insert(path.clone(), pos);
                    }
                    // A key. Complex (non-scalar) keys are not used by fieldbridge; name them `?`.
                    let k = match ev {
                        Event::Scalar(s, ..) => s.clone(),
                        _ => "?".to_string(),
                    };
                    let p = join_key(path, &k);
                    self.keys.entry(p).or_insert(pos);
                    *key = Some(k);
                    None
                }
                Some(k) => {
                    let p = join_key(path, &k);
                    self.values.entry(p.clone()).or_insert(pos);
                    Some(p)
                }
            },
        }
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        self.count.on_event(&ev, mark);
        if self.count.over.is_some() {
            // Refused anyway: stop spending memory on positions.
            return;
        }
        match ev {
            Event::Scalar(..) | Event::Alias(_) => {
                self.node(&ev, mark);
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                // A container used as a key gets a throw-away path.
                let path = self.node(&ev, mark).unwrap_or_else(|| "?".to_string());
                if matches!(ev, Event::MappingStart(..)) {
                    self.stack.push(Frame::Map {
                        path,
                        key: None,
                        empty: true,
                    });
                } else {
                    self.stack.push(Frame::Seq { path, next: 0 });
                }
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "gateway:\n  id: x\ndevices:\n  - name: a\n    points:\n      - name: p\n        address: 7\n      - {name: q, address: 9}\n";

    #[test]
    fn paths_map_to_lines_and_columns() {
        let l = Locator::new(TEXT);
        assert_eq!(l.value("gateway.id"), Some(Pos { line: 2, column: 7 }));
        assert_eq!(l.key("gateway.id"), Some(Pos { line: 2, column: 3 }));
        assert_eq!(
            l.value("devices[0].points[0].address"),
            Some(Pos {
                line: 7,
                column: 18
            })
        );
        assert_eq!(l.value("devices[0].points[1].address").unwrap().line, 8);
        assert_eq!(l.value("devices[0].points[0]").unwrap().line, 6);
    }

    #[test]
    fn aliases_count_as_the_size_of_their_anchor() {
        let mut w = Walker::default();
        let mut parser = Parser::new_from_str("a: &x [1, 2, 3]\nb: *x\nc: [*x, *x]\n");
        parser.load(&mut w, false).unwrap();
        // map(1) + a(1) + seq(4) + b(1) + 4 + c(1) + seq(1) + 8
        assert_eq!(w.count.total, 21);
        assert_eq!(w.count.over, None);
    }

    #[test]
    fn nested_aliases_multiply_without_being_expanded() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            text.push_str(&format!("a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"));
        }
        let l = Locator::new(&text);
        let over = l.too_many_nodes.unwrap();
        assert!(over.by_alias);
        // a5 holds 10^6 scalars: its second alias of a4 crosses the bound, on line 6.
        assert_eq!(over.pos.line, 6);
    }

    #[test]
    fn missing_paths_fall_back_to_the_nearest_ancestor() {
        let l = Locator::new(TEXT);
        assert_eq!(l.value("devices[0].points[0].unit").unwrap().line, 6);
        assert_eq!(parent("a.b[2]"), Some("a.b"));
        assert_eq!(parent("a"), Some(""));
    }
}
