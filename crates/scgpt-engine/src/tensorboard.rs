//! TensorBoard event-file writer for scalar (and text) metrics.
//!
//! Hand-rolled rather than pulling in a protobuf stack: the handful of `Event` fields TensorBoard
//! needs for scalars are a few bytes of varint and length-delimited encoding, and a dependency on
//! prost/tensorboard-rs would cost far more build time than this file.
//!
//! File layout: a sequence of TFRecord frames
//! `u64 len (LE) | u32 masked_crc(len bytes) | payload | u32 masked_crc(payload)`,
//! each payload a serialized `tensorflow.Event`. The first record carries
//! `file_version = "brain.Event:2"`; TensorBoard uses it to decide how to detect restarts (see
//! [`EventWriter::session_start`]). Without it, TensorBoard falls back to purging any tag whose
//! step goes backwards, which silently drops data when tags are logged at different cadences.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

const FILE_VERSION: &str = "brain.Event:2";

// Field tags (field number << 3 | wire type) of the messages in tensorflow/core/util/event.proto,
// summary.proto and tensor.proto that we emit; numbers checked against the descriptors shipped in
// the tensorboard Python package (tensorboard.compat.proto).
mod tag {
    // Event
    pub const WALL_TIME: u8 = 1 << 3 | 1; // double
    pub const STEP: u8 = 2 << 3; // int64
    pub const FILE_VERSION: u8 = 3 << 3 | 2; // string
    pub const SUMMARY: u8 = 5 << 3 | 2; // Summary
    pub const SESSION_LOG: u8 = 7 << 3 | 2; // SessionLog (6 is the deprecated log_message)

    // SessionLog
    pub const SESSION_STATUS: u8 = 1 << 3; // enum

    // Summary
    pub const VALUE: u8 = 1 << 3 | 2; // repeated Summary.Value

    // Summary.Value
    pub const TAG: u8 = 1 << 3 | 2; // string
    pub const SIMPLE_VALUE: u8 = 2 << 3 | 5; // float
    pub const TENSOR: u8 = 8 << 3 | 2; // TensorProto
    pub const METADATA: u8 = 9 << 3 | 2; // SummaryMetadata

    // SummaryMetadata
    pub const PLUGIN_DATA: u8 = 1 << 3 | 2; // PluginData

    // PluginData
    pub const PLUGIN_NAME: u8 = 1 << 3 | 2; // string

    // TensorProto
    pub const DTYPE: u8 = 1 << 3; // enum DataType
    pub const TENSOR_SHAPE: u8 = 2 << 3 | 2; // TensorShapeProto
    pub const STRING_VAL: u8 = 8 << 3 | 2; // repeated bytes
}

const SESSION_LOG_START: u64 = 1;
const DT_STRING: u64 = 7;

/// Writes one TensorBoard event file. Every logging call flushes, so a crash loses at most the
/// record being written, and TensorBoard (which tails the file) sees each point as it is logged.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `<dir>/events.out.tfevents.<unix secs>.<hostname>.<pid>.scgpt` (dir created if
    /// missing), writes the file_version record, flushes.
    ///
    /// If that name is taken (a second writer in the same process within the same second), the
    /// timestamp is bumped rather than a suffix added: TensorBoard reads a run's files in sorted
    /// name order, and a bumped timestamp still sorts after the earlier file, which keeps a
    /// resumed run's [`session_start`](Self::session_start) after the data it supersedes.
    pub fn create(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating TensorBoard log dir {}", dir.display()))?;
        let host = hostname();
        let pid = std::process::id();
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut attempt = 0u64;
        let (file, path) = loop {
            let path = dir.join(format!("events.out.tfevents.{}.{host}.{pid}.scgpt", secs + attempt));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == ErrorKind::AlreadyExists && attempt < 10_000 => attempt += 1,
                Err(e) => return Err(e).with_context(|| format!("creating TensorBoard event file {}", path.display())),
            }
        };
        let mut w = EventWriter { out: BufWriter::new(file), path };
        let mut ev = event_header(now(), 0);
        put_bytes(&mut ev, tag::FILE_VERSION, FILE_VERSION.as_bytes());
        w.write_event(&ev)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One scalar at a step (wall time = now).
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> Result<()> {
        self.scalars(step, &[(tag, value)])
    }

    /// Several scalars at one step, in one Event.
    ///
    /// TensorBoard stores scalars as f32: values are rounded to f32, those beyond its range
    /// become ±inf, and NaN/inf are written as-is (TensorBoard plots them as such).
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let mut summary = Vec::new();
        for &(name, value) in values {
            let mut v = Vec::with_capacity(name.len() + 8);
            put_bytes(&mut v, tag::TAG, name.as_bytes());
            v.push(tag::SIMPLE_VALUE);
            v.extend_from_slice(&(value as f32).to_le_bytes());
            put_bytes(&mut summary, tag::VALUE, &v);
        }
        self.write_summary(step, &summary)
    }

    /// A text summary (TensorBoard's Text tab renders it as Markdown): e.g. the run's config.
    pub fn text(&mut self, tag: &str, step: u64, text: &str) -> Result<()> {
        let mut plugin = Vec::new();
        put_bytes(&mut plugin, tag::PLUGIN_NAME, b"text");
        let mut metadata = Vec::new();
        put_bytes(&mut metadata, tag::PLUGIN_DATA, &plugin);

        // A scalar (rank-0) DT_STRING tensor; the empty shape message is what makes it rank 0.
        let mut tensor = Vec::new();
        tensor.push(tag::DTYPE);
        put_varint(&mut tensor, DT_STRING);
        put_bytes(&mut tensor, tag::TENSOR_SHAPE, &[]);
        put_bytes(&mut tensor, tag::STRING_VAL, text.as_bytes());

        let mut v = Vec::new();
        put_bytes(&mut v, tag::TAG, tag.as_bytes());
        put_bytes(&mut v, tag::TENSOR, &tensor);
        put_bytes(&mut v, tag::METADATA, &metadata);
        let mut summary = Vec::new();
        put_bytes(&mut summary, tag::VALUE, &v);
        self.write_summary(step, &summary)
    }

    /// Marks a (re)start at `step`: TensorBoard then discards every point it has read so far, from
    /// this run's earlier event files, at steps >= `step`. Call it after resuming from a
    /// checkpoint taken at `step`, so the steps the crashed run logged past its last checkpoint
    /// do not show up next to the redone ones.
    pub fn session_start(&mut self, step: u64) -> Result<()> {
        let mut log = vec![tag::SESSION_STATUS];
        put_varint(&mut log, SESSION_LOG_START);
        let mut ev = event_header(now(), step);
        put_bytes(&mut ev, tag::SESSION_LOG, &log);
        self.write_event(&ev)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().with_context(|| format!("flushing TensorBoard event file {}", self.path.display()))
    }

    fn write_summary(&mut self, step: u64, summary: &[u8]) -> Result<()> {
        let mut ev = event_header(now(), step);
        put_bytes(&mut ev, tag::SUMMARY, summary);
        self.write_event(&ev)
    }

    fn write_event(&mut self, payload: &[u8]) -> Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 16);
        encode_record(&mut frame, payload);
        self.out.write_all(&frame).with_context(|| format!("writing TensorBoard event file {}", self.path.display()))?;
        self.flush()
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        // Nothing useful to do with an error during drop; explicit `flush` reports them.
        let _ = self.out.flush();
    }
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn event_header(wall_time: f64, step: u64) -> Vec<u8> {
    let mut ev = Vec::with_capacity(64);
    ev.push(tag::WALL_TIME);
    ev.extend_from_slice(&wall_time.to_le_bytes());
    ev.push(tag::STEP);
    put_varint(&mut ev, step);
    ev
}

/// The hostname goes into the file name so runs written from several machines into one shared
/// log dir do not collide; it is sanitised because it ends up in a path.
fn hostname() -> String {
    let raw = fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let clean: String =
        raw.trim().chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' }).collect();
    if clean.is_empty() {
        "localhost".to_string()
    } else {
        clean
    }
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_bytes(buf: &mut Vec<u8>, field_tag: u8, bytes: &[u8]) {
    buf.push(field_tag);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// TFRecord masks its CRCs because a CRC of data that itself contains CRCs is weak.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn encode_record(buf: &mut Vec<u8>, payload: &[u8]) {
    let len = (payload.len() as u64).to_le_bytes();
    buf.extend_from_slice(&len);
    buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
    buf.extend_from_slice(payload);
    buf.extend_from_slice(&masked_crc(payload).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits a tfevents file into payloads, checking both CRCs of every frame.
    fn read_records(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(len_crc, masked_crc(len_bytes), "length crc at byte {at}");
            let payload = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(payload), "payload crc at byte {at}");
            out.push(payload.to_vec());
            at += 16 + len;
        }
        assert_eq!(at, bytes.len(), "trailing partial frame");
        out
    }

    #[derive(Debug, PartialEq)]
    enum Field {
        Varint(u64),
        Fixed64([u8; 8]),
        Bytes(Vec<u8>),
        Fixed32([u8; 4]),
    }

    fn get_varint(buf: &[u8], at: &mut usize) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = buf[*at];
            *at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return v;
            }
            shift += 7;
            assert!(shift < 64, "varint too long");
        }
    }

    /// Generic protobuf decode into (field number, value), in wire order.
    fn fields(buf: &[u8]) -> Vec<(u64, Field)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < buf.len() {
            let key = get_varint(buf, &mut at);
            let f = match key & 7 {
                0 => Field::Varint(get_varint(buf, &mut at)),
                1 => {
                    at += 8;
                    Field::Fixed64(buf[at - 8..at].try_into().unwrap())
                }
                2 => {
                    let n = get_varint(buf, &mut at) as usize;
                    at += n;
                    Field::Bytes(buf[at - n..at].to_vec())
                }
                5 => {
                    at += 4;
                    Field::Fixed32(buf[at - 4..at].try_into().unwrap())
                }
                w => panic!("unexpected wire type {w}"),
            };
            out.push((key >> 3, f));
        }
        assert_eq!(at, buf.len());
        out
    }

    fn get(fs: &[(u64, Field)], num: u64) -> Vec<&Field> {
        fs.iter().filter(|(n, _)| *n == num).map(|(_, f)| f).collect()
    }

    fn bytes(f: &Field) -> &[u8] {
        match f {
            Field::Bytes(b) => b,
            other => panic!("expected bytes, got {other:?}"),
        }
    }

    /// (wall_time, step, [(tag, value)]) of a scalar Event.
    fn decode_scalars(payload: &[u8]) -> (f64, u64, Vec<(String, f32)>) {
        let ev = fields(payload);
        let wall = match get(&ev, 1)[..] {
            [Field::Fixed64(b)] => f64::from_le_bytes(*b),
            ref o => panic!("wall_time: {o:?}"),
        };
        let step = match get(&ev, 2)[..] {
            [Field::Varint(s)] => *s,
            ref o => panic!("step: {o:?}"),
        };
        let summary = fields(bytes(get(&ev, 5)[0]));
        let values = get(&summary, 1)
            .into_iter()
            .map(|v| {
                let v = fields(bytes(v));
                let tag = String::from_utf8(bytes(get(&v, 1)[0]).to_vec()).unwrap();
                let value = match get(&v, 2)[..] {
                    [Field::Fixed32(b)] => f32::from_le_bytes(*b),
                    ref o => panic!("simple_value: {o:?}"),
                };
                (tag, value)
            })
            .collect();
        (wall, step, values)
    }

    #[test]
    fn masked_crc_known_answer() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        // From tensorboard.compat.tensorflow_stub.pywrap_tensorflow.masked_crc32c(b"123456789").
        assert_eq!(masked_crc(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn varint_encoding() {
        let enc = |v: u64| {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            b
        };
        assert_eq!(enc(0), [0x00]);
        assert_eq!(enc(1), [0x01]);
        assert_eq!(enc(127), [0x7f]);
        assert_eq!(enc(128), [0x80, 0x01]);
        assert_eq!(enc(300), [0xac, 0x02]);
        assert_eq!(enc(16_383), [0xff, 0x7f]);
        assert_eq!(enc(16_384), [0x80, 0x80, 0x01]);
        assert_eq!(enc(u64::MAX), [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        for v in [0, 1, 127, 128, 300, 1 << 35, u64::MAX - 1, u64::MAX] {
            let b = enc(v);
            let mut at = 0;
            assert_eq!(get_varint(&b, &mut at), v);
            assert_eq!(at, b.len());
        }
    }

    #[test]
    fn frame_layout() {
        let mut buf = Vec::new();
        encode_record(&mut buf, b"abc");
        assert_eq!(buf.len(), 8 + 4 + 3 + 4);
        assert_eq!(&buf[..8], &3u64.to_le_bytes());
        assert_eq!(&buf[12..15], b"abc");
        assert_eq!(read_records(&buf), vec![b"abc".to_vec()]);
    }

    #[test]
    fn records_parse_back() {
        let dir = std::env::temp_dir().join(format!("scgpt-tb-unit-{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = fs::remove_dir_all(&dir);
        let before = now();
        let path = {
            let mut w = EventWriter::create(&dir).unwrap();
            w.scalar("loss", 0, 0.1).unwrap();
            w.scalars(300, &[("a", 1e-8), ("b/c", f64::NAN), ("d", f64::INFINITY), ("e", 1e300)]).unwrap();
            w.text("config", 7, "lr = 1e-4").unwrap();
            w.session_start(5).unwrap();
            w.path().to_path_buf()
        };
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("events.out.tfevents.") && name.ends_with(".scgpt"), "{name}");
        assert!(name.contains(&format!(".{}.scgpt", std::process::id())), "{name}");

        let recs = read_records(&fs::read(&path).unwrap());
        assert_eq!(recs.len(), 5);

        let first = fields(&recs[0]);
        assert_eq!(bytes(get(&first, 3)[0]), b"brain.Event:2");

        let (wall, step, vals) = decode_scalars(&recs[1]);
        assert!(wall >= before.floor() && wall <= now() + 1.0, "wall_time {wall}");
        assert_eq!(step, 0);
        assert_eq!(vals, vec![("loss".to_string(), 0.1f32)]);

        let (_, step, vals) = decode_scalars(&recs[2]);
        assert_eq!(step, 300);
        let tags: Vec<&str> = vals.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(tags, ["a", "b/c", "d", "e"]);
        assert_eq!(vals[0].1, 1e-8f32);
        assert!(vals[1].1.is_nan());
        assert_eq!(vals[2].1, f32::INFINITY);
        assert_eq!(vals[3].1, f32::INFINITY);

        let ev = fields(&recs[3]);
        assert_eq!(get(&ev, 2), [&Field::Varint(7)]);
        let v = fields(bytes(get(&fields(bytes(get(&ev, 5)[0])), 1)[0]));
        assert_eq!(bytes(get(&v, 1)[0]), b"config");
        let plugin = fields(bytes(get(&fields(bytes(get(&v, 9)[0])), 1)[0]));
        assert_eq!(bytes(get(&plugin, 1)[0]), b"text");
        let tensor = fields(bytes(get(&v, 8)[0]));
        assert_eq!(get(&tensor, 1), [&Field::Varint(DT_STRING)]);
        assert_eq!(bytes(get(&tensor, 8)[0]), b"lr = 1e-4");

        let ev = fields(&recs[4]);
        assert_eq!(get(&ev, 2), [&Field::Varint(5)]);
        assert_eq!(fields(bytes(get(&ev, 7)[0])), [(1, Field::Varint(SESSION_LOG_START))]);

        // A second writer in the same second must not clobber the first file and must sort after.
        let w2 = EventWriter::create(&dir).unwrap();
        assert_ne!(w2.path(), path);
        assert!(w2.path() > path.as_path());
        drop(w2);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn create_error_names_the_path() {
        let file = std::env::temp_dir().join(format!("scgpt-tb-notadir-{}", std::process::id()));
        fs::write(&file, b"x").unwrap();
        let err = EventWriter::create(&file.join("sub")).err().expect("dir under a file must fail");
        assert!(format!("{err:#}").contains(&file.display().to_string()), "{err:#}");
        fs::remove_file(&file).unwrap();
    }
}
