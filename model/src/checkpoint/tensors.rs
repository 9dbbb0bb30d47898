//! Safetensors file I/O: f32 tensors written atomically, and any float tensor read back as f32
//! (widened from f16 / bf16), with errors that name the file and the tensor.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView, View};

use super::save::sync_dir;
use crate::error::{Error, Result};

// Tensors are written as their in-memory bytes and read by copying bytes into typed buffers;
// safetensors data is little-endian, so this holds on little-endian hosts only.
#[cfg(target_endian = "big")]
compile_error!("model::checkpoint reads and writes tensor memory as little-endian bytes");

/// Write F32 tensors to a safetensors file atomically (temp file, fsync, rename).
pub fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<()> {
    let name = path.file_name().ok_or_else(|| Error::input(path, "not a file name"))?;
    let tmp = path.with_file_name(format!("{}.tmp", name.to_string_lossy()));
    write_safetensors(&tmp, tensors)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

/// A tensor read from a file: name, shape, values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// Every floating-point tensor of a safetensors file as f32, sorted by name. Integer tensors
/// (token ids in golden fixtures) are skipped: read them with `read_i32_tensor`.
pub fn read_tensors(path: &Path) -> Result<Vec<NamedTensor>> {
    let map = map_file(path)?;
    let st = parse(path, &map)?;
    let mut out = Vec::new();
    for (name, view) in sorted(&st) {
        if matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            let mut data = vec![0.0; view.shape().iter().product()];
            widen(path, &name, &view, &mut data)?;
            out.push((name, view.shape().to_vec(), data));
        }
    }
    Ok(out)
}

/// One integer tensor (I32, or I64 as PyTorch writes ids) as i32.
pub fn read_i32_tensor(path: &Path, name: &str) -> Result<(Vec<usize>, Vec<i32>)> {
    let map = map_file(path)?;
    let st = parse(path, &map)?;
    let view = st.tensor(name).map_err(|_| Error::input(path, format!("missing tensor `{name}`")))?;
    let data = match view.dtype() {
        Dtype::I32 => {
            let mut v = vec![0; view.data().len() / 4];
            copy_unaligned(view.data(), &mut v);
            v
        }
        Dtype::I64 => view
            .data()
            .chunks_exact(8)
            .map(|b| {
                let x: i64 = bytemuck::pod_read_unaligned(b);
                i32::try_from(x)
                    .map_err(|_| Error::input(path, format!("tensor `{name}` holds {x}, beyond the i32 range")))
            })
            .collect::<Result<Vec<i32>>>()?,
        d => {
            return Err(Error::input(path, format!("tensor `{name}` has dtype {d:?}; expected I32 or I64")));
        }
    };
    Ok((view.shape().to_vec(), data))
}

// ---- helpers ----

/// (shape, values) of one tensor to write.
struct F32View<'a>(Vec<usize>, &'a [f32]);

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.0
    }
    fn data(&self) -> Cow<'_, [u8]> {
        // The values' own memory: no copy while writing.
        Cow::Borrowed(bytemuck::cast_slice(self.1))
    }
    fn data_len(&self) -> usize {
        self.1.len() * 4
    }
}

pub(super) fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<()> {
    let mut seen = HashSet::new();
    for (name, shape, data) in tensors {
        if shape.iter().product::<usize>() != data.len() || !seen.insert(name.as_str()) {
            return Err(Error::Other(format!(
                "{}: tensor `{name}` is duplicated or its shape {shape:?} does not hold {} values",
                path.display(),
                data.len()
            )));
        }
    }
    let views = tensors.iter().map(|(n, s, d)| (n.as_str(), F32View(s.clone(), d)));
    let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| Error::Other(format!("{}: cannot write safetensors: {e}", path.display())))?;
    // The crate writes through a tempfile, which is created 0600; a model is meant to be read
    // by other users (serving, evaluation), like the config next to it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(|e| Error::io(path, e))?;
    }
    File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io(path, e))
}

pub(super) fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    // A regular file only: opening a FIFO would block, and a shard name comes from a file.
    let file = crate::data::open_regular(path)?;
    // SAFETY: the map is read-only and lives only while we copy tensors out of it. Another
    // process truncating the file meanwhile could fault us; our own writers never do it (they
    // write a temp file and rename it over), which is the usual contract for safetensors.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

pub(super) fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| Error::input(path, format!("not a valid safetensors file: {}", safetensors_error(&e))))
}

/// What went wrong reading a safetensors file, without quoting its header: the crate's JSON
/// errors can contain the file's strings, and messages must not echo what a file holds.
pub fn safetensors_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::InvalidHeaderDeserialization(j) | E::JsonError(j) => {
            format!("header is not valid JSON of the expected shape (line {}, column {})", j.line(), j.column())
        }
        E::InvalidHeader(_) => "header is not UTF-8".to_owned(),
        E::HeaderTooLarge => "header length is too large".to_owned(),
        E::HeaderTooSmall | E::InvalidHeaderLength => "header length does not fit the file".to_owned(),
        E::InvalidOffset(_) | E::TensorInvalidInfo | E::MisalignedSlice | E::ValidationOverflow => {
            "a tensor's offsets do not match its shape and dtype".to_owned()
        }
        E::MetadataIncompleteBuffer => "the data is shorter than the header says".to_owned(),
        other => format!("{:?}", std::mem::discriminant(other)),
    }
}

pub(super) fn sorted<'a>(st: &SafeTensors<'a>) -> Vec<(String, TensorView<'a>)> {
    let mut t = st.tensors();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

pub(super) fn check_shape(path: &Path, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got == want {
        return Ok(());
    }
    Err(Error::input(path, format!("tensor `{name}` has shape {got:?}, expected {want:?}")))
}

/// Copy a float tensor into `out` as f32 (shape already checked, so the lengths agree).
pub(super) fn widen(path: &Path, name: &str, view: &TensorView, out: &mut [f32]) -> Result<()> {
    let b = view.data();
    match view.dtype() {
        Dtype::F32 => copy_unaligned(b, out),
        Dtype::F16 => decode(b, out, |c| half::f16::from_le_bytes(c).to_f32()),
        Dtype::BF16 => decode(b, out, |c| half::bf16::from_le_bytes(c).to_f32()),
        d => {
            let msg = format!("tensor `{name}` has dtype {d:?}; expected F32, F16 or BF16");
            return Err(Error::input(path, msg));
        }
    }
    Ok(())
}

/// Fill `out` with the elements whose bytes are `bytes`. A file's tensor data may sit at any
/// offset of the map, so the bytes are copied into `out`'s (aligned) memory rather than cast.
fn copy_unaligned<T: bytemuck::Pod>(bytes: &[u8], out: &mut [T]) {
    let dst = bytemuck::cast_slice_mut::<T, u8>(out);
    dst.copy_from_slice(&bytes[..dst.len()]);
}

/// Little-endian elements of `N` bytes, converted one by one (the data may be unaligned).
fn decode<const N: usize, T>(bytes: &[u8], out: &mut [T], f: impl Fn([u8; N]) -> T) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(N)) {
        *o = f(c.try_into().expect("chunk of N bytes"));
    }
}
