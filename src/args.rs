//! The command line: subcommands, their options and help, parsed by hand.
//!
//! Each subcommand is a table of its options ([`Spec`]); the parser and the help text are both
//! made from it, so they cannot disagree. Options are `--name VALUE`, `--name=VALUE`, `-c VALUE`,
//! `-cVALUE`; `--` ends the options. An unknown option is refused with the nearest one named, an
//! option given twice is refused, `-h`/`--help` anywhere prints the subcommand's help.
//! (clap did this before, at 0.18 MB of the binary: on a gateway that much binary is resident
//! memory, see benches/README.md.)

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::PathBuf;

pub const DEFAULT_CONFIG: &str = "/etc/fieldbridge/fieldbridge.yaml";

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub enum Command {
    Run {
        config: PathBuf,
        journald: bool,
    },
    Check {
        config: PathBuf,
        /// `--sample DEVICE LINE`.
        sample: Option<(String, String)>,
    },
    Status {
        config: PathBuf,
    },
    Read {
        config: PathBuf,
        device: String,
        point: Option<String>,
    },
    Scan(crate::scan::Args),
    Sunspec(crate::sunspec::cli::Args),
    Profiles {
        config: PathBuf,
        /// `show NAME`.
        show: Option<String>,
    },
}

/// The outcome of parsing.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    Command(Command),
    /// Help or the version: printed on stdout, exit 0.
    Print(String),
}

/// A command line that cannot be run: printed on stderr, exit 2.
#[derive(Debug, PartialEq)]
pub struct Error(pub String);

struct Opt {
    long: &'static str,
    short: Option<char>,
    /// The value's names (`PATH`; two for `--sample DEVICE LINE`), `""` where there is none:
    /// a flag has none.
    values: [&'static str; 2],
    help: &'static str,
    default: Option<&'static str>,
}

impl Opt {
    fn value_names(&self) -> impl Iterator<Item = &'static str> {
        self.values.into_iter().filter(|v| !v.is_empty())
    }
}

struct Spec {
    name: &'static str,
    about: &'static str,
    opts: &'static [Opt],
    /// Positional arguments: name, required, help.
    args: &'static [(&'static str, bool, &'static str)],
}

const CONFIG: Opt = Opt {
    long: "config",
    short: Some('c'),
    values: ["PATH", ""],
    help: "The configuration file",
    default: Some(DEFAULT_CONFIG),
};

const fn opt(long: &'static str, value: &'static str, help: &'static str) -> Opt {
    Opt {
        long,
        short: None,
        values: [value, ""],
        help,
        default: None,
    }
}

const fn with_default(o: Opt, default: &'static str) -> Opt {
    Opt {
        default: Some(default),
        ..o
    }
}

const SPECS: &[Spec] = &[
    Spec {
        name: "run",
        about: "Run the gateway.",
        opts: &[
            CONFIG,
            opt(
                "journald",
                "",
                "Log to the systemd journal with structured fields (automatic when stderr is the journal, as under systemd)",
            ),
        ],
        args: &[],
    },
    Spec {
        name: "check",
        about: "Validate the configuration; print devices, read blocks, topics and bus time per cycle.",
        opts: &[
            CONFIG,
            Opt {
                long: "sample",
                short: None,
                values: ["DEVICE", "LINE"],
                help: "Show how LINE parses for line device DEVICE (escapes like \\r\\n are understood)",
                default: None,
            },
        ],
        args: &[],
    },
    Spec {
        name: "status",
        about: "Print the running gateway's figures (from its `http:` endpoint) and the store-and-forward backlog (works while the gateway runs).",
        opts: &[CONFIG],
        args: &[],
    },
    Spec {
        name: "read",
        about: "Read a device (or one point) once and print values and raw registers decoded every way.",
        opts: &[CONFIG],
        args: &[
            ("DEVICE", true, "Device name"),
            ("POINT", false, "Point name; all points of the device when omitted"),
        ],
    },
    Spec {
        name: "scan",
        about: "Find the devices on a bus: which unit ids answer, what they say they are, and a `devices:` fragment to paste into the config. Give one of --bus, --port, --host.",
        opts: &[
            Opt {
                help: "The configuration whose bus `--bus` names (and whose profiles are matched)",
                ..CONFIG
            },
            opt("bus", "NAME", "Scan this bus of the configuration"),
            opt("port", "PATH", "Scan this serial port (Modbus RTU)"),
            opt(
                "host",
                "HOST[:PORT]",
                "Scan this Modbus TCP endpoint (port 502 when omitted)",
            ),
            with_default(
                opt("units", "IDS", "Unit ids to try: ranges and single ids, e.g. 1-32,40"),
                "1-247",
            ),
            opt(
                "baud",
                "RATES",
                "Serial: baud rates to try, e.g. 9600,19200 (default: the bus's, or 9600)",
            ),
            opt(
                "parity",
                "PARITIES",
                "Serial: parities to try, e.g. none,even (default: the bus's, or none)",
            ),
            with_default(opt("data-bits", "N", "Serial: data bits (7 or 8)"), "8"),
            with_default(opt("stop-bits", "N", "Serial: stop bits (1 or 2)"), "1"),
            with_default(
                opt("timeout", "DURATION", "How long to wait for each unit's answer"),
                "100ms",
            ),
        ],
        args: &[],
    },
    Spec {
        name: "sunspec",
        about: "Discover a SunSpec device (marker, model chain) and print every mapped point once. Give one of --bus, --port, --host.",
        opts: &[
            Opt {
                help: "The configuration whose bus `--bus` names",
                ..CONFIG
            },
            opt("bus", "NAME", "A bus of the configuration"),
            opt("port", "PATH", "A serial port (Modbus RTU)"),
            opt(
                "host",
                "HOST[:PORT]",
                "A Modbus TCP endpoint (port 502 when omitted)",
            ),
            with_default(opt("baud", "RATE", "Serial: baud rate"), "9600"),
            with_default(opt("parity", "PARITY", "Serial: parity (none, even, odd)"), "none"),
            with_default(opt("unit", "ID", "The device's unit id"), "1"),
            with_default(opt("timeout", "DURATION", "How long to wait for each answer"), "1s"),
            opt(
                "json",
                "",
                "One JSON object, point name -> value (null: not implemented)",
            ),
        ],
        args: &[],
    },
    Spec {
        name: "profiles",
        about: "List the device profiles (the `profiles/` directory next to the config, then the shipped ones), or with `show NAME` validate profile NAME and print its defaults and points.",
        opts: &[Opt {
            help: "The configuration whose `profiles/` directory is searched first (it need not exist)",
            ..CONFIG
        }],
        args: &[
            ("show", false, "Show one profile instead of the list"),
            ("NAME", false, "The profile to show"),
        ],
    },
];

const ABOUT: &str = "fieldbridge: field devices (Modbus RTU/TCP, serial lines) to MQTT";

fn version() -> String {
    format!("fieldbridge {}\n", env!("CARGO_PKG_VERSION"))
}

fn top_help() -> String {
    let mut h = format!(
        "{ABOUT}\n\nUsage: fieldbridge COMMAND [OPTIONS]\n       fieldbridge COMMAND --help\n\nCommands:\n"
    );
    for s in SPECS {
        let _ = writeln!(h, "  {:<9} {}", s.name, first_sentence(s.about));
    }
    h.push_str("\nOptions:\n  -h, --help     Print help\n  -V, --version  Print the version\n");
    h
}

fn first_sentence(s: &str) -> &str {
    s.split_once(". ")
        .map_or(s, |(a, _)| a)
        .trim_end_matches('.')
}

fn usage(s: &Spec) -> String {
    let mut u = format!("fieldbridge {} [OPTIONS]", s.name);
    for (name, required, _) in s.args {
        if *required {
            let _ = write!(u, " {name}");
        } else {
            let _ = write!(u, " [{name}]");
        }
    }
    u
}

fn help(s: &Spec) -> String {
    let mut h = format!("{}\n\nUsage: {}\n", s.about, usage(s));
    if !s.args.is_empty() {
        h.push_str("\nArguments:\n");
        for (name, _, text) in s.args {
            let _ = writeln!(h, "  {name:<24} {text}");
        }
    }
    h.push_str("\nOptions:\n");
    for o in s.opts {
        let short = o.short.map(|c| format!("-{c}, ")).unwrap_or_default();
        let mut left = format!("{short}--{}", o.long);
        for v in o.value_names() {
            let _ = write!(left, " {v}");
        }
        let default = o
            .default
            .map(|d| format!(" [default: {d}]"))
            .unwrap_or_default();
        let pad = if o.short.is_some() { "" } else { "    " };
        let _ = writeln!(
            h,
            "  {pad}{left:<w$} {}{default}",
            o.help,
            w = 24 - pad.len()
        );
    }
    let _ = writeln!(h, "  {:<24} Print help", "-h, --help");
    h
}

fn fail(s: Option<&Spec>, msg: String) -> Error {
    let more = match s {
        Some(s) => format!(
            "\n\nUsage: {}\n\nFor more information, try 'fieldbridge {} --help'.",
            usage(s),
            s.name
        ),
        None => "\n\nFor more information, try 'fieldbridge --help'.".into(),
    };
    Error(format!("error: {msg}{more}"))
}

/// The options and arguments of one subcommand, as given.
struct Matches {
    /// Long name → its values, in the order given.
    values: Vec<(&'static str, Vec<OsString>)>,
    args: Vec<OsString>,
}

impl Matches {
    fn os(&self, long: &str) -> Option<&OsString> {
        self.values
            .iter()
            .find(|(l, _)| *l == long)
            .and_then(|(_, v)| v.first())
    }

    /// Whether the option was given (a flag is its presence).
    fn given(&self, long: &str) -> bool {
        self.values.iter().any(|(l, _)| *l == long)
    }

    fn path(&self, spec: &Spec, long: &str) -> PathBuf {
        match self.os(long) {
            Some(v) => PathBuf::from(v),
            None => PathBuf::from(default_of(spec, long)),
        }
    }

    fn text(&self, spec: &Spec, long: &str) -> Result<Option<String>, Error> {
        self.os(long)
            .map(|v| utf8(spec, &format!("--{long}"), v))
            .transpose()
    }

    fn text_or_default(&self, spec: &Spec, long: &str) -> Result<String, Error> {
        Ok(self
            .text(spec, long)?
            .unwrap_or_else(|| default_of(spec, long).to_string()))
    }

    fn number<T: std::str::FromStr>(&self, spec: &Spec, long: &str) -> Result<T, Error> {
        let text = self.text_or_default(spec, long)?;
        text.parse().map_err(|_| {
            fail(
                Some(spec),
                format!("invalid value '{text}' for '--{long}': not a number in range"),
            )
        })
    }
}

fn default_of(spec: &Spec, long: &str) -> &'static str {
    spec.opts
        .iter()
        .find(|o| o.long == long)
        .and_then(|o| o.default)
        .unwrap_or("")
}

fn utf8(spec: &Spec, what: &str, v: &OsString) -> Result<String, Error> {
    v.to_str()
        .map(str::to_string)
        .ok_or_else(|| fail(Some(spec), format!("{what} is not valid UTF-8")))
}

/// Reads one subcommand's options and arguments; `Ok(None)` when help was asked for.
fn matches(spec: &Spec, mut rest: std::vec::IntoIter<OsString>) -> Result<Option<Matches>, Error> {
    let mut m = Matches {
        values: Vec::new(),
        args: Vec::new(),
    };
    let mut only_args = false;
    while let Some(arg) = rest.next() {
        let text = arg.to_string_lossy().into_owned();
        if only_args || !text.starts_with('-') || text == "-" {
            m.args.push(arg);
            continue;
        }
        if text == "--" {
            only_args = true;
            continue;
        }
        if text == "-h" || text == "--help" {
            return Ok(None);
        }
        // `--name`, `--name=value`, `-c`, `-cvalue`.
        let (opt, inline) = if let Some(long) = text.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(OsString::from(v))),
                None => (long, None),
            };
            let Some(o) = spec.opts.iter().find(|o| o.long == name) else {
                let names: Vec<&str> = spec.opts.iter().map(|o| o.long).collect();
                let hint = crate::config::closest(name, &names)
                    .map(|c| format!("\n\n  tip: a similar option exists: '--{c}'"))
                    .unwrap_or_default();
                return Err(fail(
                    Some(spec),
                    format!("unexpected argument '--{name}' found{hint}"),
                ));
            };
            (o, inline)
        } else {
            let mut chars = text[1..].chars();
            let c = chars.next().unwrap_or('-');
            let attached: String = chars.collect();
            let Some(o) = spec.opts.iter().find(|o| o.short == Some(c)) else {
                return Err(fail(
                    Some(spec),
                    format!("unexpected argument '-{c}' found"),
                ));
            };
            (o, (!attached.is_empty()).then(|| OsString::from(attached)))
        };
        if m.values.iter().any(|(l, _)| *l == opt.long) {
            return Err(fail(
                Some(spec),
                format!(
                    "the argument '--{}' cannot be used multiple times",
                    opt.long
                ),
            ));
        }
        let mut values = Vec::new();
        let wanted = opt.value_names().count();
        if wanted == 0 {
            if inline.is_some() {
                return Err(fail(Some(spec), format!("'--{}' takes no value", opt.long)));
            }
        } else {
            values.extend(inline);
            while values.len() < wanted {
                match rest.next() {
                    Some(v) => values.push(v),
                    None => {
                        return Err(fail(
                            Some(spec),
                            format!(
                                "'--{}' needs {}",
                                opt.long,
                                opt.value_names()
                                    .map(|v| format!("<{v}>"))
                                    .collect::<Vec<_>>()
                                    .join(" ")
                            ),
                        ))
                    }
                }
            }
        }
        m.values.push((opt.long, values));
    }
    if m.args.len() > spec.args.len() {
        let extra = m.args[spec.args.len()].to_string_lossy().into_owned();
        return Err(fail(
            Some(spec),
            format!("unexpected argument '{extra}' found"),
        ));
    }
    if let Some((name, _, _)) = spec
        .args
        .iter()
        .skip(m.args.len())
        .find(|(_, required, _)| *required)
    {
        return Err(fail(
            Some(spec),
            format!("the required argument <{name}> was not given"),
        ));
    }
    Ok(Some(m))
}

/// At most one of `--bus`, `--port`, `--host`.
fn one_target(spec: &Spec, m: &Matches) -> Result<(), Error> {
    let given: Vec<&str> = ["bus", "port", "host"]
        .into_iter()
        .filter(|l| m.given(l))
        .collect();
    if given.len() > 1 {
        return Err(fail(
            Some(spec),
            format!(
                "the arguments '--{}' and '--{}' cannot be used together: give one of --bus, --port, --host",
                given[0], given[1]
            ),
        ));
    }
    Ok(())
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Parsed, Error> {
    let mut args: Vec<OsString> = args.into_iter().collect();
    if args.is_empty() {
        return Err(Error(top_help()));
    }
    let first = args.remove(0).to_string_lossy().into_owned();
    match first.as_str() {
        "-h" | "--help" => return Ok(Parsed::Print(top_help())),
        "-V" | "--version" => return Ok(Parsed::Print(version())),
        "help" => {
            return match args.first().map(|a| a.to_string_lossy().into_owned()) {
                None => Ok(Parsed::Print(top_help())),
                Some(name) => match SPECS.iter().find(|s| s.name == name) {
                    Some(s) => Ok(Parsed::Print(help(s))),
                    None => Err(fail(None, format!("unrecognized subcommand '{name}'"))),
                },
            }
        }
        _ => {}
    }
    let Some(spec) = SPECS.iter().find(|s| s.name == first) else {
        let names: Vec<&str> = SPECS.iter().map(|s| s.name).collect();
        let hint = crate::config::closest(&first, &names)
            .map(|c| format!("\n\n  tip: a similar subcommand exists: '{c}'"))
            .unwrap_or_default();
        return Err(fail(
            None,
            format!("unrecognized subcommand '{first}'{hint}"),
        ));
    };
    let Some(m) = matches(spec, args.into_iter())? else {
        return Ok(Parsed::Print(help(spec)));
    };
    let config = m.path(spec, "config");
    let arg = |i: usize| {
        m.args
            .get(i)
            .map(|a| utf8(spec, "an argument", a))
            .transpose()
    };
    let command = match spec.name {
        "run" => Command::Run {
            config,
            journald: m.given("journald"),
        },
        "check" => Command::Check {
            config,
            sample: match m.values.iter().find(|(l, _)| *l == "sample") {
                Some((_, v)) => Some((utf8(spec, "DEVICE", &v[0])?, utf8(spec, "LINE", &v[1])?)),
                None => None,
            },
        },
        "status" => Command::Status { config },
        "read" => Command::Read {
            config,
            device: arg(0)?.unwrap_or_default(),
            point: arg(1)?,
        },
        "scan" => {
            one_target(spec, &m)?;
            Command::Scan(crate::scan::Args {
                config,
                bus: m.text(spec, "bus")?,
                port: m.text(spec, "port")?,
                host: m.text(spec, "host")?,
                units: m.text_or_default(spec, "units")?,
                baud: m.text(spec, "baud")?,
                parity: m.text(spec, "parity")?,
                data_bits: m.number(spec, "data-bits")?,
                stop_bits: m.number(spec, "stop-bits")?,
                timeout: m.text_or_default(spec, "timeout")?,
            })
        }
        "sunspec" => {
            one_target(spec, &m)?;
            Command::Sunspec(crate::sunspec::cli::Args {
                config,
                bus: m.text(spec, "bus")?,
                port: m.text(spec, "port")?,
                host: m.text(spec, "host")?,
                baud: m.number(spec, "baud")?,
                parity: m.text_or_default(spec, "parity")?,
                unit: m.number(spec, "unit")?,
                timeout: m.text_or_default(spec, "timeout")?,
                json: m.given("json"),
            })
        }
        "profiles" => {
            let show = match arg(0)?.as_deref() {
                None => None,
                Some("show") => match arg(1)? {
                    Some(name) => Some(name),
                    None => {
                        return Err(fail(
                            Some(spec),
                            "the required argument <NAME> was not given".into(),
                        ))
                    }
                },
                Some(other) => {
                    return Err(fail(
                        Some(spec),
                        format!("unrecognized subcommand '{other}' (only `show NAME`)"),
                    ))
                }
            };
            Command::Profiles { config, show }
        }
        _ => unreachable!("every spec is matched above"),
    };
    Ok(Parsed::Command(command))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Parsed, Error> {
        parse(args.iter().map(OsString::from))
    }

    fn cmd(args: &[&str]) -> Command {
        match p(args) {
            Ok(Parsed::Command(c)) => c,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn err(args: &[&str]) -> String {
        match p(args) {
            Err(Error(e)) => e,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn options_take_every_spelling_and_defaults_fill_the_rest() {
        let want = Command::Run {
            config: "/x.yaml".into(),
            journald: false,
        };
        assert_eq!(cmd(&["run", "--config", "/x.yaml"]), want);
        assert_eq!(cmd(&["run", "--config=/x.yaml"]), want);
        assert_eq!(cmd(&["run", "-c", "/x.yaml"]), want);
        assert_eq!(cmd(&["run", "-c/x.yaml"]), want);
        assert_eq!(
            cmd(&["run", "--journald"]),
            Command::Run {
                config: DEFAULT_CONFIG.into(),
                journald: true
            }
        );
        assert_eq!(
            cmd(&["check", "--sample", "tank", "-x=1", "-c", "a.yaml"]),
            Command::Check {
                config: "a.yaml".into(),
                sample: Some(("tank".into(), "-x=1".into()))
            }
        );
        assert_eq!(
            cmd(&["read", "-c", "a.yaml", "meter", "--", "-odd"]),
            Command::Read {
                config: "a.yaml".into(),
                device: "meter".into(),
                point: Some("-odd".into())
            }
        );
        let Command::Scan(s) = cmd(&["scan", "--host", "127.0.0.1:1502", "--units=1-4"]) else {
            panic!()
        };
        assert_eq!(
            (
                s.host.as_deref(),
                s.units.as_str(),
                s.data_bits,
                s.timeout.as_str()
            ),
            (Some("127.0.0.1:1502"), "1-4", 8, "100ms")
        );
        let Command::Sunspec(s) =
            cmd(&["sunspec", "--port", "/dev/ttyUSB0", "--unit", "3", "--json"])
        else {
            panic!()
        };
        assert_eq!(
            (s.unit, s.baud, s.parity.as_str(), s.json),
            (3, 9600, "none", true)
        );
        assert_eq!(
            cmd(&["profiles", "show", "eastron-sdm630"]),
            Command::Profiles {
                config: DEFAULT_CONFIG.into(),
                show: Some("eastron-sdm630".into())
            }
        );
    }

    #[test]
    fn mistakes_are_refused_with_what_was_meant() {
        let e = err(&["check", "--confg", "x"]);
        assert!(e.contains("unexpected argument '--confg'"), "{e}");
        assert!(e.contains("'--config'"), "{e}");
        assert!(e.contains("Usage: fieldbridge check [OPTIONS]"), "{e}");
        assert!(err(&["chek"]).contains("similar subcommand exists: 'check'"));
        assert!(err(&["read"]).contains("required argument <DEVICE>"));
        assert!(err(&["read", "a", "b", "c"]).contains("unexpected argument 'c'"));
        assert!(err(&["run", "-c"]).contains("'--config' needs <PATH>"));
        assert!(err(&["run", "-c", "a", "-c", "b"]).contains("cannot be used multiple times"));
        assert!(err(&["run", "--journald=yes"]).contains("takes no value"));
        assert!(err(&["check", "--sample", "dev"]).contains("needs <DEVICE> <LINE>"));
        assert!(err(&["scan", "--bus", "a", "--host", "h"]).contains("cannot be used together"));
        assert!(err(&["sunspec", "--unit", "300"]).contains("invalid value '300' for '--unit'"));
        assert!(err(&["profiles", "shw", "x"]).contains("only `show NAME`"));
        assert!(err(&[]).contains("Commands:"));
    }

    #[test]
    fn help_and_version_go_to_stdout() {
        let Ok(Parsed::Print(h)) = p(&["--help"]) else {
            panic!()
        };
        for s in SPECS {
            assert!(h.contains(&format!("  {:<9} ", s.name)), "{h}");
        }
        let Ok(Parsed::Print(h)) = p(&["scan", "--host", "x", "-h"]) else {
            panic!()
        };
        assert!(h.contains("--units IDS"), "{h}");
        assert!(h.contains("[default: 1-247]"), "{h}");
        assert!(h.contains("-c, --config PATH"), "{h}");
        assert_eq!(p(&["help", "scan"]), Ok(Parsed::Print(h)));
        let Ok(Parsed::Print(v)) = p(&["-V"]) else {
            panic!()
        };
        assert!(v.starts_with("fieldbridge "), "{v}");
    }
}
