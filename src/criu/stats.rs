//! CRIU's own statistics of a dump: `stats-dump`, written into the work directory at the end of
//! the run (a protobuf `stats_entry` after the image magic). Only the few counters stasis reports
//! are read: how long the tree was frozen, how many pages were written.

use std::path::Path;

pub const DUMP_STATS: &str = "stats-dump";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DumpStats {
    pub frozen_us: u64,
    pub memdump_us: u64,
    pub memwrite_us: u64,
    pub pages_written: u64,
}

pub fn dump_stats(dir: &Path) -> Option<DumpStats> {
    let fields = entry_field(&std::fs::read(dir.join(DUMP_STATS)).ok()?, 1)?;
    let mut s = DumpStats::default();
    for (field, value) in varints(&fields) {
        match field {
            2 => s.frozen_us = value,
            3 => s.memdump_us = value,
            4 => s.memwrite_us = value,
            7 => s.pages_written = value,
            _ => {}
        }
    }
    Some(s)
}

/// The bytes of sub-message `field` of the image's one `stats_entry`. Images start with one or
/// two 32-bit magics, then a 32-bit length and the message.
fn entry_field(image: &[u8], field: u64) -> Option<Vec<u8>> {
    const COMMON: u32 = 0x5456_4319;
    const SERVICE: u32 = 0x5510_5940;
    let u32_at = |i: usize| image.get(i..i + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
    let mut at = 4;
    if matches!(u32_at(0)?, COMMON | SERVICE) {
        at = 8;
    }
    let len = u32_at(at)? as usize;
    let msg = image.get(at + 4..at + 4 + len)?;
    parse(msg).into_iter().find_map(|(f, v)| match v {
        Value::Bytes(b) if f == field => Some(b),
        _ => None,
    })
}

/// A protobuf field's value: a varint or the bytes of a length-delimited field (fixed-width
/// fields are skipped).
enum Value {
    Varint(u64),
    Bytes(Vec<u8>),
}

/// The fields of a protobuf message, in order; parsing stops at the first malformed one.
fn parse(msg: &[u8]) -> Vec<(u64, Value)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < msg.len() {
        let Some((key, n)) = varint(&msg[i..]) else { break };
        i += n;
        match key & 7 {
            0 => match varint(&msg[i..]) {
                Some((v, n)) => {
                    out.push((key >> 3, Value::Varint(v)));
                    i += n;
                }
                None => break,
            },
            2 => {
                let Some((len, n)) = varint(&msg[i..]) else { break };
                i += n;
                let Some(bytes) = msg.get(i..i.saturating_add(len as usize)) else { break };
                out.push((key >> 3, Value::Bytes(bytes.to_vec())));
                i += len as usize;
            }
            1 => i += 8,
            5 => i += 4,
            _ => break,
        }
    }
    out
}

/// Varint fields of a protobuf message.
fn varints(msg: &[u8]) -> Vec<(u64, u64)> {
    parse(msg)
        .into_iter()
        .filter_map(|(f, v)| match v {
            Value::Varint(v) => Some((f, v)),
            Value::Bytes(_) => None,
        })
        .collect()
}

fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
    }

    #[test]
    fn reads_the_frozen_time_and_pages_of_a_dump() {
        let mut dump = Vec::new();
        for (field, value) in [(1u64, 100u64), (2, 54_321), (3, 1_000), (4, 2_000), (7, 1_234)] {
            put_varint(&mut dump, field << 3);
            put_varint(&mut dump, value);
        }
        let mut entry = Vec::new();
        put_varint(&mut entry, (1 << 3) | 2);
        put_varint(&mut entry, dump.len() as u64);
        entry.extend(&dump);
        let mut image = 0x5510_5940u32.to_le_bytes().to_vec();
        image.extend(0x5709_3306u32.to_le_bytes());
        image.extend((entry.len() as u32).to_le_bytes());
        image.extend(&entry);
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(DUMP_STATS), &image).unwrap();
        let s = dump_stats(d.path()).unwrap();
        assert_eq!((s.frozen_us, s.pages_written), (54_321, 1_234));
        std::fs::write(d.path().join(DUMP_STATS), &image[..image.len() - 3]).unwrap();
        assert_eq!(dump_stats(d.path()), None, "a truncated file is no stats, not garbage");
    }
}
