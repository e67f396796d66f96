//! The bytes of one changelog entry: a version byte, whether the entry resets the namespace,
//! then the keys written (with their values) and deleted, all applied together.

use super::Writes;

pub(super) fn encode(reset: bool, writes: &[(Vec<u8>, Option<Vec<u8>>)]) -> Vec<u8> {
    let size: usize = writes
        .iter()
        .map(|(k, v)| 9 + k.len() + v.as_ref().map_or(0, Vec::len))
        .sum();
    let mut out = Vec::with_capacity(6 + size);
    out.push(1);
    out.push(u8::from(reset));
    out.extend_from_slice(&(writes.len() as u32).to_be_bytes());
    for (k, v) in writes {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
        match v {
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                out.extend_from_slice(v);
            }
            None => out.push(0),
        }
    }
    out
}

pub(super) fn decode(mut b: &[u8]) -> Option<(bool, Writes)> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (b.get(..n)?, b.get(n..)?);
        *b = rest;
        Some(head)
    }
    fn u32_of(b: &mut &[u8]) -> Option<usize> {
        Some(u32::from_be_bytes(take(b, 4)?.try_into().ok()?) as usize)
    }
    let head = take(&mut b, 2)?;
    if head[0] != 1 {
        return None;
    }
    let n = u32_of(&mut b)?;
    let mut writes = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let klen = u32_of(&mut b)?;
        let key = take(&mut b, klen)?.to_vec();
        let value = match take(&mut b, 1)?[0] {
            0 => None,
            _ => {
                let vlen = u32_of(&mut b)?;
                Some(take(&mut b, vlen)?.to_vec())
            }
        };
        writes.push((key, value));
    }
    b.is_empty().then_some((head[1] == 1, writes))
}
