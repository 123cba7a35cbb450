//! Maps a YAML path (`devices[2].points[5].address`) to the line and column of its node.
//!
//! serde_yaml only knows positions while it parses; validation errors found later need them
//! too, so the text is walked once more with yaml_rust2's event parser, recording where every
//! node starts. Positions are 1-based.

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

#[derive(Debug, Default)]
pub struct Locator {
    /// Path → position of the node's value (for a mapping entry) or of the item.
    values: HashMap<String, Pos>,
    /// Path → position of the key, for mapping entries.
    keys: HashMap<String, Pos>,
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
    fn missing_paths_fall_back_to_the_nearest_ancestor() {
        let l = Locator::new(TEXT);
        assert_eq!(l.value("devices[0].points[0].unit").unwrap().line, 6);
        assert_eq!(parent("a.b[2]"), Some("a.b"));
        assert_eq!(parent("a"), Some(""));
    }
}
