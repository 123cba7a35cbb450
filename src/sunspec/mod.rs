//! SunSpec discovery: the `SunS` marker, the model chain, and the models' points with their
//! scale factors and "not implemented" values.
//!
//! SunSpec Information Model Specification (v1.1 / IEEE 1547 models): a device puts `SunS`
//! (0x5375 0x6E53) at 40000, 0 or 50000 (holding registers, 0-based), then models one after the
//! other, each `ID`, `L` (the length after those two registers) and `L` registers, until the
//! end marker ID 0xFFFF. The model layouts come from the SunSpec Alliance's own JSON
//! definitions, turned into the table [`models::MODELS`] by `scripts/sunspec-models` (only the
//! models fieldbridge maps: 1, 101-103, 111-113, 120-124, 160, 201-204, 701-715).
//!
//! Bounds (a device's answers are input from the network): at most [`MAX_MODELS`] models and
//! [`MAX_TOTAL`] registers of models are walked; every read stays within 125 registers and the
//! address space; a walk that breaks a bound stops there with a reason, keeping the models
//! found before it.
//!
//! Values: `raw × 10^sf`, the scale factor being a register of the same model, read in the same
//! pass as the value (a model is read whole, in as few reads of at most 125 registers as it
//! takes, one after the other). Sentinels ("not implemented": int16 0x8000, uint16 0xFFFF, acc
//! 0, int32 0x80000000, uint32 0xFFFFFFFF, float NaN, sunssf 0x8000, strings all NUL) and a
//! value whose scale factor is not implemented give no value.
//!
//! Everything here but [`Modbus`] is pure: the walk runs over any [`Registers`] source
//! (the tests use an in-memory register image).
//!
//! `sunspec: auto` on a configured device: the bus task runs [`discover_device`] through its
//! own connection (between the other devices' transactions) and hands the result to the
//! application, which validates the configuration again with the discovered points (a
//! generated profile: the device's own points override them by name, `points_exclude` drops
//! them) and restarts that bus as a reload would. The bus then reads the mapped points in
//! blocks of [`reads_for`], the scale factors among them, and decodes each point with
//! [`decode_raw`]. Discovery runs again at every start of the bus and when the device comes
//! back from offline; found as it was, nothing changes.

pub mod cli;
pub mod models;

use std::fmt::Write as _;
use std::time::Duration;

use crate::modbus::conn::{Connection, RequestError};
use crate::model::RegisterKind;

/// Most models walked on one device.
pub const MAX_MODELS: usize = 64;
/// Most registers of models (sum of `L + 2`) walked on one device.
pub const MAX_TOTAL: u32 = 8192;
/// Registers per read (Modbus application protocol v1.1b3 §6.3: 125 for FC 3).
pub const MAX_READ: u16 = 125;
/// The model chain's end.
pub const END: u16 = 0xFFFF;

/// A point's type as the SunSpec model defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum T {
    I16,
    U16,
    E16,
    B16,
    Sf,
    Acc16,
    I32,
    U32,
    E32,
    B32,
    Acc32,
    F32,
    U64,
    I64,
    Acc64,
    /// ASCII, this many registers.
    Str(u16),
}

impl T {
    pub fn width(self) -> u16 {
        match self {
            T::I16 | T::U16 | T::E16 | T::B16 | T::Sf | T::Acc16 => 1,
            T::I32 | T::U32 | T::E32 | T::B32 | T::Acc32 | T::F32 => 2,
            T::U64 | T::I64 | T::Acc64 => 4,
            T::Str(n) => n,
        }
    }
}

/// Where a point's scale factor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S {
    /// No scale factor.
    N,
    /// A constant exponent.
    K(i8),
    /// The register at this offset from the model's start (its `ID`).
    A(u16),
    /// The register at this offset from the start of the same repeating block.
    R(u16),
}

/// A point of a model: `off` registers from the model's `ID` (or from its repeating block's
/// start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct P {
    pub name: &'static str,
    pub off: u16,
    pub ty: T,
    pub sf: S,
    pub units: &'static str,
}

/// A block repeated to the end of the model (model 160's modules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repeat {
    pub name: &'static str,
    pub len: u16,
    pub points: &'static [P],
}

/// A model's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Model {
    pub id: u16,
    pub name: &'static str,
    /// Registers of the fixed part, `ID` and `L` included.
    pub fixed_len: u16,
    pub points: &'static [P],
    pub repeat: Option<Repeat>,
    /// What of the model is not mapped (7xx curves).
    pub note: &'static str,
}

/// The layout of model `id`, if mapped.
pub fn model(id: u16) -> Option<&'static Model> {
    models::MODELS.iter().find(|m| m.id == id)
}

/// A model found on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub id: u16,
    /// Address of its `ID` register.
    pub start: u16,
    /// Its `L`.
    pub len: u16,
}

/// The outcome of a discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    pub base: u16,
    pub models: Vec<Found>,
    /// Why the walk stopped before the end marker, if it did.
    pub stopped: Option<String>,
}

/// A source of holding registers.
#[allow(async_fn_in_trait)]
pub trait Registers {
    async fn read(&mut self, start: u16, count: u16) -> Result<Vec<u16>, String>;
}

/// Reads through a bus connection.
pub struct Modbus<'a> {
    pub conn: &'a mut Connection,
    pub unit: u8,
    pub timeout: Duration,
}

impl Registers for Modbus<'_> {
    async fn read(&mut self, start: u16, count: u16) -> Result<Vec<u16>, String> {
        match self
            .conn
            .read(self.unit, RegisterKind::Holding, start, count, self.timeout)
            .await
        {
            Ok(crate::modbus::Data::Words(w)) => Ok(w),
            Ok(crate::modbus::Data::Bits(_)) => Err("bits answered".into()),
            Err(e @ RequestError::Exception(_)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Finds the marker (40000, then 0, then 50000) and walks the chain, within the bounds.
/// `Err` when there is no marker.
pub async fn discover(src: &mut impl Registers) -> Result<Discovery, String> {
    let mut base = None;
    let mut errors = Vec::new();
    for b in crate::scan::SUNSPEC_BASES {
        match src.read(b, 2).await {
            Ok(w) if w == crate::scan::SUNS => {
                base = Some(b);
                break;
            }
            Ok(_) => errors.push(format!("{b}: no marker")),
            Err(e) => errors.push(format!("{b}: {e}")),
        }
    }
    let Some(base) = base else {
        return Err(format!("no SunSpec marker ({})", errors.join("; ")));
    };
    let mut d = Discovery {
        base,
        models: Vec::new(),
        stopped: None,
    };
    let mut at = u32::from(base) + 2;
    let mut total = 0u32;
    loop {
        if d.models.len() >= MAX_MODELS {
            d.stopped = Some(format!(
                "more than {MAX_MODELS} models: the chain is not followed further"
            ));
            break;
        }
        if at + 1 > 0xFFFF {
            d.stopped = Some(format!("the chain runs past the address space at {at}"));
            break;
        }
        let header = match src.read(at as u16, 2).await {
            Ok(h) => h,
            Err(e) => {
                d.stopped = Some(format!("model header at {at}: {e}"));
                break;
            }
        };
        let (id, len) = (header[0], header[1]);
        if id == END {
            break;
        }
        let end = at + 2 + u32::from(len);
        total += 2 + u32::from(len);
        if end > 0x1_0000 {
            d.stopped = Some(format!(
                "model {id} at {at} has length {len}: it runs past the address space"
            ));
            break;
        }
        if total > MAX_TOTAL {
            d.stopped = Some(format!(
                "the models add up to more than {MAX_TOTAL} registers: the chain is not followed further"
            ));
            break;
        }
        if let Some(m) = model(id) {
            if u32::from(len) + 2 < u32::from(m.fixed_len) {
                d.stopped = Some(format!(
                    "model {id} at {at} has length {len}, less than its definition's {}",
                    m.fixed_len - 2
                ));
                break;
            }
        }
        d.models.push(Found {
            id,
            start: at as u16,
            len,
        });
        at = end;
    }
    Ok(d)
}

/// A concrete point of a discovered device.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// `common_Mn`, `inverter_three_phase_W`, `mppt_module2_DCW`, `ac_meter_abcn_2_WphA`: the
    /// model's and the repeating group's names as the SunSpec definitions give them, a block
    /// by its index from 1, a model's second occurrence on a device with `_2`.
    pub name: String,
    pub address: u16,
    pub ty: T,
    /// Address of the scale factor register, or a constant exponent.
    pub sf: Option<Sf>,
    pub units: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sf {
    Register(u16),
    Constant(i8),
}

/// The points of the discovered models that fieldbridge maps, and the reads (start, count)
/// that cover every model (at most [`MAX_READ`] registers each, a model's reads following one
/// another so its scale factors come from the same pass).
pub fn points(d: &Discovery) -> (Vec<Point>, Vec<(u16, u16)>) {
    let mut points = Vec::new();
    let mut reads = Vec::new();
    let mut seen: std::collections::BTreeMap<&str, usize> = Default::default();
    for f in &d.models {
        let Some(m) = model(f.id) else { continue };
        let n = seen.entry(m.name).or_default();
        *n += 1;
        let prefix = if *n == 1 {
            m.name.to_string()
        } else {
            format!("{}_{n}", m.name)
        };
        let end = u32::from(f.start) + 2 + u32::from(f.len);
        let mut push = |name: String, base: u16, p: &P, block: Option<u16>| {
            // Scale factors are read with their model and applied, not published.
            if p.ty == T::Sf {
                return;
            }
            let address = u32::from(base) + u32::from(p.off);
            if address + u32::from(p.ty.width()) > end {
                return;
            }
            let sf = match p.sf {
                S::N => None,
                S::K(k) => Some(Sf::Constant(k)),
                S::A(o) => Some(Sf::Register(f.start + o)),
                S::R(o) => block.map(|b| Sf::Register(b + o)),
            };
            points.push(Point {
                name,
                address: address as u16,
                ty: p.ty,
                sf,
                units: p.units,
            });
        };
        for p in m.points {
            push(format!("{prefix}_{}", p.name), f.start, p, None);
        }
        if let Some(r) = &m.repeat {
            let mut at = u32::from(f.start) + u32::from(m.fixed_len);
            let mut k = 1;
            while r.len > 0 && at + u32::from(r.len) <= end {
                for p in r.points {
                    push(
                        format!("{prefix}_{}{k}_{}", r.name, p.name),
                        at as u16,
                        p,
                        Some(at as u16),
                    );
                }
                at += u32::from(r.len);
                k += 1;
            }
        }
        let mut at = u32::from(f.start);
        while at < end {
            let count = (end - at).min(u32::from(MAX_READ));
            reads.push((at as u16, count as u16));
            at += count;
        }
    }
    (points, reads)
}

/// What discovery found on a configured device: the chain, and the common model's
/// manufacturer and model (empty when the device has no model 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    pub discovery: Discovery,
    pub manufacturer: String,
    pub model: String,
}

/// [`discover`], then the common model's `Mn` and `Md`.
pub async fn discover_device(src: &mut impl Registers) -> Result<Discovered, String> {
    let discovery = discover(src).await?;
    let (mut manufacturer, mut model) = (String::new(), String::new());
    if let Some(c) = discovery.models.iter().find(|m| m.id == 1) {
        // Mn at offset 2, Md at 18, 16 registers each.
        if let Ok(w) = src.read(c.start.saturating_add(2), 32).await {
            if w.len() == 32 {
                manufacturer = crate::scan::sunspec_string(&w[..16]);
                model = crate::scan::sunspec_string(&w[16..]);
            }
        }
    }
    Ok(Discovered {
        discovery,
        manufacturer,
        model,
    })
}

/// The reads (start, count) that cover `points` and their scale-factor registers, each at
/// most `max` registers: a value and its scale factor always in one read when `max` reaches
/// across them, other runs joined when at most `max_gap` apart.
pub fn reads_for<'a>(
    points: impl IntoIterator<Item = &'a Point>,
    max_gap: u16,
    max: u16,
) -> Vec<(u16, u16)> {
    let max = u32::from(max.clamp(1, MAX_READ));
    let mut spans: Vec<(u32, u32)> = Vec::new();
    for p in points {
        let a = u32::from(p.address);
        let value = (a, a + u32::from(p.ty.width()));
        match p.sf {
            Some(Sf::Register(r)) => {
                let sf = (u32::from(r), u32::from(r) + 1);
                let both = (value.0.min(sf.0), value.1.max(sf.1));
                // A value and its scale factor in one read whatever the gap (one transaction:
                // a device changing its scale factor cannot pair an old one with a new value),
                // unless they are further apart than a read can reach.
                if both.1 - both.0 <= max {
                    spans.push(both);
                } else {
                    spans.extend([value, sf]);
                }
            }
            _ => spans.push(value),
        }
    }
    spans.sort_unstable();
    let mut reads: Vec<(u32, u32)> = Vec::new();
    for (start, end) in spans {
        match reads.last_mut() {
            Some((s, e)) if start <= *e + u32::from(max_gap) && end.max(*e) - *s <= max => {
                *e = end.max(*e);
            }
            _ => reads.push((start, end)),
        }
    }
    reads
        .into_iter()
        .filter(|(s, e)| *e <= 0x1_0000 && e > s)
        .map(|(s, e)| (s as u16, (e - s) as u16))
        .collect()
}

/// Whether a point's value is scaled (published as a float always, never flipping between
/// an integer and a float with its scale factor).
fn scaled(p: &Point) -> bool {
    !matches!(p.sf, None | Some(Sf::Constant(0)))
}

/// [`decode`] as the bus publishes it: a raw value for the publisher (integers unscaled keep
/// their type), or `not_implemented` for a sentinel, a missing scale factor or a register not
/// read.
pub fn decode_raw(
    p: &Point,
    reg: impl Fn(u16) -> Option<u16>,
) -> Result<crate::codec::Raw, String> {
    use crate::codec::Raw;
    match decode(p, &reg) {
        None => Err("not_implemented".into()),
        Some(Value::Text(t)) => Ok(Raw::Text(t)),
        Some(Value::Number(n)) if scaled(p) || p.ty == T::F32 => Ok(Raw::F64(n)),
        // Unscaled integers exactly as the registers hold them (a u64 past 2^53 too).
        Some(Value::Number(n)) => {
            let w: Option<Vec<u16>> = (0..p.ty.width())
                .map(|i| reg(p.address.wrapping_add(i)))
                .collect();
            match w.map(|w| crate::codec::decode(data_type(p.ty), Default::default(), &w)) {
                Some(Ok(raw)) => Ok(raw),
                _ => Ok(Raw::F64(n)),
            }
        }
    }
}

/// The register type a point is read as (big-endian words, SunSpec's order).
pub fn data_type(t: T) -> crate::model::DataType {
    use crate::model::DataType as D;
    match t {
        T::I16 | T::Sf => D::I16,
        T::U16 | T::E16 | T::B16 | T::Acc16 => D::U16,
        T::I32 => D::I32,
        T::U32 | T::E32 | T::B32 | T::Acc32 => D::U32,
        T::F32 => D::F32,
        T::U64 | T::Acc64 => D::U64,
        T::I64 => D::I64,
        T::Str(n) => D::Ascii(n),
    }
}

/// A decoded SunSpec value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(f64),
    Text(String),
}

/// The scale factor `sunssf` "not implemented" value.
pub const SF_NONE: u16 = 0x8000;

/// Decodes one point from a register lookup (`None` for a register not read): `None` for a
/// "not implemented" value or scale factor.
pub fn decode(p: &Point, reg: impl Fn(u16) -> Option<u16>) -> Option<Value> {
    let w: Vec<u16> = (0..p.ty.width())
        .map(|i| reg(p.address.wrapping_add(i)))
        .collect::<Option<Vec<_>>>()?;
    let u32v = || (u32::from(w[0]) << 16) | u32::from(w[1]);
    let u64v = || w.iter().fold(0u64, |a, &r| (a << 16) | u64::from(r));
    let raw: f64 = match p.ty {
        T::Str(_) => {
            if w.iter().all(|&r| r == 0) {
                return None;
            }
            return Some(Value::Text(crate::scan::sunspec_string(&w)));
        }
        T::I16 | T::Sf if w[0] == 0x8000 => return None,
        T::I16 | T::Sf => f64::from(w[0] as i16),
        T::U16 | T::E16 | T::B16 if w[0] == 0xFFFF => return None,
        T::Acc16 if w[0] == 0 => return None,
        T::U16 | T::E16 | T::B16 | T::Acc16 => f64::from(w[0]),
        T::I32 if u32v() == 0x8000_0000 => return None,
        T::I32 => f64::from(u32v() as i32),
        T::U32 | T::E32 | T::B32 if u32v() == 0xFFFF_FFFF => return None,
        T::Acc32 if u32v() == 0 => return None,
        T::U32 | T::E32 | T::B32 | T::Acc32 => f64::from(u32v()),
        T::F32 => {
            let f = f32::from_bits(u32v());
            if f.is_nan() {
                return None;
            }
            f64::from(f)
        }
        T::U64 if u64v() == u64::MAX => return None,
        T::I64 if u64v() == 0x8000_0000_0000_0000 => return None,
        T::Acc64 if u64v() == 0 => return None,
        T::U64 | T::Acc64 => u64v() as f64,
        T::I64 => (u64v() as i64) as f64,
    };
    let exp = match p.sf {
        None => 0,
        Some(Sf::Constant(k)) => i32::from(k),
        Some(Sf::Register(a)) => match reg(a)? {
            SF_NONE => return None,
            r => i32::from(r as i16),
        },
    };
    // SunSpec scale factors are -10..=10; anything else is a broken device, not a value.
    if !(-10..=10).contains(&exp) {
        return None;
    }
    // Dividing by 10^-sf rounds as a decimal reading should (1353 / 100 = 13.53, where
    // 1353 × 0.01 = 13.530000000000001).
    Some(Value::Number(if exp < 0 {
        raw / 10f64.powi(-exp)
    } else {
        raw * 10f64.powi(exp)
    }))
}

/// Reads every model of `d` (the reads of [`points`]) and decodes every point.
pub async fn read_all(
    src: &mut impl Registers,
    d: &Discovery,
) -> Result<Vec<(Point, Option<Value>)>, String> {
    let (points, reads) = points(d);
    let mut image = std::collections::HashMap::new();
    for (start, count) in reads {
        let w = src
            .read(start, count)
            .await
            .map_err(|e| format!("read {start}+{count}: {e}"))?;
        for (i, r) in w.into_iter().enumerate() {
            image.insert(start.wrapping_add(i as u16), r);
        }
    }
    Ok(points
        .into_iter()
        .map(|p| {
            let v = decode(&p, |a| image.get(&a).copied());
            (p, v)
        })
        .collect())
}

/// The chain as one line: `1 common (L 66), 103 inverter (L 50), 160 mppt (L 48), 64001 (not
/// mapped, L 10)`.
pub fn chain_line(d: &Discovery) -> String {
    let mut s = String::new();
    for (i, f) in d.models.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        match model(f.id) {
            Some(m) => {
                let _ = write!(s, "{} {} (L {})", f.id, m.name, f.len);
            }
            None => {
                let _ = write!(s, "{} (not mapped, L {})", f.id, f.len);
            }
        }
    }
    s
}

/// Models 1 and 103 at base 40000, manufacturer `Acme`: a discovery for tests.
#[cfg(test)]
pub(crate) fn example_discovered() -> Discovered {
    Discovered {
        discovery: Discovery {
            base: 40000,
            models: vec![
                Found {
                    id: 1,
                    start: 40002,
                    len: 66,
                },
                Found {
                    id: 103,
                    start: 40070,
                    len: 50,
                },
            ],
            stopped: None,
        },
        manufacturer: "Acme".into(),
        model: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// An in-memory device: registers, and how many reads it served.
    struct Image {
        regs: HashMap<u16, u16>,
        reads: usize,
    }

    impl Image {
        fn new() -> Image {
            Image {
                regs: HashMap::new(),
                reads: 0,
            }
        }
        fn put(&mut self, at: u16, w: &[u16]) {
            for (i, r) in w.iter().enumerate() {
                self.regs.insert(at + i as u16, *r);
            }
        }
    }

    impl Registers for Image {
        async fn read(&mut self, start: u16, count: u16) -> Result<Vec<u16>, String> {
            self.reads += 1;
            assert!(count <= MAX_READ, "read of {count} registers");
            assert!(u32::from(start) + u32::from(count) <= 0x1_0000);
            Ok((0..count)
                .map(|i| self.regs.get(&(start + i)).copied().unwrap_or(0))
                .collect())
        }
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// Marker at `base`, model 1 (L 66), model 103 (L 50), model 160 with two modules, end.
    fn device(base: u16) -> Image {
        let mut img = Image::new();
        img.put(base, &crate::scan::SUNS);
        let mut at = base + 2;
        for (id, len) in [(1u16, 66u16), (103, 50), (160, 8 + 2 * 20)] {
            img.put(at, &[id, len]);
            at += 2 + len;
        }
        img.put(at, &[END, 0]);
        img
    }

    #[test]
    fn the_chain_is_found_at_every_base() {
        for base in [40000, 0, 50000] {
            let d = run(discover(&mut device(base))).unwrap();
            assert_eq!(d.base, base);
            let ids: Vec<u16> = d.models.iter().map(|m| m.id).collect();
            assert_eq!(ids, vec![1, 103, 160]);
            assert_eq!(d.stopped, None);
        }
    }

    #[test]
    fn a_chain_that_never_ends_is_bounded() {
        let mut img = Image::new();
        img.put(40000, &crate::scan::SUNS);
        // Unknown models of length 0 forever (every header reads as id 64999, L 0).
        for a in (40002..=0xFFFEu32).step_by(2) {
            img.put(a as u16, &[64999, 0]);
        }
        let d = run(discover(&mut img)).unwrap();
        assert_eq!(d.models.len(), MAX_MODELS);
        assert!(d.stopped.unwrap().contains("more than"));
        assert!(img.reads < MAX_MODELS + 5);
    }

    #[test]
    fn a_length_past_the_address_space_or_short_of_the_definition_stops_the_walk() {
        let mut img = Image::new();
        img.put(50000, &crate::scan::SUNS);
        img.put(50002, &[1, 66, 0]);
        img.put(50070, &[64001, 20000]);
        let d = run(discover(&mut img)).unwrap();
        assert_eq!(d.models.len(), 1);
        assert!(d.stopped.unwrap().contains("past the address space"));

        let mut img = Image::new();
        img.put(0, &crate::scan::SUNS);
        img.put(2, &[103, 10]);
        let d = run(discover(&mut img)).unwrap();
        assert!(d.models.is_empty());
        assert!(d.stopped.unwrap().contains("less than its definition"));
    }

    #[test]
    fn no_marker_is_an_error() {
        assert!(run(discover(&mut Image::new())).is_err());
    }

    #[test]
    fn mppt_modules_are_named_by_index_and_reads_stay_within_limits() {
        let d = run(discover(&mut device(40000))).unwrap();
        let (points, reads) = points(&d);
        let names: Vec<&str> = points.iter().map(|p| p.name.as_str()).collect();
        assert!(names.contains(&"common_Mn"));
        assert!(names.contains(&"inverter_three_phase_W"));
        assert!(!names.contains(&"inverter_three_phase_W_SF"));
        assert!(names.contains(&"mppt_module1_DCW"));
        assert!(names.contains(&"mppt_module2_DCW"));
        assert!(!names.contains(&"mppt_module3_DCW"));
        assert!(reads.iter().all(|(_, c)| *c <= MAX_READ));
        // The module's DCW is scaled by the fixed part's DCW_SF (offset 4 of model 160).
        let dcw2 = points
            .iter()
            .find(|p| p.name == "mppt_module2_DCW")
            .unwrap();
        let m160 = d.models.iter().find(|m| m.id == 160).unwrap();
        assert_eq!(dcw2.sf, Some(Sf::Register(m160.start + 4)));
        assert_eq!(dcw2.address, m160.start + 10 + 20 + 11);
    }

    fn point(ty: T, sf: Option<Sf>) -> Point {
        Point {
            name: "x".into(),
            address: 10,
            ty,
            sf,
            units: "",
        }
    }

    #[test]
    fn scale_factors_apply_and_sentinels_give_no_value() {
        let regs: HashMap<u16, u16> =
            [(10, 1234), (11, 0), (20, (-2i16) as u16), (21, 0x8000)].into();
        let get = |a| regs.get(&a).copied();
        assert_eq!(
            decode(&point(T::U16, Some(Sf::Register(20))), get),
            Some(Value::Number(12.34))
        );
        assert_eq!(decode(&point(T::U16, Some(Sf::Register(21))), get), None);
        let sentinel = |ty: T, w: &[u16]| {
            let regs: HashMap<u16, u16> = w
                .iter()
                .enumerate()
                .map(|(i, r)| (10 + i as u16, *r))
                .collect();
            decode(&point(ty, None), |a| regs.get(&a).copied())
        };
        assert_eq!(sentinel(T::I16, &[0x8000]), None);
        assert_eq!(sentinel(T::U16, &[0xFFFF]), None);
        assert_eq!(sentinel(T::Acc32, &[0, 0]), None);
        assert_eq!(sentinel(T::I32, &[0x8000, 0]), None);
        assert_eq!(sentinel(T::U32, &[0xFFFF, 0xFFFF]), None);
        assert_eq!(sentinel(T::Sf, &[0x8000]), None);
        assert_eq!(sentinel(T::Str(2), &[0, 0]), None);
        assert_eq!(sentinel(T::F32, &[0x7FC0, 0]), None);
        assert_eq!(sentinel(T::I16, &[0xFFFE]), Some(Value::Number(-2.0)));
        assert_eq!(sentinel(T::Acc32, &[1, 2]), Some(Value::Number(65538.0)));
        assert_eq!(
            sentinel(T::Str(2), &[0x4142, 0x4300]),
            Some(Value::Text("ABC".into()))
        );
    }

    #[test]
    fn reads_cover_points_and_scale_factors_joined_within_the_gap_and_the_limit() {
        let at = |address: u16, ty: T, sf: Option<Sf>| Point {
            name: "x".into(),
            address,
            ty,
            sf,
            units: "",
        };
        let pts = [
            at(10, T::U16, Some(Sf::Register(20))),
            at(200, T::U32, None),
            at(12, T::Str(4), Some(Sf::Constant(0))),
        ];
        assert_eq!(reads_for(&pts, 10, 125), vec![(10, 11), (200, 2)]);
        // The scale factor 10 registers on, with a gap of 3 allowed: still the value's read,
        // so both come from one transaction.
        assert_eq!(reads_for(&pts, 3, 125), vec![(10, 11), (200, 2)]);
        // No read longer than the limit (then the scale factor has its own).
        assert_eq!(reads_for(&pts, 200, 8), vec![(10, 6), (20, 1), (200, 2)]);
    }

    #[test]
    fn raw_values_keep_unscaled_integers_exact_and_scaled_ones_float() {
        use crate::codec::Raw;
        let regs: HashMap<u16, u16> = [
            (10, 0xFFFF),
            (11, 0xFFFF),
            (12, 0xFFFF),
            (13, 0xFFFE),
            (20, 1234),
            (21, (-1i16) as u16),
            (22, 0),
        ]
        .into();
        let get = |a| regs.get(&a).copied();
        let p = |address, ty, sf| Point {
            name: "x".into(),
            address,
            ty,
            sf,
            units: "",
        };
        // u64::MAX - 1, past f64's 2^53.
        assert_eq!(
            decode_raw(&p(10, T::U64, None), get),
            Ok(Raw::U64(u64::MAX - 1))
        );
        assert_eq!(decode_raw(&p(20, T::U16, None), get), Ok(Raw::U64(1234)));
        assert_eq!(decode_raw(&p(21, T::I16, None), get), Ok(Raw::I64(-1)));
        assert_eq!(
            decode_raw(&p(20, T::U16, Some(Sf::Register(21))), get),
            Ok(Raw::F64(123.4))
        );
        // A scaled point is a float even when its scale factor is 0 this time.
        assert_eq!(
            decode_raw(&p(20, T::U16, Some(Sf::Register(22))), get),
            Ok(Raw::F64(1234.0))
        );
        assert_eq!(
            decode_raw(&p(10, T::U16, None), get),
            Err("not_implemented".into())
        );
    }

    #[test]
    fn the_table_holds_every_model_named_in_the_issue() {
        for id in [
            1, 101, 102, 103, 111, 112, 113, 120, 121, 122, 123, 124, 160, 201, 202, 203, 204,
        ] {
            let m = model(id).unwrap_or_else(|| panic!("model {id}"));
            assert!(!m.points.is_empty());
            for p in m.points {
                if let S::A(o) = p.sf {
                    assert!(o < m.fixed_len, "model {id} {}", p.name);
                }
            }
        }
    }
}
