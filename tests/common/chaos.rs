//! What the chaos tests share: the seeded order of fault kinds, and the NATS paths weir nodes
//! are given (all servers, all but one, or a single one that a cycle freezes).

use rand::seq::SliceRandom;
use rand::Rng;

/// The kind of each of `cycles` cycles among `kinds` kinds: blocks of `kinds` cycles, each a
/// shuffle of every kind (so a default run meets every fault, in an order the seed decides).
pub fn cycle_kinds(rng: &mut impl Rng, cycles: usize, kinds: usize) -> Vec<usize> {
    let mut order = Vec::with_capacity(cycles + kinds);
    while order.len() < cycles {
        let mut block: Vec<usize> = (0..kinds).collect();
        block.shuffle(rng);
        order.extend(block);
    }
    order.truncate(cycles);
    order
}

/// The `--log` value naming every server of `nats` but `except`: a node that keeps serving
/// while that server is frozen (a client connected to a frozen server waits on it).
pub fn urls_except(nats: &weir_cluster::NatsCluster, except: usize) -> String {
    nats.nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != except)
        .map(|(_, n)| n.url())
        .collect::<Vec<_>>()
        .join(",")
}

/// How long a freeze of a nats-server lasts: alternately past the request timeout (10 s:
/// requests through the frozen path fail, and may land after the thaw) and between the
/// plugin lease timeout (4 s) and it (they may succeed late).
pub fn freeze_ms(rng: &mut impl Rng, nth: usize) -> u64 {
    if nth % 2 == 0 {
        rng.random_range(10_500..13_000)
    } else {
        rng.random_range(4_500..9_000)
    }
}
