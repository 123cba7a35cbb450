//! Request planning: points → coalesced read blocks within protocol limits (pure).
//!
//! # Coalescing
//! Points of one poll group are grouped by [`RegisterKind`] and sorted by address. A block grows
//! greedily while
//! - the run of unused registers (or bits) between the block's end and the next point is at
//!   most `max_gap`,
//! - the block stays within `max_registers` (register kinds) or `max_bits` (bit kinds), and
//! - the newly covered addresses contain no remembered bad range, unless that range lies entirely
//!   inside the new point's own span (then the point itself is unreadable, and isolating it would
//!   not help).
//!
//! Overlapping points (a `Bit` inside a `U16`'s register) share a block. A single point wider
//! than the limit gets a block of its own, over the limit; configuration validation refuses such
//! points, the planner does not hide them.
//!
//! # Bad ranges
//! Some devices answer "illegal data address" (exception 0x02) when a read bridges registers
//! they do not implement. The caller then [`split`]s the block and retries the halves; when the
//! halves succeed where the whole failed, the gap between them ([`gap_between`]) goes into
//! [`BadRanges`] and later plans never bridge it again.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::{Device, Point, RegisterKind};

/// Protocol maxima for one read: 125 registers (FC3/FC4) and 2000 bits (FC1/FC2),
/// Modbus Application Protocol v1.1b3 §6.1–6.4.
pub const MAX_REGISTERS: u16 = 125;
pub const MAX_BITS: u16 = 2000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_gap: u16,
    pub max_registers: u16,
    pub max_bits: u16,
}

impl Limits {
    pub fn of(device: &Device) -> Limits {
        Limits {
            max_gap: device.max_gap,
            max_registers: device.max_registers,
            max_bits: device.max_bits,
        }
    }

    fn max_for(self, kind: RegisterKind) -> u16 {
        if kind.is_bits() {
            self.max_bits
        } else {
            self.max_registers
        }
    }
}

/// One read request and the points it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBlock {
    pub kind: RegisterKind,
    pub start: u16,
    /// Registers (or bits) read.
    pub count: u16,
    /// Indices into the device's points, ascending by address.
    pub points: Vec<usize>,
}

impl ReadBlock {
    /// Last address read (inclusive).
    pub fn last(&self) -> u16 {
        self.start + (self.count - 1)
    }
}

/// Address ranges of a device that a read must never bridge, per kind.
///
/// Inclusive `[from, to]` ranges, kept sorted and merged (overlapping or adjacent ranges become
/// one).
#[derive(Debug, Default, Clone)]
pub struct BadRanges {
    ranges: BTreeMap<RegisterKind, Vec<(u16, u16)>>,
}

impl BadRanges {
    pub fn remember(&mut self, kind: RegisterKind, from: u16, to: u16) {
        let (from, to) = (from.min(to), from.max(to));
        let list = self.ranges.entry(kind).or_default();
        list.push((from, to));
        list.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(list.len());
        for &(f, t) in list.iter() {
            match merged.last_mut() {
                Some(last) if u32::from(f) <= u32::from(last.1) + 1 => last.1 = last.1.max(t),
                _ => merged.push((f, t)),
            }
        }
        *list = merged;
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.values().all(Vec::is_empty)
    }

    pub fn iter(&self) -> impl Iterator<Item = (RegisterKind, u16, u16)> + '_ {
        self.ranges
            .iter()
            .flat_map(|(&kind, list)| list.iter().map(move |&(f, t)| (kind, f, t)))
    }

    /// Whether the newly covered addresses `[from, to]` hold a bad range that does not lie
    /// entirely inside `own` (the span of the point being added).
    fn blocks(&self, kind: RegisterKind, from: u16, to: u16, own: (u16, u16)) -> bool {
        self.ranges.get(&kind).is_some_and(|list| {
            list.iter()
                .any(|&(f, t)| f <= to && t >= from && !(f >= own.0 && t <= own.1))
        })
    }
}

/// Plans the reads for the points `selected` (indices into `points`, one poll group): the fewest
/// blocks per kind within `limits` that bridge no bad range, ordered by `(kind, start)`.
///
/// # Panics
/// If an index in `selected` is out of bounds of `points` (a caller bug).
pub fn plan(
    points: &[Point],
    selected: &[usize],
    limits: Limits,
    bad: &BadRanges,
) -> Vec<ReadBlock> {
    let mut order: Vec<usize> = selected.to_vec();
    order.sort_unstable_by_key(|&i| {
        (
            points[i].kind,
            points[i].address,
            points[i].last_address(),
            i,
        )
    });
    order.dedup();

    let mut blocks: Vec<ReadBlock> = Vec::new();
    // The block being grown: (kind, start, last inclusive, points).
    let mut open: Option<(RegisterKind, u16, u16, Vec<usize>)> = None;
    for i in order {
        let p = &points[i];
        let (a, l) = (p.address, p.last_address());
        if let Some((kind, start, last, members)) = open.as_mut() {
            let fits = *kind == p.kind
                && u32::from(a) <= u32::from(*last) + 1 + u32::from(limits.max_gap)
                && u32::from(l.max(*last)) - u32::from(*start) < u32::from(limits.max_for(p.kind))
                && (l <= *last || !bad.blocks(p.kind, last.saturating_add(1), l, (a, l)));
            if fits {
                *last = (*last).max(l);
                members.push(i);
                continue;
            }
            blocks.push(close(open.take().expect("open block")));
        }
        open = Some((p.kind, a, l, vec![i]));
    }
    blocks.extend(open.map(close));
    blocks
}

fn close((kind, start, last, points): (RegisterKind, u16, u16, Vec<usize>)) -> ReadBlock {
    ReadBlock {
        kind,
        start,
        count: last - start + 1,
        points,
    }
}

/// Result of [`split`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitOutcome {
    /// Two smaller blocks covering the block's points, each as tight as its points allow.
    Halves(ReadBlock, ReadBlock),
    /// The block has one point, or all its points share one address span: that span itself is
    /// unreadable.
    Single,
}

/// Divides a block's points into two halves by point order, for retrying a read the device
/// refused. Cuts where the halves do not overlap if possible (so the gap between them can be
/// remembered), as close to the middle as possible; points with the same span stay together.
pub fn split(block: &ReadBlock, points: &[Point]) -> SplitOutcome {
    let members = &block.points;
    let span = |i: usize| (points[i].address, points[i].last_address());
    // Candidate cuts: positions where the span changes; a cut is clean when nothing before it
    // reaches the first point after it.
    let mut reach = 0u16;
    let mut cuts: Vec<(usize, bool)> = Vec::new();
    for (pos, &i) in members.iter().enumerate() {
        let (a, l) = span(i);
        if pos > 0 && span(members[pos - 1]) != (a, l) {
            cuts.push((pos, reach < a));
        }
        reach = if pos == 0 { l } else { reach.max(l) };
    }
    let middle = members.len() / 2;
    let best = cuts
        .iter()
        .min_by_key(|&&(pos, clean)| (!clean, pos.abs_diff(middle)))
        .map(|&(pos, _)| pos);
    let Some(cut) = best else {
        return SplitOutcome::Single;
    };
    let tight = |ids: &[usize]| {
        let start = ids
            .iter()
            .map(|&i| points[i].address)
            .min()
            .expect("non-empty half");
        let last = ids
            .iter()
            .map(|&i| points[i].last_address())
            .max()
            .expect("non-empty half");
        ReadBlock {
            kind: block.kind,
            start,
            count: last - start + 1,
            points: ids.to_vec(),
        }
    };
    SplitOutcome::Halves(tight(&members[..cut]), tight(&members[cut..]))
}

/// The inclusive range of unused addresses between two blocks of the same kind, `None` when
/// they touch, overlap or are of different kinds.
pub fn gap_between(a: &ReadBlock, b: &ReadBlock) -> Option<(u16, u16)> {
    if a.kind != b.kind {
        return None;
    }
    let (first, second) = if a.start <= b.start { (a, b) } else { (b, a) };
    let after = u32::from(first.last()) + 1;
    if u32::from(second.start) > after {
        Some((first.last() + 1, second.start - 1))
    } else {
        None
    }
}

/// Expected bus time of one RTU read: request frame (8 bytes) and response frame (5 bytes +
/// data: 2 per register, 1 per 8 bits) at `1 start + data + parity + stop` bits per character,
/// plus the frame gap before the request and the slave's least turnaround: 3.5 characters,
/// the silence it needs to see the end of the request (Modbus over serial line v1.02
/// §2.5.1.1). Not the frame gap twice: above 19200 baud the gap is a fixed 1.75 ms, and
/// counting it for the turnaround overestimated a 10-slave cycle at 115200 by 19 %
/// (benches/wire.rs). A slower slave adds its own turnaround.
pub fn estimate_rtu_time(
    block: &ReadBlock,
    baud: u32,
    data_bits: u8,
    parity: bool,
    stop_bits: u8,
    frame_gap: Duration,
) -> Duration {
    let data_bytes = if block.kind.is_bits() {
        u64::from(block.count).div_ceil(8)
    } else {
        2 * u64::from(block.count)
    };
    let chars = 8 + 5 + data_bytes;
    let bits_per_char = 1 + u64::from(data_bits) + u64::from(parity) + u64::from(stop_bits);
    let baud = u64::from(baud.max(1));
    let nanos = chars * bits_per_char * 1_000_000_000 / baud;
    let turnaround = 35 * bits_per_char * 1_000_000_000 / 10 / baud;
    Duration::from_nanos(nanos) + frame_gap + Duration::from_nanos(turnaround)
}

/// Silent interval between RTU frames: 3.5 character times (a character is 11 bits on the
/// line), and a fixed 1.75 ms above 19200 baud, where 3.5 characters would be too short for
/// UART interrupt handling — Modbus over serial line v1.02 §2.5.1.1.
pub fn frame_gap_for_baud(baud: u32) -> Duration {
    if baud > 19_200 {
        Duration::from_micros(1750)
    } else {
        // 3.5 × 11 bits = 38.5 bit times; rounded up so the gap is never short.
        Duration::from_nanos(38_500_000_000u64.div_ceil(u64::from(baud.max(1))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DataType, PayloadFormat, PublishPolicy, Qos, WordOrder};
    use std::collections::BTreeMap;

    use DataType::{Bit, Bool, F32, U16, U32};
    use RegisterKind::{Coil, DiscreteInput, Holding, Input};

    fn pt(kind: RegisterKind, address: u16, data_type: DataType) -> Point {
        Point {
            name: format!("{kind:?}{address}"),
            kind,
            address,
            data_type,
            order: WordOrder::Abcd,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            labels: BTreeMap::new(),
            group: 0,
            topic: String::new(),
            payload: PayloadFormat::Json,
            publish: PublishPolicy::EveryPoll,
            qos: Qos::AtLeastOnce,
            retain: false,
            writable: false,
            min: None,
            max: None,
        }
    }

    const LIMITS: Limits = Limits {
        max_gap: 10,
        max_registers: 125,
        max_bits: 2000,
    };

    fn all(points: &[Point]) -> Vec<usize> {
        (0..points.len()).collect()
    }

    fn spans(blocks: &[ReadBlock]) -> Vec<(RegisterKind, u16, u16)> {
        blocks.iter().map(|b| (b.kind, b.start, b.count)).collect()
    }

    #[test]
    fn an_energy_meter_map_coalesces_into_few_reads() {
        // Eastron SDM630-style input registers, f32 each, listed out of order.
        let points = vec![
            pt(Input, 0x0000, F32),   // L1 voltage
            pt(Input, 0x0002, F32),   // L2 voltage
            pt(Input, 0x0004, F32),   // L3 voltage
            pt(Input, 0x0006, F32),   // L1 current
            pt(Input, 0x000C, F32),   // L1 power (gap of 4)
            pt(Input, 0x0046, F32),   // frequency (gap of 56)
            pt(Input, 0x0156, F32),   // total energy (far away)
            pt(Holding, 0x0014, U16), // Modbus address setting
            pt(Input, 0x0048, F32),   // import energy, adjacent to frequency
        ];
        let blocks = plan(&points, &all(&points), LIMITS, &BadRanges::default());
        assert_eq!(
            spans(&blocks),
            vec![
                (Holding, 0x14, 1),
                (Input, 0, 14),
                (Input, 0x46, 4),
                (Input, 0x156, 2)
            ]
        );
        assert_eq!(blocks[1].points, vec![0, 1, 2, 3, 4]);
        assert_eq!(blocks[2].points, vec![5, 8]);
    }

    #[test]
    fn only_selected_points_are_planned() {
        let points = vec![
            pt(Holding, 0, U16),
            pt(Holding, 1, U16),
            pt(Holding, 2, U16),
        ];
        let blocks = plan(&points, &[2, 0], LIMITS, &BadRanges::default());
        assert_eq!(spans(&blocks), vec![(Holding, 0, 3)]);
        assert_eq!(blocks[0].points, vec![0, 2]);
        assert!(plan(&points, &[], LIMITS, &BadRanges::default()).is_empty());
    }

    #[test]
    fn a_gap_of_exactly_max_gap_is_bridged_and_one_more_is_not() {
        let bridged = vec![pt(Holding, 0, U16), pt(Holding, 11, U16)];
        let blocks = plan(&bridged, &all(&bridged), LIMITS, &BadRanges::default());
        assert_eq!(spans(&blocks), vec![(Holding, 0, 12)]);

        let apart = vec![pt(Holding, 0, U16), pt(Holding, 12, U16)];
        let blocks = plan(&apart, &all(&apart), LIMITS, &BadRanges::default());
        assert_eq!(spans(&blocks), vec![(Holding, 0, 1), (Holding, 12, 1)]);

        let zero = Limits {
            max_gap: 0,
            ..LIMITS
        };
        let adjacent = vec![
            pt(Holding, 0, U16),
            pt(Holding, 1, U16),
            pt(Holding, 3, U16),
        ];
        let blocks = plan(&adjacent, &all(&adjacent), zero, &BadRanges::default());
        assert_eq!(spans(&blocks), vec![(Holding, 0, 2), (Holding, 3, 1)]);
    }

    #[test]
    fn reads_stay_within_125_registers() {
        let points: Vec<Point> = (0..130).map(|a| pt(Holding, a, U16)).collect();
        let blocks = plan(&points, &all(&points), LIMITS, &BadRanges::default());
        assert_eq!(spans(&blocks), vec![(Holding, 0, 125), (Holding, 125, 5)]);

        // A multi-register point never straddles the limit.
        let points: Vec<Point> = (0..63).map(|a| pt(Holding, a * 2, U32)).collect();
        let blocks = plan(&points, &all(&points), LIMITS, &BadRanges::default());
        assert_eq!(spans(&blocks), vec![(Holding, 0, 124), (Holding, 124, 2)]);
    }

    #[test]
    fn reads_stay_within_2000_bits() {
        let points: Vec<Point> = (0..2010).map(|a| pt(Coil, a, Bool)).collect();
        let blocks = plan(&points, &all(&points), LIMITS, &BadRanges::default());
        assert_eq!(spans(&blocks), vec![(Coil, 0, 2000), (Coil, 2000, 10)]);

        let small = Limits {
            max_bits: 16,
            ..LIMITS
        };
        let blocks = plan(
            &points[..40],
            &all(&points[..40]),
            small,
            &BadRanges::default(),
        );
        assert_eq!(
            spans(&blocks),
            vec![(Coil, 0, 16), (Coil, 16, 16), (Coil, 32, 8)]
        );
    }

    #[test]
    fn different_kinds_never_merge() {
        let points = vec![
            pt(Input, 0, U16),
            pt(Holding, 0, U16),
            pt(Coil, 0, Bool),
            pt(DiscreteInput, 0, Bool),
            pt(Holding, 1, U16),
        ];
        let blocks = plan(&points, &all(&points), LIMITS, &BadRanges::default());
        assert_eq!(
            spans(&blocks),
            vec![
                (Coil, 0, 1),
                (DiscreteInput, 0, 1),
                (Holding, 0, 2),
                (Input, 0, 1)
            ]
        );
    }

    #[test]
    fn a_bad_range_splits_a_block_that_would_otherwise_be_one() {
        let points = vec![pt(Holding, 0, U16), pt(Holding, 8, U16)];
        let mut bad = BadRanges::default();
        bad.remember(Holding, 3, 5);
        let blocks = plan(&points, &all(&points), LIMITS, &bad);
        assert_eq!(spans(&blocks), vec![(Holding, 0, 1), (Holding, 8, 1)]);

        // Bad ranges of another kind do not matter.
        let mut other = BadRanges::default();
        other.remember(Input, 3, 5);
        let blocks = plan(&points, &all(&points), LIMITS, &other);
        assert_eq!(spans(&blocks), vec![(Holding, 0, 9)]);
    }

    #[test]
    fn a_bad_range_inside_a_points_own_span_does_not_isolate_it() {
        let points = vec![
            pt(Holding, 0, U16),
            pt(Holding, 1, U32),
            pt(Holding, 3, U16),
        ];
        let mut bad = BadRanges::default();
        bad.remember(Holding, 2, 2);
        let blocks = plan(&points, &all(&points), LIMITS, &bad);
        assert_eq!(spans(&blocks), vec![(Holding, 0, 4)]);
    }

    #[test]
    fn a_bit_point_shares_the_register_of_a_u16() {
        let points = vec![
            pt(Holding, 10, Bit(3)),
            pt(Holding, 10, U16),
            pt(Holding, 11, Bit(0)),
        ];
        let zero = Limits {
            max_gap: 0,
            ..LIMITS
        };
        let blocks = plan(&points, &all(&points), zero, &BadRanges::default());
        assert_eq!(spans(&blocks), vec![(Holding, 10, 2)]);
        assert_eq!(blocks[0].points, vec![0, 1, 2]);
    }

    #[test]
    fn bad_ranges_merge_when_they_touch() {
        let mut bad = BadRanges::default();
        assert!(bad.is_empty());
        bad.remember(Holding, 10, 12);
        bad.remember(Holding, 13, 15);
        bad.remember(Holding, 20, 20);
        bad.remember(Holding, 11, 11);
        bad.remember(Coil, 5, 1);
        assert!(!bad.is_empty());
        assert_eq!(
            bad.iter().collect::<Vec<_>>(),
            vec![(Coil, 1, 5), (Holding, 10, 15), (Holding, 20, 20)]
        );
    }

    #[test]
    fn split_halves_a_block_tightly_by_point_order() {
        let points = vec![
            pt(Holding, 0, U16),
            pt(Holding, 1, U32),
            pt(Holding, 8, U16),
            pt(Holding, 9, U16),
        ];
        let blocks = plan(&points, &all(&points), LIMITS, &BadRanges::default());
        assert_eq!(spans(&blocks), vec![(Holding, 0, 10)]);
        let SplitOutcome::Halves(a, b) = split(&blocks[0], &points) else {
            panic!("expected halves");
        };
        assert_eq!((a.start, a.count, a.points.clone()), (0, 3, vec![0, 1]));
        assert_eq!((b.start, b.count, b.points.clone()), (8, 2, vec![2, 3]));
        assert_eq!(gap_between(&a, &b), Some((3, 7)));
        assert_eq!(gap_between(&b, &a), Some((3, 7)));
    }

    #[test]
    fn split_prefers_a_clean_cut_and_keeps_shared_spans_together() {
        // Overlapping points 0..=2 form one cluster; the clean cut is before address 5.
        let points = vec![
            pt(Holding, 0, U32),
            pt(Holding, 1, U32),
            pt(Holding, 2, U16),
            pt(Holding, 5, U16),
        ];
        let block = plan(&points, &all(&points), LIMITS, &BadRanges::default()).remove(0);
        let SplitOutcome::Halves(a, b) = split(&block, &points) else {
            panic!("expected halves");
        };
        assert_eq!((a.start, a.count), (0, 3));
        assert_eq!((b.start, b.count), (5, 1));

        let same = vec![pt(Holding, 4, U16), pt(Holding, 4, Bit(1))];
        let block = plan(&same, &all(&same), LIMITS, &BadRanges::default()).remove(0);
        assert_eq!(split(&block, &same), SplitOutcome::Single);
        let one = vec![pt(Holding, 4, U32)];
        let block = plan(&one, &[0], LIMITS, &BadRanges::default()).remove(0);
        assert_eq!(split(&block, &one), SplitOutcome::Single);
    }

    #[test]
    fn adjacent_blocks_have_no_gap() {
        let a = ReadBlock {
            kind: Holding,
            start: 0,
            count: 5,
            points: vec![],
        };
        let b = ReadBlock {
            start: 5,
            ..a.clone()
        };
        assert_eq!(gap_between(&a, &b), None);
        let c = ReadBlock {
            kind: Input,
            start: 9,
            ..a.clone()
        };
        assert_eq!(gap_between(&a, &c), None);
    }

    #[test]
    fn a_10_register_read_at_9600_8n1_takes_about_41_ms() {
        let block = ReadBlock {
            kind: Holding,
            start: 0,
            count: 10,
            points: vec![],
        };
        let gap = frame_gap_for_baud(9600);
        assert_eq!(gap, Duration::from_nanos(4_010_417)); // 38.5 / 9600 s, rounded up
        let t = estimate_rtu_time(&block, 9600, 8, false, 1, gap);
        // (8 + 25) characters × 10 bits / 9600 baud = 34.375 ms, plus the gap and 3.5
        // characters of 10 bits (the slave's turnaround).
        assert_eq!(
            t,
            Duration::from_micros(34_375) + gap + Duration::from_nanos(3_645_833)
        );

        let coils = ReadBlock {
            kind: Coil,
            count: 20,
            ..block
        };
        // 8 + 5 + 3 characters × 11 bits (8E1) / 19200 baud.
        let t = estimate_rtu_time(&coils, 19_200, 8, true, 1, Duration::ZERO);
        // (No gap given; the slave's 3.5 characters still count.)
        assert_eq!(
            t,
            Duration::from_nanos(16 * 11 * 1_000_000_000 / 19_200)
                + Duration::from_nanos(35 * 11 * 1_000_000_000 / 10 / 19_200)
        );
    }

    #[test]
    fn at_115200_baud_a_slave_answers_after_3_5_characters_not_the_1_75_ms_gap() {
        // Measured (benches/wire.rs): a slave may answer once it has seen 3.5 characters of
        // silence (0.33 ms at 8E1); the 1.75 ms fixed gap is the master's, before its request.
        let block = ReadBlock {
            kind: Holding,
            start: 0,
            count: 20,
            points: vec![],
        };
        let gap = frame_gap_for_baud(115_200);
        let t = estimate_rtu_time(&block, 115_200, 8, true, 1, gap);
        let frames = Duration::from_nanos((8 + 45) * 11 * 1_000_000_000 / 115_200);
        let turnaround = Duration::from_nanos(35 * 11 * 1_000_000_000 / 10 / 115_200);
        assert_eq!(t, frames + gap + turnaround);
    }

    #[test]
    fn frame_gap_is_fixed_above_19200_baud() {
        assert_eq!(frame_gap_for_baud(38_400), Duration::from_micros(1750));
        assert_eq!(frame_gap_for_baud(115_200), Duration::from_micros(1750));
        assert_eq!(frame_gap_for_baud(19_200), Duration::from_nanos(2_005_209));
    }
}
