//! TensorBoard event files (`events.out.tfevents.*`) with scalar summaries, written without TensorFlow.
//!
//! Format facts (TensorFlow's record_writer / event.proto): each record is `u64 length (LE)`,
//! `u32 masked_crc32c(length bytes)`, the data, `u32 masked_crc32c(data)`; masked crc =
//! ((crc >> 15) | (crc << 17)) + 0xa282ead8 with CRC-32C (Castagnoli). The data is an `Event` protobuf:
//! wall_time = 1 (double), step = 2 (int64), file_version = 3 (string), summary = 5 (Summary); a Summary holds
//! repeated value = 1 (Value: tag = 1 string, simple_value = 2 float).

use std::io::Write;
use std::path::{Path, PathBuf};

fn crc32c_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    for (i, e) in t.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0x82f6_3b78 ^ (c >> 1) } else { c >> 1 };
        }
        *e = c;
    }
    t
}

pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(crc32c_table);
    let mut c = !0u32;
    for &b in data {
        c = t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

fn masked(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut x: u64, out: &mut Vec<u8>) {
    while x >= 0x80 {
        out.push((x as u8) | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

fn field_bytes(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn event(wall: f64, step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = vec![0x09];
    e.extend_from_slice(&wall.to_le_bytes());
    e.push(0x10);
    varint(step as u64, &mut e);
    body(&mut e);
    e
}

pub struct EventWriter {
    file: std::fs::File,
    pub path: PathBuf,
}

impl EventWriter {
    pub fn create(dir: &Path) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{}.{}.{}", now.as_secs(), host.trim(), std::process::id()));
        let file = std::fs::File::create(&path)?;
        let mut w = EventWriter { file, path };
        let first = event(now.as_secs_f64(), 0, |e| field_bytes(3, b"brain.Event:2", e));
        w.record(&first)?;
        Ok(w)
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked(data).to_le_bytes());
        self.file.write_all(&buf)?;
        self.file.flush()
    }

    /// Writes scalars `(tag, value)` at `step`.
    pub fn scalars(&mut self, step: i64, values: &[(String, f64)]) -> std::io::Result<()> {
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let mut summary = vec![];
        for (tag, v) in values {
            let mut val = vec![];
            field_bytes(1, tag.as_bytes(), &mut val);
            val.push(0x15);
            val.extend_from_slice(&(*v as f32).to_le_bytes());
            field_bytes(1, &val, &mut summary);
        }
        let e = event(wall, step, |e| field_bytes(5, &summary, e));
        self.record(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_of_the_standard_check_string() {
        // CRC-32C check value (RFC 3720 appendix B.4 / the usual "123456789" check)
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn records_frame_and_checksum_correctly() {
        let d = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(d.path()).unwrap();
        w.scalars(7, &[("train/loss".into(), 1.5)]).unwrap();
        let bytes = std::fs::read(&w.path).unwrap();
        let mut off = 0;
        let mut n = 0;
        while off < bytes.len() {
            let len = u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(bytes[off + 8..off + 12].try_into().unwrap()), masked(&bytes[off..off + 8]));
            let data = &bytes[off + 12..off + 12 + len];
            assert_eq!(u32::from_le_bytes(bytes[off + 12 + len..off + 16 + len].try_into().unwrap()), masked(data));
            off += 16 + len;
            n += 1;
            if n == 2 {
                // the scalar event carries its tag and the value as a little-endian f32 after field 2's key
                let tag_at = data.windows(10).position(|w| w == b"train/loss").unwrap();
                assert_eq!(data[tag_at + 10], 0x15);
                assert_eq!(f32::from_le_bytes(data[tag_at + 11..tag_at + 15].try_into().unwrap()), 1.5);
            }
        }
        assert_eq!(n, 2);
    }
}
