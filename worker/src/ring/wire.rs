//! The wire format: call headers, and floats sent straight from memory, little-endian.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::ops::Range;

/// Bytes of a call header: op, root (or 0), length, sequence number.
pub(super) const HEADER: usize = 24;
/// Most buffers one vectored read or write hands the kernel (Linux's IOV_MAX).
const MAX_IOV: usize = 1024;

// Floats go on the wire in memory order, and the wire format is little-endian.
#[cfg(target_endian = "big")]
compile_error!("worker::ring assumes a little-endian host");

/// Which collective a call is (the header's first field).
#[derive(Clone, Copy, Debug)]
#[rustfmt::skip]
pub(super) enum Op { AllReduce = 1, Broadcast = 2, ReduceScatter = 3, AllGather = 4 }

/// Shut both sockets: the threads blocked on them, and the neighbours, fail at once.
pub(super) fn shut(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

/// `e` with what was being done when it happened.
pub(super) fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Send `blocks` back to back, straight from their memory (vectored writes, no copy).
pub(super) fn send_floats(s: &TcpStream, header: Option<&[u8; HEADER]>, blocks: &[&[f32]]) -> io::Result<()> {
    let mut slices: Vec<IoSlice> = header.map(|h| IoSlice::new(h)).into_iter().collect();
    slices.extend(blocks.iter().filter(|b| !b.is_empty()).map(|b| IoSlice::new(bytes_of(b))));
    write_all_vectored(s, &mut slices)
}

pub(super) fn write_all_vectored(s: &TcpStream, slices: &mut [IoSlice]) -> io::Result<()> {
    let mut rest = slices;
    while !rest.is_empty() {
        let k = rest.len().min(MAX_IOV);
        match (&*s).write_vectored(&rest[..k]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub(super) fn bytes_of(x: &[f32]) -> &[u8] {
    bytemuck::cast_slice(x)
}

pub(super) fn bytes_of_mut(x: &mut [f32]) -> &mut [u8] {
    bytemuck::cast_slice_mut(x)
}

pub(super) fn encode_header(op: Op, aux: usize, len: usize, seq: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&(op as u32).to_le_bytes());
    h[4..8].copy_from_slice(&(aux as u32).to_le_bytes());
    h[8..16].copy_from_slice(&(len as u64).to_le_bytes());
    h[16..].copy_from_slice(&seq.to_le_bytes());
    h
}

pub(super) fn check_header(mut s: &TcpStream, expect: &[u8; HEADER]) -> io::Result<()> {
    let mut got = [0u8; HEADER];
    s.read_exact(&mut got)?;
    if &got == expect {
        return Ok(());
    }
    let field = |h: &[u8; HEADER], r: Range<usize>| h[r].iter().rev().fold(0u64, |a, &b| a << 8 | b as u64);
    let show = |h: &[u8; HEADER]| {
        format!("op {} root {} len {} call #{}", field(h, 0..4), field(h, 4..8), field(h, 8..16), field(h, 16..24))
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("left neighbour is in a different collective ({}) than this rank ({})", show(&got), show(expect)),
    ))
}
