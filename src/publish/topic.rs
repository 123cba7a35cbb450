//! Topic templates, topic names and point names: rendering and the MQTT rules (pure).

/// MQTT limit on a topic name: a UTF-8 string with a 16-bit length prefix (MQTT 3.1.1 §1.5.3).
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// What is wrong with a topic, template or name, and where (`at` is a byte offset).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopicError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error(
        "{what} {text:?} contains the wildcard {ch:?} at byte {at}; wildcards are for \
         subscriptions, not for publishing"
    )]
    Wildcard {
        what: &'static str,
        text: String,
        ch: char,
        at: usize,
    },
    #[error("{what} {text:?} contains a NUL character at byte {at}")]
    Nul {
        what: &'static str,
        text: String,
        at: usize,
    },
    #[error("topic {topic:?} has an empty level at byte {at} (leading or trailing '/', or '//')")]
    EmptyLevel { topic: String, at: usize },
    #[error("topic {topic:?} starts with '$', which brokers reserve for themselves ($SYS)")]
    Reserved { topic: String },
    #[error("topic is {len} bytes long; MQTT allows at most {MAX_TOPIC_BYTES}")]
    TooLong { len: usize },
    #[error(
        "name {name:?} contains '/' at byte {at}; a name becomes a single topic level, \
         use '-' or '_' instead"
    )]
    Slash { name: String, at: usize },
    #[error("name {name:?} has leading or trailing whitespace")]
    Whitespace { name: String },
    #[error(
        "template {template:?} has an unknown placeholder {{{name}}} at byte {at}; \
         known: {{prefix}}, {{device}}, {{point}}"
    )]
    UnknownPlaceholder {
        template: String,
        name: String,
        at: usize,
    },
    #[error("template {template:?} has an unclosed '{{' at byte {at}")]
    Unclosed { template: String, at: usize },
}

/// Renders a topic template with the placeholders `{prefix}`, `{device}` and `{point}`, then
/// checks the result with [`validate_topic`]. A `}` outside a placeholder is literal.
pub fn render_topic(
    template: &str,
    prefix: &str,
    device: &str,
    point: &str,
) -> Result<String, TopicError> {
    let mut out = String::with_capacity(template.len() + prefix.len() + device.len() + point.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let at = template.len() - rest.len() + open;
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or_else(|| TopicError::Unclosed {
            template: template.to_owned(),
            at,
        })?;
        let name = &after[..close];
        out.push_str(match name {
            "prefix" => prefix,
            "device" => device,
            "point" => point,
            _ => {
                return Err(TopicError::UnknownPlaceholder {
                    template: template.to_owned(),
                    name: name.to_owned(),
                    at,
                })
            }
        });
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    validate_topic(&out)?;
    Ok(out)
}

/// Checks a topic to publish to: non-empty, at most 65535 bytes, no wildcards (`+`, `#`), no
/// NUL, no empty levels, and not starting with `$` (broker-reserved, MQTT 3.1.1 §4.7.2).
pub fn validate_topic(topic: &str) -> Result<(), TopicError> {
    const WHAT: &str = "topic";
    if topic.is_empty() {
        return Err(TopicError::Empty { what: WHAT });
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(TopicError::TooLong { len: topic.len() });
    }
    forbidden_chars(WHAT, topic)?;
    if topic.starts_with('$') {
        return Err(TopicError::Reserved {
            topic: topic.to_owned(),
        });
    }
    let mut at = 0;
    for level in topic.split('/') {
        if level.is_empty() {
            return Err(TopicError::EmptyLevel {
                topic: topic.to_owned(),
                at,
            });
        }
        at += level.len() + 1;
    }
    Ok(())
}

fn forbidden_chars(what: &'static str, text: &str) -> Result<(), TopicError> {
    if let Some((at, ch)) = text.char_indices().find(|&(_, c)| matches!(c, '+' | '#')) {
        return Err(TopicError::Wildcard {
            what,
            text: text.to_owned(),
            ch,
            at,
        });
    }
    if let Some(at) = text.find('\0') {
        return Err(TopicError::Nul {
            what,
            text: text.to_owned(),
            at,
        });
    }
    Ok(())
}

/// Checks a device, point or gateway name that becomes one topic level: non-empty, no `/`,
/// `+`, `#` or NUL, no leading or trailing whitespace.
pub fn validate_name(name: &str) -> Result<(), TopicError> {
    const WHAT: &str = "name";
    if name.is_empty() {
        return Err(TopicError::Empty { what: WHAT });
    }
    forbidden_chars(WHAT, name)?;
    if let Some(at) = name.find('/') {
        return Err(TopicError::Slash {
            name: name.to_owned(),
            at,
        });
    }
    if name.trim() != name {
        return Err(TopicError::Whitespace {
            name: name.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_every_placeholder() {
        assert_eq!(
            render_topic("{prefix}/{device}/{point}", "site1", "m1", "voltage"),
            Ok("site1/m1/voltage".into())
        );
        assert_eq!(
            render_topic("plant/{device}/data/{point}/}", "p", "m1", "v"),
            Ok("plant/m1/data/v/}".into())
        );
        assert_eq!(
            render_topic("{prefix}/{device}", "gw", "m1", "unused"),
            Ok("gw/m1".into())
        );
    }

    #[test]
    fn unknown_or_unclosed_placeholders_are_refused() {
        assert_eq!(
            render_topic("{prefix}/{unit}/x", "gw", "m1", "v"),
            Err(TopicError::UnknownPlaceholder {
                template: "{prefix}/{unit}/x".into(),
                name: "unit".into(),
                at: 9
            })
        );
        assert_eq!(
            render_topic("{prefix}/{device", "gw", "m1", "v"),
            Err(TopicError::Unclosed {
                template: "{prefix}/{device".into(),
                at: 9
            })
        );
        // The rendered topic is checked too: an empty prefix leaves an empty level.
        assert!(matches!(
            render_topic("{prefix}/{device}", "", "m1", "v"),
            Err(TopicError::EmptyLevel { at: 0, .. })
        ));
    }

    #[test]
    fn publish_topics_refuse_wildcards_empty_levels_and_nul() {
        assert_eq!(validate_topic("site/m1/voltage"), Ok(()));
        assert_eq!(validate_topic("a"), Ok(()));
        assert_eq!(validate_topic(""), Err(TopicError::Empty { what: "topic" }));
        assert!(matches!(
            validate_topic("a/+/b"),
            Err(TopicError::Wildcard { ch: '+', at: 2, .. })
        ));
        assert!(matches!(
            validate_topic("a/#"),
            Err(TopicError::Wildcard { ch: '#', at: 2, .. })
        ));
        for (topic, at) in [("/a", 0), ("a/", 2), ("a//b", 2), ("/", 0)] {
            assert_eq!(
                validate_topic(topic),
                Err(TopicError::EmptyLevel {
                    topic: topic.into(),
                    at
                }),
                "{topic}"
            );
        }
        assert!(matches!(
            validate_topic("a\0b"),
            Err(TopicError::Nul { at: 1, .. })
        ));
        assert!(matches!(
            validate_topic("$SYS/x"),
            Err(TopicError::Reserved { .. })
        ));
        assert_eq!(validate_topic(&"é".repeat(32_767)), Ok(()));
        assert_eq!(
            validate_topic(&"é".repeat(32_768)),
            Err(TopicError::TooLong { len: 65_536 })
        );
    }

    #[test]
    fn topic_errors_say_what_and_where() {
        let e = validate_topic("a//b").unwrap_err().to_string();
        assert!(e.contains("byte 2") && e.contains("empty level"), "{e}");
        let e = validate_name("m/1").unwrap_err().to_string();
        assert!(e.contains("'/'") && e.contains("byte 1"), "{e}");
    }

    #[test]
    fn names_are_single_clean_levels() {
        assert_eq!(validate_name("meter-1 main"), Ok(()));
        assert_eq!(validate_name(""), Err(TopicError::Empty { what: "name" }));
        assert!(matches!(
            validate_name("m/1"),
            Err(TopicError::Slash { at: 1, .. })
        ));
        assert!(matches!(
            validate_name("m+"),
            Err(TopicError::Wildcard { .. })
        ));
        assert!(matches!(
            validate_name("#"),
            Err(TopicError::Wildcard { .. })
        ));
        assert!(matches!(validate_name("m\0"), Err(TopicError::Nul { .. })));
        assert!(matches!(
            validate_name(" m1"),
            Err(TopicError::Whitespace { .. })
        ));
        assert!(matches!(
            validate_name("m1\t"),
            Err(TopicError::Whitespace { .. })
        ));
    }
}
