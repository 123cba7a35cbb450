//! Registers ↔ typed values, both directions (pure).
//!
//! Two stages, each with an inverse:
//! - [`decode`] / [`encode`]: wire registers ↔ [`Raw`] (the device's number, before scaling);
//! - [`to_value`] / [`from_value`]: [`Raw`] ↔ [`Value`] in engineering units
//!   (`value = raw * scale + offset`).
//!
//! # Byte and word order
//! [`WordOrder`] is two independent swaps applied to the registers as they travel on the wire:
//! `word_swap()` reverses the order of the registers, `byte_swap()` swaps the two bytes inside
//! each register. Undoing both gives the big-endian bytes of the value. For 16-bit types only the
//! byte swap matters. Exceptions, chosen so that read-modify-write stays simple and text reads
//! the way devices write it:
//! - `Bit(n)` ignores the order: `n` numbers the bits of the register as transmitted
//!   (0 = least significant), so [`set_bit`] can work on the register read back from the device.
//! - `Ascii(n)` honours only the byte swap: characters are never reordered across registers.
//!
//! # Text
//! ASCII text is two characters per register, high byte first (`byte_swap()` puts the low byte
//! first). Trailing NULs and spaces are trimmed on decode; bytes above 0x7F are replaced with
//! U+FFFD (a garbled name is still worth publishing, and the replacement makes the damage
//! visible) rather than failing the whole read. Encoding pads with NULs and refuses anything that
//! is not ASCII or does not fit.
//!
//! # Floats
//! `F32` readings are widened through their shortest decimal form, so `230.1f32` publishes as
//! `230.1`, not `230.10000610351562`. Scaled readings are rounded to 15 significant digits (the
//! precision an `f64` always round-trips) to hide multiplication artefacts: `2301 × 0.1` is
//! `230.1`, not `230.10000000000002`.

use crate::model::{DataType, Point, Value, WordOrder};

/// A reading as the device encodes it, before scale and offset.
#[derive(Debug, Clone, PartialEq)]
pub enum Raw {
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Text(String),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    #[error("expected {expected} registers, got {got}")]
    WrongLength { expected: usize, got: usize },
    #[error("{value} is out of range for {data_type}")]
    OutOfRange {
        value: String,
        data_type: &'static str,
    },
    #[error("the value is not a number (NaN or infinite)")]
    NotANumber,
    #[error("type mismatch: {0}")]
    TypeMismatch(String),
    #[error(
        "a single bit cannot be written on its own: read the register, set the bit with \
         set_bit, write the register back"
    )]
    NeedsReadModifyWrite,
    #[error("{0:?} is not ASCII text")]
    NotAscii(String),
    #[error("{0:?} is not a label of this point")]
    UnknownLabel(String),
    #[error("{value} is outside the point's write bounds [{min}, {max}]")]
    OutOfBounds { value: f64, min: f64, max: f64 },
    #[error(
        "{value} is not a whole step of the point: raw = (value - offset) / scale = \
         ({value} - {offset}) / {scale} = {raw}, which is no integer"
    )]
    NotRepresentable {
        value: f64,
        raw: f64,
        scale: f64,
        offset: f64,
    },
}

/// Short lowercase name of a data type, as used in configuration and errors.
pub fn type_name(data_type: DataType) -> &'static str {
    match data_type {
        DataType::Bool => "bool",
        DataType::Bit(_) => "bit",
        DataType::U16 => "u16",
        DataType::I16 => "i16",
        DataType::U32 => "u32",
        DataType::I32 => "i32",
        DataType::U64 => "u64",
        DataType::I64 => "i64",
        DataType::F32 => "f32",
        DataType::F64 => "f64",
        DataType::Ascii(_) => "ascii",
    }
}

/// Big-endian bytes of the numeric value carried by `regs` (wire order, at most 4
/// registers), in the first `2 * regs.len()` bytes. No allocation: it runs for every point of
/// every poll.
fn numeric_bytes(word_swap: bool, byte_swap: bool, regs: &[u16]) -> [u8; 8] {
    debug_assert!(regs.len() <= 4, "{} registers", regs.len());
    let n = regs.len().min(4);
    let mut b = [0u8; 8];
    for i in 0..n {
        let w = if word_swap { regs[n - 1 - i] } else { regs[i] };
        let w = if byte_swap { w.swap_bytes() } else { w };
        b[2 * i..2 * i + 2].copy_from_slice(&w.to_be_bytes());
    }
    b
}

/// Inverse of [`numeric_bytes`] (for any even count): big-endian bytes → wire registers.
fn wire_registers(word_swap: bool, byte_swap: bool, bytes: &[u8]) -> Vec<u16> {
    let mut regs: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| {
            let w = u16::from_be_bytes([c[0], c[1]]);
            if byte_swap {
                w.swap_bytes()
            } else {
                w
            }
        })
        .collect();
    if word_swap {
        regs.reverse();
    }
    regs
}

fn bit_mask(bit: u8) -> Option<u16> {
    1u16.checked_shl(u32::from(bit))
}

/// Decodes `regs` (exactly `data_type.width()` registers, in wire order) into a [`Raw`].
///
/// `Bool` is a coil or discrete input, not a register type: use [`decode_bits`].
pub fn decode(data_type: DataType, order: WordOrder, regs: &[u16]) -> Result<Raw, CodecError> {
    if data_type == DataType::Bool {
        return Err(CodecError::TypeMismatch(
            "bool points are coils or discrete inputs, not registers".into(),
        ));
    }
    let expected = usize::from(data_type.width());
    if regs.len() != expected {
        return Err(CodecError::WrongLength {
            expected,
            got: regs.len(),
        });
    }
    let b = numeric_bytes(
        order.word_swap(),
        order.byte_swap(),
        &regs[..expected.min(4)],
    );
    let raw = match data_type {
        DataType::Bool => unreachable!("handled above"),
        DataType::Bit(n) => {
            let mask = bit_mask(n)
                .ok_or_else(|| CodecError::TypeMismatch(format!("bit {n} of a 16-bit register")))?;
            Raw::Bool(regs[0] & mask != 0)
        }
        DataType::U16 => Raw::U64(u16::from_be_bytes([b[0], b[1]]).into()),
        DataType::I16 => Raw::I64(i16::from_be_bytes([b[0], b[1]]).into()),
        DataType::U32 => Raw::U64(u32::from_be_bytes(b[..4].try_into().expect("4 bytes")).into()),
        DataType::I32 => Raw::I64(i32::from_be_bytes(b[..4].try_into().expect("4 bytes")).into()),
        DataType::U64 => Raw::U64(u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))),
        DataType::I64 => Raw::I64(i64::from_be_bytes(b[..8].try_into().expect("8 bytes"))),
        DataType::F32 => Raw::F64(f32::from_be_bytes(b[..4].try_into().expect("4 bytes")).into()),
        DataType::F64 => Raw::F64(f64::from_be_bytes(b[..8].try_into().expect("8 bytes"))),
        DataType::Ascii(_) => Raw::Text(decode_ascii(order.byte_swap(), regs)),
    };
    Ok(raw)
}

fn decode_ascii(byte_swap: bool, regs: &[u16]) -> String {
    let bytes: Vec<u8> = regs
        .iter()
        .flat_map(|&w| if byte_swap { w.swap_bytes() } else { w }.to_be_bytes())
        .collect();
    let end = bytes
        .iter()
        .rposition(|&c| c != 0 && c != b' ')
        .map_or(0, |i| i + 1);
    bytes[..end]
        .iter()
        .map(|&c| {
            if c.is_ascii() {
                char::from(c)
            } else {
                '\u{FFFD}'
            }
        })
        .collect()
}

/// A `Bool` point (coil or discrete input) from the bits read for it: `bits[0]`.
///
/// An empty slice decodes as `false`; the planner never hands one out.
pub fn decode_bits(bits: &[bool]) -> Raw {
    debug_assert!(!bits.is_empty(), "decode_bits needs one bit");
    Raw::Bool(bits.first().copied().unwrap_or(false))
}

fn out_of_range(value: impl ToString, data_type: DataType) -> CodecError {
    CodecError::OutOfRange {
        value: value.to_string(),
        data_type: type_name(data_type),
    }
}

/// The raw integer as an `i128`, which holds every `u64` and `i64` exactly.
fn raw_integer(data_type: DataType, raw: &Raw) -> Result<i128, CodecError> {
    match *raw {
        Raw::U64(u) => Ok(i128::from(u)),
        Raw::I64(i) => Ok(i128::from(i)),
        _ => Err(CodecError::TypeMismatch(format!(
            "{} needs an integer, got {raw:?}",
            type_name(data_type)
        ))),
    }
}

fn fit<T: TryFrom<i128>>(data_type: DataType, v: i128) -> Result<T, CodecError> {
    T::try_from(v).map_err(|_| out_of_range(v, data_type))
}

fn raw_float(data_type: DataType, raw: &Raw) -> Result<f64, CodecError> {
    match *raw {
        Raw::F64(f) => Ok(f),
        _ => Err(CodecError::TypeMismatch(format!(
            "{} needs a float, got {raw:?}",
            type_name(data_type)
        ))),
    }
}

/// Encodes `raw` into wire registers; the inverse of [`decode`].
///
/// Range-checked, never wrapped: 70000 into `U16` or 1e39 into `F32` is
/// [`CodecError::OutOfRange`]. NaN and infinities are encoded as such (refusing them is
/// [`from_value`]'s job), so that `encode(decode(x)) == x` for every register pattern.
/// `Bit(n)` needs the rest of its register: [`CodecError::NeedsReadModifyWrite`], see [`set_bit`].
pub fn encode(data_type: DataType, order: WordOrder, raw: &Raw) -> Result<Vec<u16>, CodecError> {
    let (ws, bs) = (order.word_swap(), order.byte_swap());
    let bytes: Vec<u8> = match data_type {
        DataType::Bool => {
            return Err(CodecError::TypeMismatch(
                "bool points are coils, not registers".into(),
            ))
        }
        DataType::Bit(_) => return Err(CodecError::NeedsReadModifyWrite),
        DataType::U16 => fit::<u16>(data_type, raw_integer(data_type, raw)?)?
            .to_be_bytes()
            .to_vec(),
        DataType::I16 => fit::<i16>(data_type, raw_integer(data_type, raw)?)?
            .to_be_bytes()
            .to_vec(),
        DataType::U32 => fit::<u32>(data_type, raw_integer(data_type, raw)?)?
            .to_be_bytes()
            .to_vec(),
        DataType::I32 => fit::<i32>(data_type, raw_integer(data_type, raw)?)?
            .to_be_bytes()
            .to_vec(),
        DataType::U64 => fit::<u64>(data_type, raw_integer(data_type, raw)?)?
            .to_be_bytes()
            .to_vec(),
        DataType::I64 => fit::<i64>(data_type, raw_integer(data_type, raw)?)?
            .to_be_bytes()
            .to_vec(),
        DataType::F32 => {
            let f = raw_float(data_type, raw)?;
            #[allow(clippy::cast_possible_truncation)] // rounding to f32 is the point
            let narrow = f as f32;
            if f.is_finite() && narrow.is_infinite() {
                return Err(out_of_range(f, data_type));
            }
            narrow.to_be_bytes().to_vec()
        }
        DataType::F64 => raw_float(data_type, raw)?.to_be_bytes().to_vec(),
        DataType::Ascii(n) => {
            let Raw::Text(text) = raw else {
                return Err(CodecError::TypeMismatch(format!(
                    "ascii needs text, got {raw:?}"
                )));
            };
            if !text.is_ascii() {
                return Err(CodecError::NotAscii(text.clone()));
            }
            let capacity = 2 * usize::from(n);
            if text.len() > capacity {
                return Err(CodecError::OutOfRange {
                    value: format!("{text:?} ({} bytes, room for {capacity})", text.len()),
                    data_type: "ascii",
                });
            }
            let mut bytes = text.as_bytes().to_vec();
            bytes.resize(capacity, 0);
            return Ok(wire_registers(false, bs, &bytes));
        }
    };
    Ok(wire_registers(ws, bs, &bytes))
}

/// `reg` with bit `bit` (0 = least significant) set or cleared; bits above 15 leave it unchanged.
pub fn set_bit(reg: u16, bit: u8, on: bool) -> u16 {
    let mask = bit_mask(bit).unwrap_or(0);
    if on {
        reg | mask
    } else {
        reg & !mask
    }
}

/// The `f64` with the shortest decimal form of `f`: `230.1f32` → `230.1`.
fn widen_f32(f: f64) -> f64 {
    #[allow(clippy::cast_possible_truncation)] // `f` came from an f32: exact
    let narrow = f as f32;
    if !narrow.is_finite() {
        return f;
    }
    narrow.to_string().parse().unwrap_or(f)
}

/// Rounds to 15 significant digits, the precision every `f64` round-trips through decimal.
fn round15(f: f64) -> f64 {
    if !f.is_finite() {
        return f;
    }
    format!("{f:.14e}").parse().unwrap_or(f)
}

fn is_identity(point: &Point) -> bool {
    #[allow(clippy::float_cmp)] // exactly the configured defaults
    let identity = point.scale == 1.0 && point.offset == 0.0;
    identity
}

/// Applies scale and offset: `value = raw * scale + offset`.
///
/// Without scaling (scale 1, offset 0) integers keep their signedness (`U16`/`U32`/`U64` →
/// [`Value::UInt`], `I16`/`I32`/`I64` → [`Value::Int`]); any scaling gives a [`Value::Float`]
/// rounded to 15 significant digits. Bools and text are never scaled.
pub fn to_value(point: &Point, raw: &Raw) -> Value {
    let identity = is_identity(point);
    #[allow(clippy::cast_precision_loss)] // scaled readings are floats by definition
    let number = match *raw {
        Raw::Bool(b) => return Value::Bool(b),
        Raw::Text(ref t) => return Value::Text(t.clone()),
        Raw::U64(u) if identity => return Value::UInt(u),
        Raw::I64(i) if identity => return Value::Int(i),
        Raw::U64(u) => u as f64,
        Raw::I64(i) => i as f64,
        Raw::F64(f) if point.data_type == DataType::F32 => widen_f32(f),
        Raw::F64(f) => f,
    };
    if identity {
        Value::Float(number)
    } else {
        Value::Float(round15(number * point.scale + point.offset))
    }
}

fn label_key(raw: &Raw) -> Option<i64> {
    match *raw {
        Raw::Bool(b) => Some(i64::from(b)),
        Raw::I64(i) => Some(i),
        Raw::U64(u) => i64::try_from(u).ok(),
        Raw::F64(_) | Raw::Text(_) => None,
    }
}

/// The enum label of an integer or bool (0/1) raw value, if the point defines one.
pub fn label<'p>(point: &'p Point, raw: &Raw) -> Option<&'p str> {
    point.labels.get(&label_key(raw)?).map(String::as_str)
}

/// Integer range of a data type, for write checks.
fn integer_range(data_type: DataType) -> Option<(i128, i128)> {
    Some(match data_type {
        DataType::U16 => (0, u16::MAX.into()),
        DataType::I16 => (i16::MIN.into(), i16::MAX.into()),
        DataType::U32 => (0, u32::MAX.into()),
        DataType::I32 => (i32::MIN.into(), i32::MAX.into()),
        DataType::U64 => (0, u64::MAX.into()),
        DataType::I64 => (i64::MIN.into(), i64::MAX.into()),
        _ => return None,
    })
}

fn is_unsigned(data_type: DataType) -> bool {
    matches!(data_type, DataType::U16 | DataType::U32 | DataType::U64)
}

fn integer_raw(data_type: DataType, v: i128) -> Result<Raw, CodecError> {
    let (lo, hi) = integer_range(data_type).expect("integer type");
    if v < lo || v > hi {
        return Err(out_of_range(v, data_type));
    }
    Ok(if is_unsigned(data_type) {
        Raw::U64(u64::try_from(v).expect("checked range"))
    } else {
        Raw::I64(i64::try_from(v).expect("checked range"))
    })
}

/// Converts a command value into the raw value to write; the inverse of [`to_value`].
///
/// - Numbers (for numeric types): `raw = (value - offset) / scale`, rounded to the nearest
///   integer for integer types and range-checked, never wrapped. NaN and infinities are refused.
///   Without scaling, integers are converted exactly (no detour through `f64`).
///   The point's `min`/`max` bounds (engineering units) are checked first.
/// - Text: for `Ascii` points the text itself; for any other point it must be one of the
///   point's labels and gives that label's raw value.
/// - Bool: for `Bool` and `Bit` points only.
pub fn from_value(point: &Point, value: &Value) -> Result<Raw, CodecError> {
    let dt = point.data_type;
    let mismatch =
        || CodecError::TypeMismatch(format!("a {} point cannot take {value:?}", type_name(dt)));
    match (dt, value) {
        (DataType::Ascii(_), Value::Text(t)) => {
            // Printable only: a NUL would end the string early for the device, a line break
            // or tab mean nothing in a register. Reported as a reading would show it (trailing
            // spaces are trimmed on reading), so the result is what the register holds.
            if t.chars().any(|c| c.is_ascii_control()) {
                return Err(CodecError::NotAscii(t.clone()));
            }
            let regs = encode(dt, point.order, &Raw::Text(t.clone()))?;
            return decode(dt, point.order, &regs);
        }
        (DataType::Ascii(_), _) => return Err(mismatch()),
        (_, Value::Text(t)) => {
            let raw = label_raw(point, t)?;
            check_bounds(point, &to_value(point, &raw))?;
            return Ok(raw);
        }
        (DataType::Bool | DataType::Bit(_), Value::Bool(b)) => return Ok(Raw::Bool(*b)),
        (DataType::Bool | DataType::Bit(_), _) | (_, Value::Bool(_)) => return Err(mismatch()),
        _ => {}
    }
    let eng = value.as_f64().ok_or_else(mismatch)?;
    if !eng.is_finite() {
        return Err(CodecError::NotANumber);
    }
    let raw = numeric_raw(point, value, eng)?;
    // The bounds hold for what goes on the wire, not for what was asked.
    check_bounds(point, &to_value(point, &raw))?;
    Ok(raw)
}

/// The one raw value a number maps to: exact for integers without scaling; otherwise
/// `(value - offset) / scale`, refused unless it is a whole number (within float noise) for
/// integer types, and narrowed to f32 for f32 points (what the register will hold).
fn numeric_raw(point: &Point, value: &Value, eng: f64) -> Result<Raw, CodecError> {
    let dt = point.data_type;
    if is_identity(point) && integer_range(dt).is_some() {
        match *value {
            Value::Int(i) => return integer_raw(dt, i.into()),
            Value::UInt(u) => return integer_raw(dt, u.into()),
            _ => {}
        }
    }
    let raw = (eng - point.offset) / point.scale;
    if !raw.is_finite() {
        return Err(CodecError::NotANumber);
    }
    match dt {
        DataType::F32 => {
            // Let encode() do the f32 overflow check, but report it here with the type.
            encode(dt, WordOrder::Abcd, &Raw::F64(raw))?;
            #[allow(clippy::cast_possible_truncation)] // checked to fit just above
            let narrow = raw as f32;
            Ok(Raw::F64(f64::from(narrow)))
        }
        DataType::F64 => Ok(Raw::F64(raw)),
        _ => {
            let rounded = raw.round();
            // Float noise of `(value - offset) / scale` only (a few ulps of its operands): a
            // tolerance relative to the value itself would pass 3000000000.5 as whole.
            let noise = (8.0 * f64::EPSILON * (eng.abs() + point.offset.abs()) / point.scale.abs())
                .max(1e-9);
            if (raw - rounded).abs() > noise {
                return Err(CodecError::NotRepresentable {
                    value: eng,
                    raw,
                    scale: point.scale,
                    offset: point.offset,
                });
            }
            // 2^64 and -2^63 bound every integer type; beyond them the cast would saturate.
            if !(-9.223_372_036_854_776e18..1.844_674_407_370_955_2e19).contains(&rounded) {
                return Err(out_of_range(raw, dt));
            }
            #[allow(clippy::cast_possible_truncation)] // bounded just above
            integer_raw(dt, rounded as i128).map_err(|_| out_of_range(raw, dt))
        }
    }
}

/// Whether `value` lies within the point's `min`/`max`; integers are compared exactly (an
/// `i64` above 2^53 has no exact `f64`, and rounding it could let it slip past `max`).
fn check_bounds(point: &Point, value: &Value) -> Result<(), CodecError> {
    let min = point.min.unwrap_or(f64::NEG_INFINITY);
    let max = point.max.unwrap_or(f64::INFINITY);
    let int = match *value {
        Value::Int(i) => Some(i128::from(i)),
        Value::UInt(u) => Some(i128::from(u)),
        _ => None,
    };
    #[allow(clippy::cast_precision_loss)] // only to report
    let (inside, shown) = match (int, value) {
        (Some(i), _) => (int_at_least(i, min) && int_at_most(i, max), i as f64),
        (None, Value::Float(f)) => (*f >= min && *f <= max, *f),
        _ => return Ok(()),
    };
    if inside {
        Ok(())
    } else {
        Err(CodecError::OutOfBounds {
            value: shown,
            min,
            max,
        })
    }
}

/// `i >= bound`, exactly (`bound` may be fractional or beyond any integer).
fn int_at_least(i: i128, bound: f64) -> bool {
    if bound.is_nan() || bound <= -1.8e19 {
        return true;
    }
    if bound >= 1.8e19 {
        return false;
    }
    #[allow(clippy::cast_possible_truncation)] // bounded just above
    let ceil = bound.ceil() as i128;
    i >= ceil
}

/// `i <= bound`, exactly.
fn int_at_most(i: i128, bound: f64) -> bool {
    if bound.is_nan() || bound >= 1.8e19 {
        return true;
    }
    if bound <= -1.8e19 {
        return false;
    }
    #[allow(clippy::cast_possible_truncation)] // bounded just above
    let floor = bound.floor() as i128;
    i <= floor
}

fn label_raw(point: &Point, text: &str) -> Result<Raw, CodecError> {
    let key = point
        .labels
        .iter()
        .find(|(_, l)| l.as_str() == text)
        .map(|(k, _)| *k)
        .ok_or_else(|| CodecError::UnknownLabel(text.to_owned()))?;
    match point.data_type {
        DataType::Bool | DataType::Bit(_) => match key {
            0 => Ok(Raw::Bool(false)),
            1 => Ok(Raw::Bool(true)),
            _ => Err(out_of_range(key, point.data_type)),
        },
        dt if integer_range(dt).is_some() => integer_raw(dt, key.into()),
        #[allow(clippy::cast_precision_loss)] // labels on floats are small integers
        _ => Ok(Raw::F64(key as f64)),
    }
}

/// Floats for humans: plain decimals in the usual range, exponent form for the garbage that
/// wrong interpretations produce (1e-40, 3e38).
fn human_float(f: f64, shown: impl std::fmt::Display + std::fmt::LowerExp) -> String {
    let a = f.abs();
    if a != 0.0 && a.is_finite() && !(1e-6..1e15).contains(&a) {
        format!("{shown:e}")
    } else {
        format!("{shown}")
    }
}

/// Commissioning helper: every plausible reading of `regs`, as `(name, text)` pairs.
///
/// One register: `u16`, `i16`, `hex`, `bits`; two: `u32`/`i32`/`f32` in each [`WordOrder`]
/// (`"f32 CDAB"`); four: `u64`/`i64`/`f64` in each order; any count: `hex` and `ascii AB` /
/// `ascii BA` (text escaped, so control characters cannot mess up a terminal).
pub fn decode_all_ways(regs: &[u16]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if regs.is_empty() {
        return out;
    }
    let hex = regs
        .iter()
        .map(|r| format!("0x{r:04X}"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut push = |name: String, text: String| out.push((name, text));
    match regs.len() {
        1 => {
            let r = regs[0];
            push("u16".into(), r.to_string());
            push(
                "i16".into(),
                i16::from_be_bytes(r.to_be_bytes()).to_string(),
            );
            push("hex".into(), hex);
            let bits = format!("{r:016b}");
            let grouped = bits
                .as_bytes()
                .chunks(4)
                .map(|c| std::str::from_utf8(c).expect("ascii digits"))
                .collect::<Vec<_>>()
                .join(" ");
            push("bits".into(), grouped);
        }
        2 | 4 => {
            let wide = regs.len() == 4;
            for order in WordOrder::ALL {
                let b = numeric_bytes(order.word_swap(), order.byte_swap(), regs);
                let o = order.name();
                if wide {
                    let b8: [u8; 8] = b[..8].try_into().expect("8 bytes");
                    let f = f64::from_be_bytes(b8);
                    push(format!("u64 {o}"), u64::from_be_bytes(b8).to_string());
                    push(format!("i64 {o}"), i64::from_be_bytes(b8).to_string());
                    push(format!("f64 {o}"), human_float(f, f));
                } else {
                    let b4: [u8; 4] = b[..4].try_into().expect("4 bytes");
                    let f = f32::from_be_bytes(b4);
                    push(format!("u32 {o}"), u32::from_be_bytes(b4).to_string());
                    push(format!("i32 {o}"), i32::from_be_bytes(b4).to_string());
                    push(format!("f32 {o}"), human_float(f.into(), f));
                }
            }
            push("hex".into(), hex);
        }
        _ => push("hex".into(), hex),
    }
    for (name, swap) in [("ascii AB", false), ("ascii BA", true)] {
        out.push((
            name.into(),
            decode_ascii(swap, regs).escape_debug().to_string(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PayloadFormat, PublishPolicy, Qos, RegisterKind};
    use std::collections::BTreeMap;

    use WordOrder::{Abcd, Badc, Cdab, Dcba};

    /// The reference `numeric_bytes` is checked against: the words in value order (reversed
    /// for a word swap), each big-endian (byte-swapped for a byte swap).
    fn canonical_bytes(word_swap: bool, byte_swap: bool, regs: &[u16]) -> Vec<u8> {
        let mut words: Vec<u16> = regs.to_vec();
        if word_swap {
            words.reverse();
        }
        words
            .into_iter()
            .flat_map(|w| if byte_swap { w.swap_bytes() } else { w }.to_be_bytes())
            .collect()
    }

    #[test]
    fn numeric_bytes_match_canonical_bytes_for_every_order_and_width() {
        let regs = [0x0102, 0x0304, 0x0506, 0x0708];
        for n in 1..=4 {
            for order in WordOrder::ALL {
                let (w, b) = (order.word_swap(), order.byte_swap());
                let fast = numeric_bytes(w, b, &regs[..n]);
                assert_eq!(
                    fast[..2 * n],
                    canonical_bytes(w, b, &regs[..n])[..],
                    "{n} {order:?}"
                );
                assert!(fast[2 * n..].iter().all(|&x| x == 0));
            }
        }
    }

    fn point(data_type: DataType) -> Point {
        Point {
            name: "p".into(),
            kind: RegisterKind::Holding,
            address: 0,
            data_type,
            order: Abcd,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            labels: BTreeMap::new(),
            group: 0,
            topic: "gw/d/p".into(),
            payload: PayloadFormat::Json,
            publish: PublishPolicy::EveryPoll,
            qos: Qos::AtLeastOnce,
            retain: false,
            writable: true,
            min: None,
            max: None,
        }
    }

    fn scaled(data_type: DataType, scale: f64, offset: f64) -> Point {
        Point {
            scale,
            offset,
            ..point(data_type)
        }
    }

    /// (type, order, registers on the wire, raw value): datasheet vectors, decoded and encoded.
    fn vectors() -> Vec<(DataType, WordOrder, Vec<u16>, Raw)> {
        use DataType::*;
        vec![
            // 230.1 V as IEEE 754 single: 0x4366199A.
            (F32, Abcd, vec![0x4366, 0x199A], Raw::F64(230.1f32.into())),
            (F32, Cdab, vec![0x199A, 0x4366], Raw::F64(230.1f32.into())),
            (F32, Badc, vec![0x6643, 0x9A19], Raw::F64(230.1f32.into())),
            (F32, Dcba, vec![0x9A19, 0x6643], Raw::F64(230.1f32.into())),
            // Eastron SDM / Schneider iEM style: 50.0 Hz, 0x42480000 big-endian.
            (F32, Abcd, vec![0x4248, 0x0000], Raw::F64(50.0)),
            (F32, Abcd, vec![0xC020, 0x0000], Raw::F64(-2.5)),
            (U32, Abcd, vec![0x075B, 0xCD15], Raw::U64(123_456_789)),
            (U32, Cdab, vec![0xCD15, 0x075B], Raw::U64(123_456_789)),
            (U32, Badc, vec![0x5B07, 0x15CD], Raw::U64(123_456_789)),
            (U32, Dcba, vec![0x15CD, 0x5B07], Raw::U64(123_456_789)),
            (I32, Abcd, vec![0xFFFF, 0xFFFE], Raw::I64(-2)),
            (I32, Cdab, vec![0xFFFE, 0xFFFF], Raw::I64(-2)),
            (U16, Abcd, vec![0x00E6], Raw::U64(230)),
            (U16, Badc, vec![0xE600], Raw::U64(230)),
            (U16, Cdab, vec![0x00E6], Raw::U64(230)),
            (I16, Abcd, vec![0xFFFE], Raw::I64(-2)),
            (I16, Dcba, vec![0xFEFF], Raw::I64(-2)),
            (F64, Abcd, vec![0x3FF0, 0, 0, 0], Raw::F64(1.0)),
            (F64, Dcba, vec![0, 0, 0, 0xF03F], Raw::F64(1.0)),
            // 230.1 as double: 0x406CC33333333333.
            (
                F64,
                Abcd,
                vec![0x406C, 0xC333, 0x3333, 0x3333],
                Raw::F64(230.1),
            ),
            (
                F64,
                Cdab,
                vec![0x3333, 0x3333, 0xC333, 0x406C],
                Raw::F64(230.1),
            ),
            (
                F64,
                Badc,
                vec![0x6C40, 0x33C3, 0x3333, 0x3333],
                Raw::F64(230.1),
            ),
            (
                F64,
                Dcba,
                vec![0x3333, 0x3333, 0x33C3, 0x6C40],
                Raw::F64(230.1),
            ),
            (
                U64,
                Abcd,
                vec![0x0102, 0x0304, 0x0506, 0x0708],
                Raw::U64(0x0102_0304_0506_0708),
            ),
            (
                U64,
                Cdab,
                vec![0x0708, 0x0506, 0x0304, 0x0102],
                Raw::U64(0x0102_0304_0506_0708),
            ),
            (
                U64,
                Badc,
                vec![0x0201, 0x0403, 0x0605, 0x0807],
                Raw::U64(0x0102_0304_0506_0708),
            ),
            (
                U64,
                Dcba,
                vec![0x0807, 0x0605, 0x0403, 0x0201],
                Raw::U64(0x0102_0304_0506_0708),
            ),
            (
                I64,
                Abcd,
                vec![0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE],
                Raw::I64(-2),
            ),
            (
                Ascii(3),
                Abcd,
                vec![0x4642, 0x2D30, 0x3100],
                Raw::Text("FB-01".into()),
            ),
            (
                Ascii(3),
                Badc,
                vec![0x4246, 0x302D, 0x0031],
                Raw::Text("FB-01".into()),
            ),
            // Text is never reordered across registers, even with a word-swapping order.
            (
                Ascii(3),
                Cdab,
                vec![0x4642, 0x2D30, 0x3100],
                Raw::Text("FB-01".into()),
            ),
        ]
    }

    #[test]
    fn datasheet_vectors_decode_and_encode() {
        for (dt, order, regs, raw) in vectors() {
            assert_eq!(
                decode(dt, order, &regs),
                Ok(raw.clone()),
                "{dt:?} {order:?}"
            );
            assert_eq!(encode(dt, order, &raw), Ok(regs), "{dt:?} {order:?}");
        }
    }

    #[test]
    fn float_cdab_decodes_like_the_datasheet() {
        let p = Point {
            order: Cdab,
            ..point(DataType::F32)
        };
        let raw = decode(DataType::F32, Cdab, &[0x199A, 0x4366]).unwrap();
        assert_eq!(to_value(&p, &raw), Value::Float(230.1));
    }

    #[test]
    fn one_ulp_below_230_1_is_not_rounded_away() {
        let raw = decode(DataType::F32, Abcd, &[0x4366, 0x1999]).unwrap();
        assert_eq!(
            to_value(&point(DataType::F32), &raw),
            Value::Float(230.099_99)
        );
    }

    #[test]
    fn bits_are_numbered_from_the_least_significant() {
        for order in WordOrder::ALL {
            assert_eq!(
                decode(DataType::Bit(0), order, &[0x0001]),
                Ok(Raw::Bool(true))
            );
            assert_eq!(
                decode(DataType::Bit(15), order, &[0x8000]),
                Ok(Raw::Bool(true))
            );
            assert_eq!(
                decode(DataType::Bit(1), order, &[0xFFFD]),
                Ok(Raw::Bool(false))
            );
        }
        assert!(decode(DataType::Bit(16), Abcd, &[0xFFFF]).is_err());
    }

    #[test]
    fn set_bit_sets_and_clears_one_bit_only() {
        assert_eq!(set_bit(0x00F0, 0, true), 0x00F1);
        assert_eq!(set_bit(0x00F0, 4, false), 0x00E0);
        assert_eq!(set_bit(0x00F0, 15, true), 0x80F0);
        assert_eq!(set_bit(0x00F0, 4, true), 0x00F0);
        assert_eq!(set_bit(0x00F0, 16, true), 0x00F0);
    }

    #[test]
    fn bit_points_need_read_modify_write() {
        assert_eq!(
            encode(DataType::Bit(3), Abcd, &Raw::Bool(true)),
            Err(CodecError::NeedsReadModifyWrite)
        );
    }

    #[test]
    fn bool_is_not_a_register_type() {
        assert!(matches!(
            decode(DataType::Bool, Abcd, &[1]),
            Err(CodecError::TypeMismatch(_))
        ));
        assert_eq!(decode_bits(&[true, false]), Raw::Bool(true));
        assert_eq!(decode_bits(&[false]), Raw::Bool(false));
    }

    #[test]
    fn wrong_register_count_is_refused() {
        assert_eq!(
            decode(DataType::F32, Abcd, &[0x4366]),
            Err(CodecError::WrongLength {
                expected: 2,
                got: 1
            })
        );
        assert!(decode(DataType::Ascii(3), Abcd, &[0x4142; 4]).is_err());
    }

    #[test]
    fn ascii_trims_trailing_nul_and_spaces_and_replaces_non_ascii() {
        let regs = [0x4142, 0x2043, 0x2000, 0x2020];
        assert_eq!(
            decode(DataType::Ascii(4), Abcd, &regs),
            Ok(Raw::Text("AB C".into()))
        );
        assert_eq!(
            decode(DataType::Ascii(1), Abcd, &[0x41E9]),
            Ok(Raw::Text("A\u{FFFD}".into()))
        );
        assert_eq!(
            decode(DataType::Ascii(2), Abcd, &[0, 0]),
            Ok(Raw::Text(String::new()))
        );
    }

    #[test]
    fn ascii_pads_with_nul_and_refuses_what_does_not_fit() {
        assert_eq!(
            encode(DataType::Ascii(2), Abcd, &Raw::Text("ABC".into())),
            Ok(vec![0x4142, 0x4300])
        );
        assert!(matches!(
            encode(DataType::Ascii(2), Abcd, &Raw::Text("ABCDE".into())),
            Err(CodecError::OutOfRange { .. })
        ));
        assert!(matches!(
            encode(DataType::Ascii(2), Abcd, &Raw::Text("é".into())),
            Err(CodecError::NotAscii(_))
        ));
    }

    #[test]
    fn integers_out_of_range_are_refused_not_wrapped() {
        let refused = [
            (DataType::U16, Raw::U64(70_000)),
            (DataType::U16, Raw::I64(-1)),
            (DataType::I16, Raw::I64(32_768)),
            (DataType::I16, Raw::I64(-32_769)),
            (DataType::U32, Raw::U64(1 << 32)),
            (DataType::I32, Raw::I64(1 << 31)),
            (DataType::I64, Raw::U64(1 << 63)),
            (DataType::U64, Raw::I64(-1)),
        ];
        for (dt, raw) in refused {
            assert!(
                matches!(encode(dt, Abcd, &raw), Err(CodecError::OutOfRange { .. })),
                "{dt:?} {raw:?}"
            );
        }
        assert_eq!(
            encode(DataType::U16, Abcd, &Raw::U64(70_000)),
            Err(CodecError::OutOfRange {
                value: "70000".into(),
                data_type: "u16"
            })
        );
        assert_eq!(
            encode(DataType::U16, Abcd, &Raw::I64(65_535)),
            Ok(vec![0xFFFF])
        );
    }

    #[test]
    fn f32_overflow_is_refused_and_types_must_match() {
        assert!(matches!(
            encode(DataType::F32, Abcd, &Raw::F64(1e39)),
            Err(CodecError::OutOfRange { .. })
        ));
        assert!(encode(DataType::F64, Abcd, &Raw::F64(1e39)).is_ok());
        assert!(matches!(
            encode(DataType::F32, Abcd, &Raw::U64(1)),
            Err(CodecError::TypeMismatch(_))
        ));
        assert!(matches!(
            encode(DataType::U16, Abcd, &Raw::F64(1.0)),
            Err(CodecError::TypeMismatch(_))
        ));
    }

    #[test]
    fn encode_inverts_decode_for_every_type_and_order() {
        let words: [u16; 9] = [
            0x0000, 0x0001, 0x7FFF, 0x8000, 0xFFFF, 0x4366, 0x199A, 0x7F80, 0x1234,
        ];
        let types = [
            DataType::U16,
            DataType::I16,
            DataType::U32,
            DataType::I32,
            DataType::U64,
            DataType::I64,
            DataType::F32,
            DataType::F64,
        ];
        let mut checked = 0;
        for dt in types {
            let width = usize::from(dt.width());
            for order in WordOrder::ALL {
                for seed in 0..words.len() * words.len() {
                    let regs: Vec<u16> = (0..width)
                        .map(|i| words[(seed / (i + 1) + i * 3) % words.len()])
                        .collect();
                    let raw = decode(dt, order, &regs).unwrap();
                    if matches!(raw, Raw::F64(f) if f.is_nan()) {
                        continue; // NaN payloads are not values
                    }
                    assert_eq!(
                        encode(dt, order, &raw),
                        Ok(regs.clone()),
                        "{dt:?} {order:?}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 200);
        for order in WordOrder::ALL {
            let regs = vec![0x4142, 0x432D, 0x3100];
            let raw = decode(DataType::Ascii(3), order, &regs).unwrap();
            assert_eq!(encode(DataType::Ascii(3), order, &raw), Ok(regs));
        }
    }

    #[test]
    fn unscaled_integers_keep_their_signedness() {
        let raw = decode(DataType::U32, Abcd, &[0x075B, 0xCD15]).unwrap();
        assert_eq!(
            to_value(&point(DataType::U32), &raw),
            Value::UInt(123_456_789)
        );
        let raw = decode(DataType::U16, Abcd, &[1]).unwrap();
        assert_eq!(to_value(&point(DataType::U16), &raw), Value::UInt(1));
        let raw = decode(DataType::I16, Abcd, &[0xFFFE]).unwrap();
        assert_eq!(to_value(&point(DataType::I16), &raw), Value::Int(-2));
        let raw = decode(DataType::F64, Abcd, &[0x3FF0, 0, 0, 0]).unwrap();
        assert_eq!(to_value(&point(DataType::F64), &raw), Value::Float(1.0));
        assert_eq!(
            to_value(&point(DataType::Bool), &Raw::Bool(true)),
            Value::Bool(true)
        );
        assert_eq!(
            to_value(&point(DataType::Ascii(3)), &Raw::Text("FB-01".into())),
            Value::Text("FB-01".into())
        );
    }

    #[test]
    fn scale_and_offset_round_trip() {
        let volts = scaled(DataType::U16, 0.1, 0.0);
        assert_eq!(to_value(&volts, &Raw::U64(2301)), Value::Float(230.1));
        assert_eq!(from_value(&volts, &Value::Float(230.1)), Ok(Raw::U64(2301)));
        // Temperature in 0.01 °C with -40 offset, signed.
        let temp = scaled(DataType::I16, 0.01, -40.0);
        assert_eq!(to_value(&temp, &Raw::I64(6234)), Value::Float(22.34));
        assert_eq!(from_value(&temp, &Value::Float(22.34)), Ok(Raw::I64(6234)));
        assert_eq!(to_value(&temp, &Raw::I64(-100)), Value::Float(-41.0));
        // A scaled f32 keeps its short decimal form.
        let kwh = scaled(DataType::F32, 1000.0, 0.0);
        assert_eq!(
            to_value(&kwh, &Raw::F64(230.1f32.into())),
            Value::Float(230_100.0)
        );
        for raw in [0u64, 1, 7, 2301, 65_535] {
            let v = to_value(&volts, &Raw::U64(raw));
            assert_eq!(from_value(&volts, &v), Ok(Raw::U64(raw)));
        }
    }

    #[test]
    fn writes_take_one_exact_raw_value_and_refuse_out_of_range() {
        let volts = scaled(DataType::U16, 0.1, 0.0);
        // No rounding: 230.14 is no whole step of 0.1 V (it would write 230.1).
        assert!(matches!(
            from_value(&volts, &Value::Float(230.14)),
            Err(CodecError::NotRepresentable { .. })
        ));
        assert_eq!(from_value(&volts, &Value::Int(230)), Ok(Raw::U64(2300)));
        assert!(matches!(
            from_value(&volts, &Value::Float(6553.6)),
            Err(CodecError::OutOfRange { .. })
        ));
        assert!(matches!(
            from_value(&volts, &Value::Float(-0.1)),
            Err(CodecError::OutOfRange { .. })
        ));
        assert!(matches!(
            from_value(&point(DataType::U16), &Value::UInt(70_000)),
            Err(CodecError::OutOfRange { .. })
        ));
        assert!(matches!(
            from_value(&point(DataType::I16), &Value::Int(-32_769)),
            Err(CodecError::OutOfRange { .. })
        ));
        assert!(matches!(
            from_value(&point(DataType::U64), &Value::Float(1e20)),
            Err(CodecError::OutOfRange { .. })
        ));
        assert_eq!(
            from_value(&point(DataType::U64), &Value::UInt(u64::MAX)),
            Ok(Raw::U64(u64::MAX))
        );
        assert_eq!(
            from_value(&point(DataType::I64), &Value::Int(i64::MIN)),
            Ok(Raw::I64(i64::MIN))
        );
    }

    #[test]
    fn writes_refuse_nan_infinity_and_f32_overflow() {
        for dt in [DataType::F32, DataType::F64, DataType::U16] {
            for f in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                assert_eq!(
                    from_value(&point(dt), &Value::Float(f)),
                    Err(CodecError::NotANumber)
                );
            }
        }
        assert!(matches!(
            from_value(&point(DataType::F32), &Value::Float(1e39)),
            Err(CodecError::OutOfRange { .. })
        ));
        assert_eq!(
            from_value(&point(DataType::F32), &Value::Int(3)),
            Ok(Raw::F64(3.0))
        );
    }

    #[test]
    fn writes_respect_the_point_bounds() {
        let p = Point {
            min: Some(0.0),
            max: Some(100.0),
            ..point(DataType::U16)
        };
        assert_eq!(from_value(&p, &Value::UInt(100)), Ok(Raw::U64(100)));
        assert_eq!(
            from_value(&p, &Value::UInt(101)),
            Err(CodecError::OutOfBounds {
                value: 101.0,
                min: 0.0,
                max: 100.0
            })
        );
    }

    #[test]
    fn writes_check_the_value_kind() {
        assert_eq!(
            from_value(&point(DataType::Bit(3)), &Value::Bool(true)),
            Ok(Raw::Bool(true))
        );
        assert_eq!(
            from_value(&point(DataType::Ascii(3)), &Value::Text("FB-01".into())),
            Ok(Raw::Text("FB-01".into()))
        );
        let refused = [
            (DataType::Bool, Value::Int(1)),
            (DataType::U16, Value::Bool(true)),
            (DataType::Ascii(2), Value::Int(1)),
        ];
        for (dt, v) in refused {
            assert!(
                matches!(from_value(&point(dt), &v), Err(CodecError::TypeMismatch(_))),
                "{dt:?} {v:?}"
            );
        }
        assert_eq!(
            from_value(&point(DataType::U16), &Value::Text("run".into())),
            Err(CodecError::UnknownLabel("run".into()))
        );
    }

    #[test]
    fn labels_name_raw_values_both_ways() {
        let mut mode = point(DataType::U16);
        mode.labels = BTreeMap::from([(0, "stop".to_string()), (1, "run".to_string())]);
        assert_eq!(label(&mode, &Raw::U64(1)), Some("run"));
        assert_eq!(label(&mode, &Raw::U64(2)), None);
        assert_eq!(
            from_value(&mode, &Value::Text("stop".into())),
            Ok(Raw::U64(0))
        );

        let mut relay = point(DataType::Bool);
        relay.labels = BTreeMap::from([(0, "open".to_string()), (1, "closed".to_string())]);
        assert_eq!(label(&relay, &Raw::Bool(true)), Some("closed"));
        assert_eq!(
            from_value(&relay, &Value::Text("open".into())),
            Ok(Raw::Bool(false))
        );
        assert_eq!(label(&relay, &Raw::F64(1.0)), None);

        let mut signed = point(DataType::I16);
        signed.labels = BTreeMap::from([(-1, "fault".to_string())]);
        assert_eq!(label(&signed, &Raw::I64(-1)), Some("fault"));
        assert_eq!(
            from_value(&signed, &Value::Text("fault".into())),
            Ok(Raw::I64(-1))
        );
    }

    #[test]
    fn decode_all_ways_lists_every_interpretation() {
        let all = decode_all_ways(&[0x199A, 0x4366]);
        let get = |name: &str| {
            all.iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .unwrap_or_else(|| panic!("no {name}"))
        };
        assert_eq!(get("f32 CDAB"), "230.1");
        assert_eq!(get("u32 CDAB"), "1130764698");
        assert_eq!(get("hex"), "0x199A 0x4366");
        assert!(get("f32 ABCD").contains('e'), "{}", get("f32 ABCD"));
        assert_eq!(all.len(), 12 + 1 + 2);

        let one = decode_all_ways(&[0xFFFE]);
        assert_eq!(
            one,
            vec![
                ("u16".into(), "65534".into()),
                ("i16".into(), "-2".into()),
                ("hex".into(), "0xFFFE".into()),
                ("bits".into(), "1111 1111 1111 1110".into()),
                ("ascii AB".into(), "\u{FFFD}\u{FFFD}".into()),
                ("ascii BA".into(), "\u{FFFD}\u{FFFD}".into()),
            ]
        );

        let four = decode_all_ways(&[0x3FF0, 0, 0, 0]);
        assert!(four.contains(&("f64 ABCD".into(), "1".into())));
        assert!(four.contains(&("u64 DCBA".into(), "61503".into())));

        let text = decode_all_ways(&[0x4642, 0x2D30, 0x3100]);
        assert!(text.contains(&("ascii AB".into(), "FB-01".into())));
        assert!(text.contains(&("ascii BA".into(), "BF0-\\01".into())));
        assert!(decode_all_ways(&[]).is_empty());
    }
}
