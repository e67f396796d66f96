//! The stable hashes weir stores or agrees on across nodes: FNV-1a 64 (the key partitioner,
//! message-id hashes, subject tokens) and the rendezvous rank that places things on nodes.
//! Both are fixed across versions and platforms: stored hashes and the placements of nodes
//! of one build must not move.

/// 64-bit FNV-1a of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// How strongly `node` is preferred for `item` (rendezvous hashing: the live node with the
/// highest rank takes it, so a node joining or leaving moves only what it wins or held).
/// FNV-1a of the pair, then a full-avalanche finish (splitmix64's): FNV alone orders nodes
/// nearly alike for names that differ in their last characters (`pts0`, `pts1`).
pub fn rendezvous_rank(node: &str, item: &str) -> u64 {
    let mut z = fnv1a(format!("{node}\u{0}{item}").as_bytes());
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fnv1a_is_the_published_function() {
        // FNV-1a 64 test vectors (Fowler/Noll/Vo): "" and "a".
        assert_eq!(super::fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
