//! Compressed pages a restore can read anywhere: a `pages-N.img.zst` is written as independent
//! zstd frames of [`FRAME`] plain bytes each, followed by a skippable frame holding the seek
//! table (each frame's compressed size). Every zstd decoder reads the file as one stream (a
//! skippable frame is skipped), so a full restore, verification and export read it as before;
//! a lazy restore (criu::lazy) finds the frame that holds a page and decodes only that one,
//! instead of waiting for a decoder to get there from the start of the file.
//!
//! The table is only ever read from bytes that were checked against the checkpoint's hashes
//! first, and checked for consistency (its sizes must add up to the stream's length); a
//! stream without one (a checkpoint from before) is decoded front to back.

use std::io::Write;

/// Plain bytes per frame: what a fault on one page decodes (about a millisecond).
pub const FRAME: usize = 1 << 20;
/// Frames compressed at once, one per CPU.
const BATCH: usize = 8;
/// A zstd skippable frame's magic (0x184D2A50..=0x184D2A5F; the last one is ours).
const SKIPPABLE: u32 = 0x184D_2A5E;
const TAG: &[u8; 8] = b"STASSEK1";

/// Compresses what is written through it into frames of [`FRAME`] plain bytes, and ends the
/// stream with their seek table ([`FramedEncoder::finish`]).
pub struct FramedEncoder<W: Write> {
    out: W,
    level: i32,
    pending: Vec<u8>,
    sizes: Vec<u32>,
}

impl<W: Write> FramedEncoder<W> {
    pub fn new(out: W, level: i32) -> FramedEncoder<W> {
        FramedEncoder { out, level, pending: Vec::with_capacity(FRAME * BATCH), sizes: Vec::new() }
    }

    pub fn get_ref(&self) -> &W {
        &self.out
    }

    /// Compresses the whole frames held (and the last, short one when `all`), on every CPU.
    fn compress_pending(&mut self, all: bool) -> std::io::Result<()> {
        let whole = if all { self.pending.len() } else { self.pending.len() / FRAME * FRAME };
        if whole == 0 {
            return Ok(());
        }
        let pieces: Vec<&[u8]> = self.pending[..whole].chunks(FRAME).collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(pieces.len());
        let level = self.level;
        let mut done: Vec<Option<std::io::Result<Vec<u8>>>> = (0..pieces.len()).map(|_| None).collect();
        std::thread::scope(|s| {
            let per = pieces.len().div_ceil(threads);
            for (slots, work) in done.chunks_mut(per).zip(pieces.chunks(per)) {
                s.spawn(move || {
                    for (slot, piece) in slots.iter_mut().zip(work) {
                        *slot = Some(zstd::bulk::compress(piece, level));
                    }
                });
            }
        });
        for frame in done {
            let frame = frame.expect("every frame compressed")?;
            let size = u32::try_from(frame.len()).map_err(|_| std::io::Error::other("a frame over 4 GiB"))?;
            self.out.write_all(&frame)?;
            self.sizes.push(size);
        }
        self.pending.drain(..whole);
        Ok(())
    }

    /// Writes the last frame and the seek table, and hands the writer back.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.compress_pending(true)?;
        let mut payload = Vec::with_capacity(TAG.len() + 16 + 4 * self.sizes.len() + 4);
        payload.extend_from_slice(TAG);
        payload.extend_from_slice(&(FRAME as u64).to_le_bytes());
        payload.extend_from_slice(&(self.sizes.len() as u64).to_le_bytes());
        for s in &self.sizes {
            payload.extend_from_slice(&s.to_le_bytes());
        }
        // The whole skippable frame's length, last: read first, from the end of the file.
        let total = 8 + payload.len() as u32 + 4;
        payload.extend_from_slice(&total.to_le_bytes());
        self.out.write_all(&SKIPPABLE.to_le_bytes())?;
        self.out.write_all(&(payload.len() as u32).to_le_bytes())?;
        self.out.write_all(&payload)?;
        Ok(self.out)
    }
}

impl<W: Write> Write for FramedEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let take = buf.len().min(FRAME * BATCH - self.pending.len());
        self.pending.extend_from_slice(&buf[..take]);
        if self.pending.len() == FRAME * BATCH {
            self.compress_pending(false)?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Where each frame of a framed stream is: frame `i` holds plain bytes `[i * FRAME, ...)` and
/// compressed bytes `[starts[i], starts[i + 1])`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeekTable {
    starts: Vec<u64>,
}

impl SeekTable {
    /// The length of the table's frame at the end of a stream, from its last 4 bytes.
    pub fn tail_len(last4: [u8; 4]) -> u64 {
        u64::from(u32::from_le_bytes(last4))
    }

    /// The table in `tail` (the last [`SeekTable::tail_len`] bytes of a stream of
    /// `stream_len` bytes); None when it is not one, or does not add up.
    pub fn parse(tail: &[u8], stream_len: u64) -> Option<SeekTable> {
        let word = |at: usize| -> Option<u32> { Some(u32::from_le_bytes(tail.get(at..at + 4)?.try_into().ok()?)) };
        let long = |at: usize| -> Option<u64> { Some(u64::from_le_bytes(tail.get(at..at + 8)?.try_into().ok()?)) };
        if word(0)? != SKIPPABLE || u64::from(word(4)?) + 8 != tail.len() as u64 || tail.get(8..16)? != TAG {
            return None;
        }
        let (frame, count) = (long(16)?, long(24)?);
        if frame != FRAME as u64 || tail.len() as u64 != 8 + 8 + 16 + 4 * count + 4 {
            return None;
        }
        let mut starts = Vec::with_capacity(count as usize + 1);
        let mut at = 0u64;
        for i in 0..count as usize {
            starts.push(at);
            at += u64::from(word(32 + 4 * i)?);
        }
        starts.push(at);
        (at + tail.len() as u64 == stream_len).then_some(SeekTable { starts })
    }

    pub fn frames(&self) -> usize {
        self.starts.len() - 1
    }

    /// The compressed bytes of frame `i`.
    pub fn range(&self, i: usize) -> std::ops::Range<u64> {
        self.starts[i]..self.starts[i + 1]
    }
}

/// Decodes one frame: at most [`FRAME`] plain bytes.
pub fn decode_frame(compressed: &[u8]) -> std::io::Result<Vec<u8>> {
    zstd::bulk::decompress(compressed, FRAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| ((i / 4096) as u8).wrapping_mul(31) ^ (i as u8 & 0x0f)).collect()
    }

    fn encode(input: &[u8]) -> Vec<u8> {
        let mut z = FramedEncoder::new(Vec::new(), 3);
        for piece in input.chunks(300_001) {
            z.write_all(piece).unwrap();
        }
        z.finish().unwrap()
    }

    fn table(stream: &[u8]) -> Option<SeekTable> {
        let n = SeekTable::tail_len(stream[stream.len() - 4..].try_into().unwrap()) as usize;
        SeekTable::parse(&stream[stream.len().checked_sub(n)?..], stream.len() as u64)
    }

    #[test]
    fn any_zstd_decoder_reads_the_stream_whole_and_each_frame_decodes_alone() {
        for len in [0, 1, FRAME - 1, FRAME, 3 * FRAME + 5, 17 * FRAME + 4096] {
            let input = data(len);
            let stream = encode(&input);
            assert_eq!(zstd::decode_all(stream.as_slice()).unwrap(), input, "len {len}");
            let t = table(&stream).expect("a seek table");
            assert_eq!(t.frames(), len.div_ceil(FRAME), "len {len}");
            for i in 0..t.frames() {
                let r = t.range(i);
                let plain = decode_frame(&stream[r.start as usize..r.end as usize]).unwrap();
                let from = i * FRAME;
                assert_eq!(plain, input[from..(from + FRAME).min(len)], "frame {i} of len {len}");
            }
        }
    }

    #[test]
    fn a_stream_without_a_table_or_with_a_table_that_does_not_add_up_has_none() {
        let plain = zstd::encode_all(data(FRAME * 2).as_slice(), 3).unwrap();
        assert!(table(&plain).is_none(), "an old single-frame stream");
        let mut stream = encode(&data(FRAME * 2));
        // One more byte before the table: the sizes no longer add up to the stream.
        stream.insert(0, 0);
        assert!(table(&stream).is_none());
        let mut stream = encode(&data(FRAME * 2));
        let n = stream.len();
        stream[n - 10] ^= 1;
        assert!(table(&stream).is_none(), "a changed size");
    }
}
