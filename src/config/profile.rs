//! Device profiles: `profile: NAME` on a device brings the points and defaults of
//! `profiles/NAME.yaml`.
//!
//! Where profiles are found ([`Library`]), first match wins:
//! 1. the user's directory `profiles/` next to the configuration file
//!    (`/etc/fieldbridge/profiles` for `/etc/fieldbridge/fieldbridge.yaml`);
//! 2. the shipped ones: the directory in `FIELDBRIDGE_PROFILES` if set, else the compiled-in
//!    default, `/usr/share/fieldbridge/profiles` (where the .deb installs the repository's
//!    `profiles/`); debug builds (`cargo run`, `cargo test`) use the repository's `profiles/`
//!    instead, and so does a release build run where nothing is installed but the checkout it
//!    was built from is still there, so that a checkout works without installing.
//!
//! A profile file is a mapping with metadata (`name`, `vendor`, `model`, `document`, `notes`),
//! `device:` defaults (anything the profile sets that a device may set: unit, interval,
//! timeout, groups, order, …) and `points:` in the syntax of a device's points. It is
//! validated the way a device is, in the context of each device that uses it; an error in a
//! profile names the profile's file, YAML path and line (the validator switches to the
//! profile's [`Locator`] while it checks the profile's own keys).
//!
//! Merging, per device: the device's keys win over the profile's `device:` defaults (`groups`
//! merge by name); a device point with the name of a profile point replaces it when it gives an
//! `address` or `register`, else changes only the keys it gives; other device points are added
//! after the profile's; `points_exclude` drops profile points by name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::locate::Locator;
use super::raw::{RawDevice, RawPoint, RawProfile};
use super::{closest, from_serde, ConfigError, Validator, MAX_FILE_BYTES};
use crate::model::PointSource;

/// The environment variable naming the directory of the shipped profiles.
pub const PROFILES_ENV: &str = "FIELDBRIDGE_PROFILES";

/// Where the .deb installs the shipped profiles.
pub const INSTALLED_DIR: &str = "/usr/share/fieldbridge/profiles";

/// Where the shipped profiles are when `FIELDBRIDGE_PROFILES` is not set.
pub fn default_shipped_dir() -> PathBuf {
    shipped_dir_among(
        Path::new(INSTALLED_DIR),
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles"),
        cfg!(debug_assertions),
    )
}

/// Debug builds take the checkout's `profiles/`; a release build the installed directory,
/// unless it is absent and the checkout it was built from is still there (a release binary
/// run from `target/release` in a source tree). A cross-built binary on a device that has
/// neither names the installed directory, which is what an error's hint should say.
fn shipped_dir_among(installed: &Path, checkout: &Path, debug: bool) -> PathBuf {
    if debug || (!installed.is_dir() && checkout.is_dir()) {
        checkout.to_path_buf()
    } else {
        installed.to_path_buf()
    }
}

/// Where a profile directory's files come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The user's `profiles/` next to the configuration.
    User,
    /// Shipped with fieldbridge.
    Shipped,
}

impl Origin {
    pub fn name(self) -> &'static str {
        match self {
            Origin::User => "user",
            Origin::Shipped => "shipped",
        }
    }
}

/// The directories searched for profiles, in order (the first that has `NAME.yaml` wins).
#[derive(Debug, Clone, Default)]
pub struct Library {
    pub dirs: Vec<(PathBuf, Origin)>,
}

/// One profile of a [`Library`], as `fieldbridge profiles` lists it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub file: PathBuf,
    pub origin: Origin,
    /// Files of the same name further down the search path, not used.
    pub shadows: Vec<PathBuf>,
}

impl Library {
    /// For the configuration file at `config`: its `profiles/` directory, then the shipped.
    pub fn for_config(config: &Path) -> Library {
        let dir = config
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."));
        let mut lib = Library::shipped();
        lib.dirs.insert(0, (dir.join("profiles"), Origin::User));
        lib
    }

    /// The shipped profiles only (`FIELDBRIDGE_PROFILES` or the compiled-in default).
    pub fn shipped() -> Library {
        let dir = std::env::var_os(PROFILES_ENV)
            .filter(|v| !v.is_empty())
            .map_or_else(default_shipped_dir, PathBuf::from);
        Library {
            dirs: vec![(dir, Origin::Shipped)],
        }
    }

    /// The file of profile `name`, and where it came from.
    pub fn find(&self, name: &str) -> Option<(PathBuf, Origin)> {
        if !valid_name(name) {
            return None;
        }
        self.dirs.iter().find_map(|(dir, origin)| {
            let f = dir.join(format!("{name}.yaml"));
            f.is_file().then_some((f, *origin))
        })
    }

    /// Every profile, sorted by name; a user's profile hides a shipped one of the same name.
    pub fn list(&self) -> Vec<Entry> {
        let mut out: Vec<Entry> = Vec::new();
        for (dir, origin) in &self.dirs {
            let Ok(read) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = read
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "yaml") && p.is_file())
                .collect();
            files.sort();
            for file in files {
                let Some(name) = file.file_stem().and_then(|s| s.to_str()) else {
                    continue;
                };
                if !valid_name(name) {
                    continue;
                }
                match out.iter_mut().find(|e| e.name == name) {
                    Some(e) => e.shadows.push(file.clone()),
                    None => out.push(Entry {
                        name: name.to_string(),
                        file: file.clone(),
                        origin: *origin,
                        shadows: Vec::new(),
                    }),
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The names of every profile, for hints.
    fn names(&self) -> Vec<String> {
        self.list().into_iter().map(|e| e.name).collect()
    }
}

/// Profile names are file names: lowercase letters, digits, `-` and `_`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// A profile read and parsed (stage 1), with its positions for messages.
#[derive(Debug)]
pub(super) struct Source {
    /// The file as messages show it.
    pub file: String,
    pub loc: Locator,
    pub raw: RawProfile,
    /// The points SunSpec discovery found ([`sunspec_source`]), not a file.
    pub discovered: bool,
}

/// Reads and parses a profile file: stage 1 only (serde), errors naming the file.
pub(super) fn read_profile(file: &Path) -> Result<Source, Vec<ConfigError>> {
    let shown = file.display().to_string();
    let whole = |message: String| {
        vec![ConfigError {
            path: String::new(),
            line: None,
            column: None,
            message,
            hint: None,
            file: Some(shown.clone()),
        }]
    };
    let mut bytes = Vec::new();
    let read = std::fs::File::open(file).and_then(|f| {
        use std::io::Read;
        f.take(MAX_FILE_BYTES as u64 + 1).read_to_end(&mut bytes)
    });
    if let Err(e) = read {
        return Err(whole(format!("cannot read the profile: {e}")));
    }
    if bytes.len() > MAX_FILE_BYTES {
        return Err(whole(format!(
            "the profile is larger than {} MiB",
            MAX_FILE_BYTES >> 20
        )));
    }
    let text = String::from_utf8(bytes).map_err(|e| whole(format!("cannot read: {e}")))?;
    let loc = Locator::new(&text);
    if loc.too_many_nodes.is_some() {
        return Err(whole(format!(
            "the profile has more than {} YAML nodes",
            super::locate::MAX_NODES
        )));
    }
    match super::yaml::from_str::<RawProfile>(&text) {
        Ok(raw) => Ok(Source {
            file: shown,
            loc,
            raw,
            discovered: false,
        }),
        Err(e) => {
            let mut err = from_serde(&e);
            err.file = Some(shown);
            Err(vec![err])
        }
    }
}

/// A device's points after merging with its profile, each with where it came from and the
/// path its errors are reported at (in the profile when it is the profile's).
pub(super) struct MergedPoint {
    pub raw: RawPoint,
    pub source: PointSource,
    /// `points[k]` of the profile, or `devices[i].points[j]` of the configuration.
    pub path: String,
    /// Index of the device's own point (for its position in the configuration), if any.
    pub device_index: Option<usize>,
}

/// Overlays the keys the device's point gives on the profile's point of the same name.
fn overlay(base: &mut RawPoint, top: RawPoint) {
    macro_rules! take {
        ($($f:ident),*) => { $( if top.$f.is_some() { base.$f = top.$f; } )* };
    }
    take!(
        register,
        address,
        data_type,
        bit,
        length,
        order,
        scale,
        offset,
        unit,
        labels,
        group,
        topic,
        payload,
        publish,
        qos,
        retain,
        writable,
        min,
        max,
        command,
        homeassistant,
        field
    );
}

impl Validator<'_> {
    /// The profile `name` (read once per configuration), or `None` if it is missing or has
    /// errors (reported, naming its file).
    pub(super) fn profile(&mut self, path: &str, name: &str) -> Option<Rc<Source>> {
        if let Some(cached) = self.profiles.get(name) {
            return cached.clone();
        }
        let found = self.library.find(name);
        let source = match found {
            None => {
                let names = self.library.names();
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                let dirs: Vec<String> = self
                    .library
                    .dirs
                    .iter()
                    .map(|(d, _)| d.display().to_string())
                    .collect();
                let hint = match closest(name, &refs) {
                    Some(c) => format!("did you mean `{c}`? (`fieldbridge profiles` lists them)"),
                    None => format!(
                        "profiles are NAME.yaml files in {} (`fieldbridge profiles` lists them)",
                        dirs.join(", ")
                    ),
                };
                self.err(path, format!("no profile is named `{name}`"), Some(hint));
                None
            }
            Some((file, _)) => match read_profile(&file) {
                Err(errors) => {
                    self.errors.extend(errors);
                    None
                }
                Ok(source) => self.check_profile(Rc::new(source)),
            },
        };
        self.profiles.insert(name.to_string(), source.clone());
        source
    }

    /// Checks a profile's metadata and `device:` defaults, in its own file.
    fn check_profile(&mut self, source: Rc<Source>) -> Option<Rc<Source>> {
        let before = self.errors.len();
        let prev = self.current.replace(source.clone());
        let raw = &source.raw;
        let stem = Path::new(&source.file)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        if raw.name != stem {
            self.err(
                "name",
                format!(
                    "the profile's name `{}` is not its file's `{stem}`",
                    raw.name
                ),
                Some(format!(
                    "name the file {}.yaml, or set `name: {stem}`",
                    raw.name
                )),
            );
        }
        for (key, v) in [
            ("vendor", &raw.vendor),
            ("model", &raw.model),
            ("document", &raw.document),
        ] {
            if v.trim().is_empty() {
                self.err(
                    key,
                    format!("`{key}` is empty"),
                    Some("a profile names the vendor, the model and the register-map document (title and revision) it follows".into()),
                );
            }
        }
        if raw.points.is_empty() {
            self.err("points", "the profile has no points", None);
        }
        if let Some(d) = &raw.device {
            if let Some(u) = d.unit {
                if !(1..=247).contains(&u) && u != 255 {
                    self.err(
                        "device.unit",
                        format!("{u} is outside 1..=247 (or 255)"),
                        None,
                    );
                }
            }
            self.device_defaults("device", d, false);
        }
        self.current = prev;
        (self.errors.len() == before).then_some(source)
    }

    /// Merges a device with its profile: defaults into `d`, points into the returned list.
    pub(super) fn merge_profile(
        &mut self,
        path: &str,
        d: &mut RawDevice,
        source: &Rc<Source>,
    ) -> (Vec<MergedPoint>, Vec<String>) {
        let prof = &source.raw;
        if let Some(pd) = &prof.device {
            macro_rules! dflt {
                ($($f:ident),*) => { $( if d.$f.is_none() { d.$f = pd.$f.clone(); } )* };
            }
            dflt!(
                unit,
                interval,
                timeout,
                offline_after,
                backoff_max,
                max_gap,
                max_registers,
                max_bits,
                order
            );
            if let Some(pg) = &pd.groups {
                let mut groups = pg.clone();
                for (k, v) in d.groups.iter().flatten() {
                    groups.insert(k.clone(), v.clone());
                }
                d.groups = Some(groups);
            }
        }
        if d.manufacturer.is_none() {
            d.manufacturer = Some(prof.vendor.clone());
        }
        if d.model.is_none() {
            d.model = Some(prof.model.clone());
        }
        let mut excluded = Vec::new();
        let exclude = d.points_exclude.take().unwrap_or_default();
        let names: Vec<&str> = prof.points.iter().map(|p| p.name.as_str()).collect();
        for (i, x) in exclude.iter().enumerate() {
            if !names.contains(&x.as_str()) && source.discovered {
                // The device decides what exists: one file serves devices of other models.
                self.warn(
                    &format!("{path}.points_exclude[{i}]"),
                    format!("the device's SunSpec models have no point `{x}`"),
                    Some("`fieldbridge sunspec` lists the device's points".into()),
                );
            } else if !names.contains(&x.as_str()) {
                self.err(
                    &format!("{path}.points_exclude[{i}]"),
                    format!("profile `{}` has no point `{x}`", prof.name),
                    Some(match closest(x, &names) {
                        Some(c) => format!("did you mean `{c}`?"),
                        None => {
                            format!("`fieldbridge profiles show {}` lists its points", prof.name)
                        }
                    }),
                );
            } else if d.points.iter().any(|p| &p.name == x) {
                self.err(
                    &format!("{path}.points_exclude[{i}]"),
                    format!("point `{x}` is excluded and also given on the device"),
                    Some("keep one: the device's point replaces the profile's anyway".into()),
                );
            }
        }
        let mut own: Vec<Option<RawPoint>> = std::mem::take(&mut d.points)
            .into_iter()
            .map(Some)
            .collect();
        let mut out = Vec::new();
        for (k, pp) in prof.points.iter().enumerate() {
            if exclude.contains(&pp.name) {
                excluded.push(pp.name.clone());
                continue;
            }
            let mine = own
                .iter()
                .position(|o| o.as_ref().is_some_and(|o| o.name == pp.name));
            match mine {
                None => out.push(MergedPoint {
                    raw: pp.clone(),
                    source: PointSource::Profile,
                    path: format!("points[{k}]"),
                    device_index: None,
                }),
                Some(j) => {
                    let top = own[j].take().expect("found above");
                    let raw = if top.address.is_some() || top.register.is_some() {
                        top
                    } else {
                        let mut base = pp.clone();
                        overlay(&mut base, top);
                        base
                    };
                    out.push(MergedPoint {
                        raw,
                        source: PointSource::Overridden,
                        path: format!("{path}.points[{j}]"),
                        device_index: Some(j),
                    });
                }
            }
        }
        for (j, o) in own.into_iter().enumerate() {
            if let Some(raw) = o {
                if source.discovered && raw.address.is_none() && raw.register.is_none() {
                    // A change to a point this device turned out not to have (another model,
                    // e.g. a single-phase inverter): the device decides what exists.
                    self.warn(
                        &format!("{path}.points[{j}]"),
                        format!(
                            "the device's SunSpec models have no point `{}`: the change is ignored",
                            raw.name
                        ),
                        Some("`fieldbridge sunspec` lists the device's points".into()),
                    );
                    continue;
                }
                out.push(MergedPoint {
                    raw,
                    source: PointSource::Device,
                    path: format!("{path}.points[{j}]"),
                    device_index: Some(j),
                });
            }
        }
        (out, excluded)
    }
}

/// The points SunSpec discovery found on a device, as a profile of its own (the device's
/// points override them by name, `points_exclude` drops them): holding registers in SunSpec's
/// word order, read-only; their scale factors are applied by the bus, not by `scale`.
pub(super) fn sunspec_source(device: &str, found: &crate::sunspec::Discovered) -> Rc<Source> {
    use crate::sunspec::T;
    let (points, _) = crate::sunspec::points(&found.discovery);
    let points = points
        .into_iter()
        .map(|p| {
            let (ty, length) = match p.ty {
                T::I16 | T::Sf => ("i16", None),
                T::U16 | T::E16 | T::B16 | T::Acc16 => ("u16", None),
                T::I32 => ("i32", None),
                T::U32 | T::E32 | T::B32 | T::Acc32 => ("u32", None),
                T::F32 => ("f32", None),
                T::U64 | T::Acc64 => ("u64", None),
                T::I64 => ("i64", None),
                T::Str(n) => ("string", Some(i64::from(n))),
            };
            let unit = match p.units {
                "" => None,
                "Pct" => Some("%"),
                "C" => Some("°C"),
                "Secs" => Some("s"),
                u => Some(u),
            };
            RawPoint {
                name: p.name,
                register: Some("holding".into()),
                address: Some(i64::from(p.address)),
                data_type: Some(ty.into()),
                bit: None,
                length,
                order: None,
                scale: None,
                offset: None,
                unit: unit.map(str::to_string),
                labels: None,
                group: None,
                topic: None,
                payload: None,
                publish: None,
                qos: None,
                retain: None,
                writable: None,
                min: None,
                max: None,
                command: None,
                homeassistant: None,
                field: None,
            }
        })
        .collect();
    let or = |s: &str, default: &str| {
        if s.is_empty() {
            default.to_string()
        } else {
            s.to_string()
        }
    };
    Rc::new(Source {
        file: format!("SunSpec discovery on device {device}"),
        loc: Locator::new(""),
        raw: RawProfile {
            name: "sunspec".into(),
            vendor: or(&found.manufacturer, "SunSpec"),
            model: or(&found.model, "SunSpec device"),
            document: format!(
                "SunSpec models at {}: {}",
                found.discovery.base,
                crate::sunspec::chain_line(&found.discovery)
            ),
            notes: None,
            device: None,
            points,
        },
        discovered: true,
    })
}

/// A profile's metadata, as `fieldbridge profiles` lists it.
#[derive(Debug, Clone)]
pub struct Info {
    pub name: String,
    pub vendor: String,
    pub model: String,
    pub document: String,
    pub notes: Option<String>,
    pub points: usize,
}

/// Reads the metadata of the profile file `file` (stage 1 only: [`expand`] validates it).
pub fn info(file: &Path) -> Result<Info, super::ConfigErrors> {
    let s = read_profile(file).map_err(|errors| super::ConfigErrors {
        file: file.display().to_string(),
        errors,
    })?;
    Ok(Info {
        name: s.raw.name,
        vendor: s.raw.vendor,
        model: s.raw.model,
        document: s.raw.document,
        notes: s.raw.notes,
        points: s.raw.points.len(),
    })
}

/// Validates profile `name` as a device of its own on a Modbus TCP bus would use it, and
/// returns that device: every point expanded, with the profile's defaults.
pub fn expand(library: &Library, name: &str) -> Result<crate::model::Device, super::ConfigErrors> {
    if !valid_name(name) {
        return Err(super::ConfigErrors {
            file: "(profiles)".into(),
            errors: vec![ConfigError {
                path: String::new(),
                line: None,
                column: None,
                message: format!("`{name}` is not a profile name"),
                hint: Some("profile names are lowercase letters, digits, `-` and `_`".into()),
                file: None,
            }],
        });
    }
    let text = format!(
        "gateway: {{id: profiles}}\nmqtt: {{host: localhost}}\nbuses:\n  - {{name: bus, type: tcp, host: 127.0.0.1, port: 502}}\ndevices:\n  - {{name: {name}, bus: bus, profile: {name}}}\n"
    );
    let loaded = super::parse_with_library(&text, "(a device with only `profile`)", library)?;
    Ok(loaded
        .config
        .devices
        .into_iter()
        .next()
        .expect("one device"))
}

/// Profile sources by name for one validation; `None` for one that failed.
pub(super) type Cache = HashMap<String, Option<Rc<Source>>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DataType, Device, WordOrder};
    use std::time::Duration;

    #[test]
    fn a_release_build_run_from_its_checkout_finds_the_checkouts_profiles() {
        let dir = tempfile::tempdir().unwrap();
        let installed = dir.path().join("usr-share");
        let checkout = dir.path().join("repo-profiles");
        std::fs::create_dir(&checkout).unwrap();
        // Not installed, built from a checkout that is still there: the checkout's.
        assert_eq!(shipped_dir_among(&installed, &checkout, false), checkout);
        // Installed: the installed ones, whatever else exists.
        std::fs::create_dir(&installed).unwrap();
        assert_eq!(shipped_dir_among(&installed, &checkout, false), installed);
        // Debug builds: the checkout's always.
        assert_eq!(shipped_dir_among(&installed, &checkout, true), checkout);
        // Neither (a cross-built binary on a bare device): the installed path, for the hint.
        let gone = dir.path().join("gone");
        assert_eq!(shipped_dir_among(&gone, &gone.join("x"), false), gone);
    }

    const METER: &str = "\
name: meter
vendor: Acme
model: M1
document: Acme M1 register map, rev. 3
device:
  interval: 5s
  timeout: 300ms
  unit: 7
  order: CDAB
points:
  - { name: voltage, register: input, address: 0, type: f32, unit: V }
  - { name: current, register: input, address: 2, type: f32, unit: A }
  - { name: energy, register: input, address: 4, type: u32, scale: 0.1, unit: kWh }
";

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write profile");
        }
        dir
    }

    fn config(device: &str) -> String {
        format!(
            "gateway: {{ id: gw }}\nmqtt: {{ host: localhost }}\nbuses:\n  - {{ name: b, type: tcp, host: 127.0.0.1, port: 502 }}\ndevices:\n  - name: m\n    bus: b\n{device}"
        )
    }

    fn library(user: &Path, shipped: &Path) -> Library {
        Library {
            dirs: vec![
                (user.to_path_buf(), Origin::User),
                (shipped.to_path_buf(), Origin::Shipped),
            ],
        }
    }

    fn device(text: &str, lib: &Library) -> Device {
        match super::super::parse_with_library(text, "fieldbridge.yaml", lib) {
            Ok(l) => l.config.devices.into_iter().next().expect("a device"),
            Err(e) => panic!("{e}"),
        }
    }

    fn names(d: &Device) -> Vec<&str> {
        d.points.iter().map(|p| p.name.as_str()).collect()
    }

    #[test]
    fn a_profile_brings_its_points_and_defaults() {
        let shipped = dir_with(&[("meter.yaml", METER)]);
        let user = tempfile::tempdir().unwrap();
        let d = device(
            &config("    profile: meter\n"),
            &library(user.path(), shipped.path()),
        );
        assert_eq!(names(&d), ["voltage", "current", "energy"]);
        assert_eq!(d.unit, 7);
        assert_eq!(d.timeout, Duration::from_millis(300));
        assert_eq!(d.groups[0].interval, Duration::from_secs(5));
        assert!(d.points.iter().all(|p| p.order == WordOrder::Cdab));
        assert_eq!(d.ha.manufacturer.as_deref(), Some("Acme"));
        let prof = d.profile.as_ref().expect("profile recorded");
        assert_eq!(prof.sources, [PointSource::Profile; 3]);
        assert_eq!(prof.document, "Acme M1 register map, rev. 3");
    }

    #[test]
    fn device_points_override_by_name_add_and_device_keys_win() {
        let shipped = dir_with(&[("meter.yaml", METER)]);
        let user = tempfile::tempdir().unwrap();
        let text = config(
            "    profile: meter\n    unit: 3\n    interval: 1s\n    points:\n      - { name: energy, scale: 0.01 }\n      - { name: current, register: holding, address: 10, type: u16 }\n      - { name: state, register: holding, address: 20, type: u16 }\n",
        );
        let d = device(&text, &library(user.path(), shipped.path()));
        assert_eq!(names(&d), ["voltage", "current", "energy", "state"]);
        assert_eq!(d.unit, 3);
        assert_eq!(d.groups[0].interval, Duration::from_secs(1));
        // Only the given key changed: address, type and unit are the profile's.
        let energy = &d.points[2];
        assert_eq!((energy.address, energy.scale), (4, 0.01));
        assert_eq!(energy.data_type, DataType::U32);
        assert_eq!(energy.unit.as_deref(), Some("kWh"));
        // With an address, the device's point replaces the profile's whole.
        let current = &d.points[1];
        assert_eq!((current.address, current.data_type), (10, DataType::U16));
        assert_eq!(current.unit, None);
        let prof = d.profile.as_ref().unwrap();
        assert_eq!(
            prof.sources,
            [
                PointSource::Profile,
                PointSource::Overridden,
                PointSource::Overridden,
                PointSource::Device
            ]
        );
    }

    #[test]
    fn points_exclude_drops_profile_points_and_refuses_unknown_names() {
        let shipped = dir_with(&[("meter.yaml", METER)]);
        let user = tempfile::tempdir().unwrap();
        let lib = library(user.path(), shipped.path());
        let d = device(
            &config("    profile: meter\n    points_exclude: [current]\n"),
            &lib,
        );
        assert_eq!(names(&d), ["voltage", "energy"]);
        assert_eq!(d.profile.as_ref().unwrap().excluded, ["current"]);
        let err = super::super::parse_with_library(
            &config("    profile: meter\n    points_exclude: [curent]\n"),
            "fieldbridge.yaml",
            &lib,
        )
        .unwrap_err();
        assert_eq!(err.errors.len(), 1, "{err}");
        let e = &err.errors[0];
        assert_eq!(e.path, "devices[0].points_exclude[0]");
        assert_eq!(e.line, Some(9));
        assert!(e.hint.as_deref().unwrap().contains("`current`"), "{e}");
    }

    #[test]
    fn the_users_directory_wins_over_the_shipped_one() {
        let shipped = dir_with(&[("meter.yaml", METER)]);
        let mine = METER.replace("model: M1", "model: M1 (mine)").replace(
            "  - { name: energy, register: input, address: 4, type: u32, scale: 0.1, unit: kWh }\n",
            "",
        );
        let user = dir_with(&[("meter.yaml", &mine)]);
        let lib = library(user.path(), shipped.path());
        let d = device(&config("    profile: meter\n"), &lib);
        assert_eq!(names(&d), ["voltage", "current"]);
        assert_eq!(d.ha.model.as_deref(), Some("M1 (mine)"));
        let listed = lib.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].origin, Origin::User);
        assert_eq!(listed[0].shadows, [shipped.path().join("meter.yaml")]);
    }

    #[test]
    fn an_error_in_a_profile_names_the_profile_file_and_line() {
        let bad = METER.replace("address: 2, type: f32", "address: 2, type: f33");
        let shipped = dir_with(&[("meter.yaml", &bad)]);
        let user = tempfile::tempdir().unwrap();
        let text = config("    profile: meter\n");
        // Two devices using it: the profile's error is reported once.
        let text = format!("{text}  - {{ name: m2, bus: b, unit: 2, profile: meter }}\n");
        let err = super::super::parse_with_library(
            &text,
            "fieldbridge.yaml",
            &library(user.path(), shipped.path()),
        )
        .unwrap_err();
        assert_eq!(err.errors.len(), 1, "{err}");
        let e = &err.errors[0];
        let file = shipped.path().join("meter.yaml").display().to_string();
        assert_eq!(e.file.as_deref(), Some(file.as_str()));
        assert_eq!((e.path.as_str(), e.line), ("points[1].type", Some(12)));
        let shown = err.to_string();
        assert!(shown.contains(&format!("{file}:12:")), "{shown}");
    }

    #[test]
    fn an_unknown_profile_suggests_the_nearest_name() {
        let shipped = dir_with(&[("meter.yaml", METER)]);
        let user = tempfile::tempdir().unwrap();
        let err = super::super::parse_with_library(
            &config("    profile: meterr\n"),
            "fieldbridge.yaml",
            &library(user.path(), shipped.path()),
        )
        .unwrap_err();
        assert_eq!(err.errors.len(), 1, "{err}");
        assert_eq!(err.errors[0].path, "devices[0].profile");
        assert!(err.errors[0].hint.as_deref().unwrap().contains("`meter`"));
    }

    #[test]
    fn a_profile_whose_name_is_not_its_file_is_refused() {
        let shipped = dir_with(&[("other.yaml", METER)]);
        let user = tempfile::tempdir().unwrap();
        let err = super::super::parse_with_library(
            &config("    profile: other\n"),
            "fieldbridge.yaml",
            &library(user.path(), shipped.path()),
        )
        .unwrap_err();
        assert_eq!(err.errors[0].path, "name", "{err}");
        assert_eq!(err.errors[0].line, Some(1));
    }

    fn sunspec_errors(text: &str) -> Vec<String> {
        match super::super::parse(text, "fieldbridge.yaml") {
            Ok(_) => Vec::new(),
            Err(e) => e
                .errors
                .iter()
                .map(|e| format!("{}: {}", e.path, e.message))
                .collect(),
        }
    }

    /// Marker at 40000, model 1 at 40002 (L 66) and 103 at 40070 (L 50), end.
    /// `text` validated with `found`, no profile library.
    fn parse_with(
        text: &str,
        found: &super::super::Discoveries,
    ) -> Result<super::super::Loaded, super::super::ConfigErrors> {
        super::super::parse_discovered(
            text,
            "fieldbridge.yaml",
            &Library { dirs: Vec::new() },
            found,
        )
    }

    fn discovered() -> crate::sunspec::Discovered {
        crate::sunspec::example_discovered()
    }

    #[test]
    fn sunspec_auto_needs_no_points_until_discovered_and_refuses_what_cannot_be_discovered() {
        let d = device(
            &config(
                "    sunspec: auto
    points_exclude: [anything]
",
            ),
            &Library { dirs: Vec::new() },
        );
        assert!(d.points.is_empty());
        assert_eq!(d.sunspec, Some(crate::model::SunSpecDevice { found: None }));

        let e = sunspec_errors(&config(
            "    sunspec: yes
",
        ));
        assert_eq!(e, vec!["devices[0].sunspec: `yes` is not a SunSpec mode"]);
        let e = sunspec_errors(&config(
            "    sunspec: auto
    profile: sdm630
",
        ));
        assert!(
            e.iter()
                .any(|e| e.contains("from a profile or from SunSpec discovery, not both")),
            "{e:?}"
        );
        let sparkplug = config(
            "    sunspec: auto
",
        )
        .replace(
            "mqtt: { host: localhost }",
            "mqtt: { host: localhost }\nsparkplug: { group_id: g, edge_node_id: n }",
        );
        let e = sunspec_errors(&sparkplug);
        assert!(
            e.iter()
                .any(|e| e.starts_with("devices[0].sunspec: SunSpec discovery changes")),
            "{e:?}"
        );
        let lines = "gateway: { id: gw }\nmqtt: { host: localhost }\nbuses:\n  - { name: l, type: lines, port: /dev/ttyUSB0 }\ndevices:\n  - { name: m, bus: l, sunspec: auto, mode: stream, parse: { regex: '(?P<v>\\d+)' }, points: [ { name: v, field: v } ] }\n";
        let e = sunspec_errors(lines);
        assert!(e.iter().any(|e| e.contains("SunSpec is Modbus")), "{e:?}");
    }

    #[test]
    fn discovered_points_are_a_profile_the_device_overrides_and_excludes_from() {
        let mut found = super::super::Discoveries::new();
        found.insert(
            ("m".into(), "b".into(), 1),
            std::sync::Arc::new(discovered()),
        );
        let text = config(
            "    sunspec: auto\n    points_exclude: [common_Opt, gone]\n    points:\n      - { name: inverter_three_phase_W, publish: { mode: on_change } }\n      - { name: marker, address: 40000, type: u32 }\n",
        );
        let loaded = parse_with(&text, &found).unwrap_or_else(|e| panic!("{e}"));
        let d = &loaded.config.devices[0];
        let n = names(d);
        assert!(
            n.contains(&"common_Mn")
                && n.contains(&"inverter_three_phase_W")
                && n.contains(&"marker"),
            "{n:?}"
        );
        assert!(!n.contains(&"common_Opt"));
        assert!(!n.iter().any(|n| n.ends_with("_SF")), "{n:?}");
        // An exclusion the models do not have is a warning: the models are the device's.
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
        assert!(loaded.warnings[0].message.contains("no point `gone`"));
        let w = &d.points[n
            .iter()
            .position(|x| *x == "inverter_three_phase_W")
            .unwrap()];
        assert_eq!((w.address, w.data_type), (40070 + 14, DataType::I16));
        assert_eq!(w.unit.as_deref(), Some("W"));
        assert!(
            matches!(w.publish, crate::model::PublishPolicy::OnChange { .. }),
            "{:?}",
            w.publish
        );
        assert_eq!(d.ha.manufacturer.as_deref(), Some("Acme"));
        // A device on another unit is another device: not discovered yet.
        let other = config("    unit: 2\n    sunspec: auto\n    points:\n      - { name: marker, address: 40000, type: u32 }\n");
        let loaded = parse_with(&other, &found).unwrap();
        assert_eq!(names(&loaded.config.devices[0]), vec!["marker"]);
    }

    #[test]
    fn a_change_to_a_point_the_device_lacks_is_a_warning_and_a_change_that_would_decode_or_write_it_is_refused(
    ) {
        let mut found = super::super::Discoveries::new();
        found.insert(
            ("m".into(), "b".into(), 1),
            std::sync::Arc::new(discovered()),
        );
        // A three-phase point changed on a device that turns out to have other models: the
        // discovery still applies (the device is read), the change is a warning.
        let text = config(
            "    sunspec: auto
    points:
      - { name: inverter_single_phase_W, publish: { mode: on_change } }
",
        );
        let loaded = parse_with(&text, &found).unwrap_or_else(|e| panic!("{e}"));
        let n = names(&loaded.config.devices[0]);
        assert!(
            n.contains(&"common_Mn") && !n.contains(&"inverter_single_phase_W"),
            "{n:?}"
        );
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
        assert!(loaded.warnings[0]
            .message
            .contains("no point `inverter_single_phase_W`"));
        // Writable or re-decoded without an address: its scale factor register would not be
        // applied to the write (a setpoint 100 times off), so refused, discovered or not.
        for change in [
            "{ name: inverter_three_phase_W, writable: true }",
            "{ name: inverter_three_phase_W, scale: 0.1 }",
        ] {
            let text = config(&format!(
                "    sunspec: auto
    points:
      - {change}
"
            ));
            for discoveries in [&found, &super::super::Discoveries::new()] {
                let e = parse_with(&text, discoveries)
                    .err()
                    .unwrap_or_else(|| panic!("{change} accepted"));
                assert!(
                    e.errors
                        .iter()
                        .any(|e| e.message.contains("on a discovered SunSpec point")),
                    "{e}"
                );
            }
        }
    }
}
