//! A writer for PyTorch's zip serialization (`torch.save` of a state_dict), in pure Rust.
//!
//! burn-store reads `.pt` but cannot write it. This module writes what `torch.save(sd, path)`
//! writes under PyTorch 2.15 (checked by listing one: `tests/gen/model/check_export_in_torch.py`
//! loads our output with `torch.load(weights_only=True)`):
//!
//! - a zip of *stored* (uncompressed) entries under one top-level folder named after the file
//!   stem (`best_model/…`), in torch's order: `data.pkl`, `.format_version` (`1`),
//!   `.storage_alignment` (`64`), `byteorder` (`little`), `data/0` … `data/N-1` (one raw
//!   little-endian storage per tensor), `version` (`3\n`), `.data/serialization_id`;
//! - every entry's data starts on a 64-byte boundary: the local header carries an extra field
//!   with id `FB` padded with `Z`s, as torch's miniz writer does;
//! - local headers have general-purpose flags 0x0808 (UTF-8 names, sizes in a data descriptor
//!   after the data), a zip64 end-of-central-directory record and locator precede the classic
//!   end record — again as torch writes them;
//! - `data.pkl` is pickle protocol 2 of an `OrderedDict` mapping each name to
//!   `torch._utils._rebuild_tensor_v2((persistent id ('storage', torch.<T>Storage, key, 'cpu',
//!   numel)), 0, size, stride, False, OrderedDict())`, memoised the way Python's pickler does.
//!
//! Offsets and sizes are 32-bit (no zip64 extra fields), so an archive is limited to 4 GiB;
//! the whole-human model is 205 MB.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use burn::store::burn_pack::Tensor as PackTensor;
use burn::tensor::DType;

/// Storage data alignment torch uses inside the zip (`.storage_alignment`).
pub const STORAGE_ALIGNMENT: u64 = 64;
const MAX_ZIP32: u64 = u32::MAX as u64;

/// Where a tensor's bytes come from.
pub enum PtData {
    /// A (lazy) tensor collected from a burn module: bytes are drawn when written.
    Pack(PackTensor),
    /// Bytes already in memory (little-endian).
    Bytes(Vec<u8>),
}

/// One state_dict entry.
pub struct PtTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: PtData,
}

impl PtTensor {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn take_bytes(self) -> io::Result<Vec<u8>> {
        let name = self.name;
        match self.data {
            PtData::Bytes(b) => Ok(b),
            PtData::Pack(t) => {
                t.into_bytes().map(|b| b.to_vec()).map_err(|e| io::Error::other(format!("cannot read tensor `{name}`: {e}")))
            }
        }
    }
}

/// The torch storage class for a dtype.
pub fn storage_class(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F32 => "FloatStorage",
        DType::F64 => "DoubleStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::I64 => "LongStorage",
        DType::I32 => "IntStorage",
        DType::U8 => "ByteStorage",
        _ => return None,
    })
}

/// Row-major (contiguous) strides.
fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// Pickle protocol 2 opcodes used here.
mod op {
    pub const PROTO: u8 = 0x80;
    pub const GLOBAL: u8 = b'c';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const TUPLE: u8 = b't';
    pub const MARK: u8 = b'(';
    pub const REDUCE: u8 = b'R';
    pub const BINUNICODE: u8 = b'X';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const BININT: u8 = b'J';
    pub const LONG1: u8 = 0x8a;
    pub const NEWFALSE: u8 = 0x89;
    pub const BINPERSID: u8 = b'Q';
    pub const SETITEM: u8 = b's';
    pub const SETITEMS: u8 = b'u';
    pub const STOP: u8 = b'.';
}

/// A minimal protocol-2 pickler with Python's memoisation pattern: every string, tuple and
/// REDUCE result is `BINPUT`; globals and the constant strings `'storage'`/`'cpu'` are written
/// once and fetched with `BINGET` afterwards.
struct Pickler {
    out: Vec<u8>,
    next_memo: u32,
    memo: HashMap<String, u32>,
}

impl Pickler {
    fn new() -> Self {
        Self { out: vec![op::PROTO, 2], next_memo: 0, memo: HashMap::new() }
    }

    fn put(&mut self) -> u32 {
        let i = self.next_memo;
        if i < 256 {
            self.out.extend([op::BINPUT, i as u8]);
        } else {
            self.out.push(op::LONG_BINPUT);
            self.out.extend(i.to_le_bytes());
        }
        self.next_memo += 1;
        i
    }

    fn get(&mut self, i: u32) {
        if i < 256 {
            self.out.extend([op::BINGET, i as u8]);
        } else {
            self.out.push(op::LONG_BINGET);
            self.out.extend(i.to_le_bytes());
        }
    }

    fn memoised(&mut self, key: &str, write: impl FnOnce(&mut Self)) {
        if let Some(&i) = self.memo.get(key) {
            self.get(i);
        } else {
            write(self);
            let i = self.put();
            self.memo.insert(key.to_string(), i);
        }
    }

    fn global(&mut self, module: &str, name: &str) {
        self.memoised(&format!("global:{module}.{name}"), |p| {
            p.out.push(op::GLOBAL);
            p.out.extend(module.as_bytes());
            p.out.push(b'\n');
            p.out.extend(name.as_bytes());
            p.out.push(b'\n');
        });
    }

    fn raw_str(&mut self, s: &str) {
        self.out.push(op::BINUNICODE);
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend(s.as_bytes());
    }

    /// A fresh string object (memoised under a new index, never shared).
    fn str(&mut self, s: &str) {
        self.raw_str(s);
        self.put();
    }

    /// A string constant shared by every tensor (`'storage'`, `'cpu'`).
    fn const_str(&mut self, s: &str) {
        self.memoised(&format!("str:{s}"), |p| p.raw_str(s));
    }

    fn int(&mut self, v: u64) {
        if v <= 0xff {
            self.out.extend([op::BININT1, v as u8]);
        } else if v <= 0xffff {
            self.out.push(op::BININT2);
            self.out.extend((v as u16).to_le_bytes());
        } else if v <= i32::MAX as u64 {
            self.out.push(op::BININT);
            self.out.extend((v as i32).to_le_bytes());
        } else {
            // LONG1: little-endian two's complement, minimal length with a clear sign bit.
            let mut bytes = v.to_le_bytes().to_vec();
            while bytes.len() > 1 && bytes[bytes.len() - 1] == 0 && bytes[bytes.len() - 2] < 0x80 {
                bytes.pop();
            }
            if bytes[bytes.len() - 1] >= 0x80 {
                bytes.push(0);
            }
            self.out.extend([op::LONG1, bytes.len() as u8]);
            self.out.extend(bytes);
        }
    }

    fn int_tuple(&mut self, v: &[usize]) {
        match v.len() {
            0 => {
                self.out.push(op::EMPTY_TUPLE);
                return;
            }
            1..=3 => {
                for &x in v {
                    self.int(x as u64);
                }
                self.out.push([op::TUPLE1, op::TUPLE2, op::TUPLE3][v.len() - 1]);
            }
            _ => {
                self.out.push(op::MARK);
                for &x in v {
                    self.int(x as u64);
                }
                self.out.push(op::TUPLE);
            }
        }
        self.put();
    }

    /// `_rebuild_tensor_v2(persistent storage, 0, size, stride, False, OrderedDict())`.
    fn tensor(&mut self, storage: &str, key: usize, numel: usize, shape: &[usize]) {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(op::MARK);
        self.out.push(op::MARK);
        self.const_str("storage");
        self.global("torch", storage);
        self.str(&key.to_string());
        self.const_str("cpu");
        self.int(numel as u64);
        self.out.push(op::TUPLE);
        self.put();
        self.out.push(op::BINPERSID);
        self.int(0); // storage offset
        self.int_tuple(shape);
        self.int_tuple(&contiguous_strides(shape));
        self.out.push(op::NEWFALSE); // requires_grad
        self.global("collections", "OrderedDict"); // backward hooks: OrderedDict()
        self.out.push(op::EMPTY_TUPLE);
        self.out.push(op::REDUCE);
        self.put();
        self.out.push(op::TUPLE);
        self.put();
        self.out.push(op::REDUCE);
        self.put();
    }
}

/// The `data.pkl` of a state_dict with these (name, storage class, numel, shape) entries; the
/// storage keys are `0..n` in order.
pub fn state_dict_pickle(entries: &[(&str, &str, usize, &[usize])]) -> Vec<u8> {
    let mut p = Pickler::new();
    p.global("collections", "OrderedDict");
    p.out.push(op::EMPTY_TUPLE);
    p.out.push(op::REDUCE);
    p.put();
    // Python's _batch_setitems: batches of 1000, a lone item as SETITEM.
    for (b, batch) in entries.chunks(1000).enumerate() {
        if batch.len() > 1 {
            p.out.push(op::MARK);
        }
        for (i, (name, storage, numel, shape)) in batch.iter().enumerate() {
            p.str(name);
            p.tensor(storage, b * 1000 + i, *numel, shape);
        }
        p.out.push(if batch.len() > 1 { op::SETITEMS } else { op::SETITEM });
    }
    p.out.push(op::STOP);
    p.out
}

const fn crc32_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC_TABLE: [u32; 256] = crc32_table();

/// CRC-32 (IEEE, as zip uses it).
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

struct CentralEntry {
    name: String,
    crc: u32,
    size: u32,
    offset: u32,
}

/// Streams stored zip entries in torch's layout.
struct ZipWriter<W: Write> {
    w: W,
    pos: u64,
    entries: Vec<CentralEntry>,
}

fn too_large() -> io::Error {
    io::Error::other("the archive would exceed 4 GiB, which this writer does not support")
}

impl<W: Write> ZipWriter<W> {
    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn entry(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let offset = self.pos;
        let header_end = offset + 30 + name.len() as u64 + 4;
        let pad = (STORAGE_ALIGNMENT - header_end % STORAGE_ALIGNMENT) % STORAGE_ALIGNMENT;
        if header_end + pad + data.len() as u64 + 16 > MAX_ZIP32 {
            return Err(too_large());
        }
        let crc = crc32(data);
        let mut h = Vec::with_capacity(34 + name.len() + pad as usize);
        h.extend(0x0403_4b50u32.to_le_bytes());
        h.extend(0u16.to_le_bytes()); // version needed (torch/miniz writes 0)
        h.extend(0x0808u16.to_le_bytes()); // UTF-8 names + data descriptor
        h.extend(0u16.to_le_bytes()); // stored
        h.extend(0u16.to_le_bytes()); // time
        h.extend(0u16.to_le_bytes()); // date
        h.extend(0u32.to_le_bytes()); // crc (in the descriptor)
        h.extend(0u32.to_le_bytes()); // compressed size
        h.extend(0u32.to_le_bytes()); // uncompressed size
        h.extend((name.len() as u16).to_le_bytes());
        h.extend(((4 + pad) as u16).to_le_bytes());
        h.extend(name.as_bytes());
        h.extend(b"FB");
        h.extend((pad as u16).to_le_bytes());
        h.extend(std::iter::repeat_n(b'Z', pad as usize));
        self.write_all(&h)?;
        self.write_all(data)?;
        let mut d = Vec::with_capacity(16);
        d.extend(0x0807_4b50u32.to_le_bytes());
        d.extend(crc.to_le_bytes());
        d.extend((data.len() as u32).to_le_bytes());
        d.extend((data.len() as u32).to_le_bytes());
        self.write_all(&d)?;
        self.entries.push(CentralEntry { name: name.to_string(), crc, size: data.len() as u32, offset: offset as u32 });
        Ok(())
    }

    fn finish(mut self) -> io::Result<W> {
        let cd_start = self.pos;
        let entries = std::mem::take(&mut self.entries);
        for e in &entries {
            let mut c = Vec::with_capacity(46 + e.name.len());
            c.extend(0x0201_4b50u32.to_le_bytes());
            c.extend(0u16.to_le_bytes()); // version made by
            c.extend(0u16.to_le_bytes()); // version needed
            c.extend(0x0808u16.to_le_bytes());
            c.extend(0u16.to_le_bytes()); // stored
            c.extend(0u16.to_le_bytes()); // time
            c.extend(0u16.to_le_bytes()); // date
            c.extend(e.crc.to_le_bytes());
            c.extend(e.size.to_le_bytes());
            c.extend(e.size.to_le_bytes());
            c.extend((e.name.len() as u16).to_le_bytes());
            c.extend(0u16.to_le_bytes()); // extra
            c.extend(0u16.to_le_bytes()); // comment
            c.extend(0u16.to_le_bytes()); // disk
            c.extend(0u16.to_le_bytes()); // internal attributes
            c.extend(0u32.to_le_bytes()); // external attributes
            c.extend(e.offset.to_le_bytes());
            c.extend(e.name.as_bytes());
            self.write_all(&c)?;
        }
        let cd_size = self.pos - cd_start;
        let zip64_eocd = self.pos;
        if zip64_eocd + 56 + 20 + 22 > MAX_ZIP32 {
            return Err(too_large());
        }
        let n = entries.len() as u64;
        let mut t = Vec::with_capacity(98);
        // zip64 end of central directory record
        t.extend(0x0606_4b50u32.to_le_bytes());
        t.extend(44u64.to_le_bytes());
        t.extend(0x031eu16.to_le_bytes()); // made by
        t.extend(45u16.to_le_bytes()); // needed
        t.extend(0u32.to_le_bytes());
        t.extend(0u32.to_le_bytes());
        t.extend(n.to_le_bytes());
        t.extend(n.to_le_bytes());
        t.extend(cd_size.to_le_bytes());
        t.extend(cd_start.to_le_bytes());
        // zip64 end of central directory locator
        t.extend(0x0706_4b50u32.to_le_bytes());
        t.extend(0u32.to_le_bytes());
        t.extend(zip64_eocd.to_le_bytes());
        t.extend(1u32.to_le_bytes());
        // end of central directory
        t.extend(0x0605_4b50u32.to_le_bytes());
        t.extend(0u16.to_le_bytes());
        t.extend(0u16.to_le_bytes());
        t.extend((n as u16).to_le_bytes());
        t.extend((n as u16).to_le_bytes());
        t.extend((cd_size as u32).to_le_bytes());
        t.extend((cd_start as u32).to_le_bytes());
        t.extend(0u16.to_le_bytes());
        self.write_all(&t)?;
        Ok(self.w)
    }
}

/// Writes `tensors` as a `torch.save`d OrderedDict state_dict to `path` (not atomically: the
/// caller writes to a temporary path and renames). The archive folder is the file stem.
pub fn write_state_dict(path: &Path, tensors: Vec<PtTensor>) -> io::Result<()> {
    let stem = path.file_stem().and_then(|s| s.to_str()).filter(|s| !s.is_empty() && s.is_ascii() && !s.contains('/')).unwrap_or("archive");
    let mut entries: Vec<(&str, &'static str, usize, &[usize])> = Vec::new();
    for t in &tensors {
        let class = storage_class(t.dtype)
            .ok_or_else(|| io::Error::other(format!("tensor `{}`: dtype {:?} has no torch storage", t.name, t.dtype)))?;
        entries.push((&t.name, class, t.numel(), &t.shape));
    }
    let pickle = state_dict_pickle(&entries);
    let file = File::create(path)?;
    let mut z = ZipWriter { w: BufWriter::with_capacity(1 << 20, file), pos: 0, entries: Vec::new() };
    z.entry(&format!("{stem}/data.pkl"), &pickle)?;
    z.entry(&format!("{stem}/.format_version"), b"1")?;
    z.entry(&format!("{stem}/.storage_alignment"), b"64")?;
    z.entry(&format!("{stem}/byteorder"), b"little")?;
    // A serialization id derived from the content (torch uses a random one): 40 digits.
    let mut id_src = crc32(&pickle) as u64;
    for (i, t) in tensors.into_iter().enumerate() {
        let (name, dtype, numel) = (t.name.clone(), t.dtype, t.numel());
        let bytes = t.take_bytes()?;
        let want = numel * dtype.size();
        if bytes.len() != want {
            return Err(io::Error::other(format!("tensor `{name}`: {} bytes of data, expected {want}", bytes.len())));
        }
        id_src = id_src.rotate_left(7) ^ crc32(&bytes) as u64;
        z.entry(&format!("{stem}/data/{i}"), &bytes)?;
    }
    z.entry(&format!("{stem}/version"), b"3\n")?;
    let id = format!("{:020}{:020}", id_src % 10u64.pow(19), id_src.wrapping_mul(0x9E37_79B9_7F4A_7C15) % 10u64.pow(19));
    z.entry(&format!("{stem}/.data/serialization_id"), id.as_bytes())?;
    let mut w = z.finish()?;
    w.flush()?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_known_values() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        // torch's own `version` entry ("3\n") and `byteorder` ("little") in a torch 2.15 file.
        assert_eq!(crc32(b"3\n"), 0x5567_9ed1);
        assert_eq!(crc32(b"little"), 0x19e3_3d85);
    }

    /// The pickle of torch 2.15's `torch.save(OrderedDict(a.weight=arange(6).reshape(2,3),
    /// b.bias=ones(3), bn.num_batches_tracked=tensor(0), c.scalar=tensor(1.5)))`, byte for byte.
    #[test]
    fn pickle_matches_torch_byte_for_byte() {
        let torch: &[u8] = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(X\x08\x00\x00\x00a.weightq\x02ctorch._utils\n_rebuild_tensor_v2\nq\x03((X\x07\x00\x00\x00storageq\x04ctorch\nFloatStorage\nq\x05X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K\x06tq\x08QK\x00K\x02K\x03\x86q\tK\x03K\x01\x86q\n\x89h\x00)Rq\x0btq\x0cRq\rX\x06\x00\x00\x00b.biasq\x0eh\x03((h\x04h\x05X\x01\x00\x00\x001q\x0fh\x07K\x03tq\x10QK\x00K\x03\x85q\x11K\x01\x85q\x12\x89h\x00)Rq\x13tq\x14Rq\x15X\x16\x00\x00\x00bn.num_batches_trackedq\x16h\x03((h\x04ctorch\nLongStorage\nq\x17X\x01\x00\x00\x002q\x18h\x07K\x01tq\x19QK\x00))\x89h\x00)Rq\x1atq\x1bRq\x1cX\x08\x00\x00\x00c.scalarq\x1dh\x03((h\x04h\x05X\x01\x00\x00\x003q\x1eh\x07K\x01tq\x1fQK\x00))\x89h\x00)Rq tq!Rq\"u.";
        let ours = state_dict_pickle(&[
            ("a.weight", "FloatStorage", 6, &[2, 3]),
            ("b.bias", "FloatStorage", 3, &[3]),
            ("bn.num_batches_tracked", "LongStorage", 1, &[]),
            ("c.scalar", "FloatStorage", 1, &[]),
        ]);
        assert_eq!(ours, torch);
    }

    #[test]
    fn large_ints_use_wider_opcodes() {
        let mut p = Pickler::new();
        p.int(300);
        p.int(31_076_864); // 60697 × 512
        p.int(1 << 31);
        assert_eq!(
            &p.out[2..],
            &[
                op::BININT2,
                0x2c,
                0x01, //
                op::BININT,
                0x00,
                0x32,
                0xda,
                0x01, //
                op::LONG1,
                5,
                0,
                0,
                0,
                0x80,
                0
            ]
        );
    }
}
