//! Where plugins run on a cluster: lease spreading when a node joins, each plugin on the node
//! rendezvous hashing prefers (the rest of cluster mode's plugin tests are in
//! cluster_plugins.rs).

use crate::cluster_plugins::{two_nodes, wait_listed};
use crate::common;

use std::time::Duration;

use common::WeirProcess;

/// Plugin → (node id, its address) for each plugin `weir plugin list` says runs somewhere.
fn runners(listed: &str) -> std::collections::BTreeMap<String, (String, String)> {
    let mut out = std::collections::BTreeMap::new();
    let mut plugin = None;
    for line in listed.lines() {
        if !line.starts_with(' ') {
            plugin = line.split(" v").next().map(str::to_string);
        } else if let Some(rest) = line.trim_start().strip_prefix("runs on node ") {
            if let (Some(p), Some((id, addr))) = (&plugin, rest.split_once(" (")) {
                out.insert(
                    p.clone(),
                    (id.to_string(), addr.trim_end_matches(')').to_string()),
                );
            }
        }
    }
    out
}

/// The id of the node at `addr` (new at every start): a probe plugin deployed through it runs
/// there first (then it is removed).
fn node_id(addr: &str, noop: &str) -> String {
    let port = addr.rsplit(':').next().unwrap();
    let probe = format!("probe-{port}");
    common::cli_ok(
        addr,
        &[
            "plugin",
            "deploy",
            &probe,
            "--wasm",
            noop,
            "--input",
            "order.paid",
        ],
        "",
    );
    let bare = addr.replace("http://", "");
    let listed = wait_listed(addr, "the probe runs where it was deployed", |l| {
        runners(l).get(&probe).is_some_and(|(_, a)| *a == bare)
    });
    common::cli_ok(addr, &["plugin", "remove", &probe], "");
    runners(&listed)[&probe].0.clone()
}

/// The node the cluster prefers for `plugin` among `live` (id → address), by the rule the
/// nodes follow (rendezvous hashing).
fn preferred(live: &[(&str, &str)], plugin: &str) -> String {
    let view = weir_plugins::cluster::View {
        live: live
            .iter()
            .map(|(id, addr)| (id.to_string(), addr.to_string()))
            .collect(),
        leases: Default::default(),
        kafka: Default::default(),
    };
    view.preferred(plugin).unwrap().to_string()
}

/// Whether each of `names` runs on its preferred node among `live`.
fn placed(listed: &str, names: &[String], live: &[(&str, &str)]) -> bool {
    let runs = runners(listed);
    names
        .iter()
        .all(|n| runs.get(n).is_some_and(|(id, _)| *id == preferred(live, n)))
}

/// Paid orders `from..to` of users ann, bob and cy as `weir publish --json` lines, each with
/// the id `o<n>`.
fn numbered_orders(from: u64, to: u64) -> (String, Vec<(u64, &'static str, u64)>) {
    let users = ["ann", "bob", "cy"];
    let list: Vec<(u64, &str, u64)> = (from..to)
        .map(|n| (n, users[(n % 3) as usize], 1 + n % 7))
        .collect();
    let lines = list
        .iter()
        .map(|(n, user, amount)| {
            format!("{{\"key\":\"{user}\",\"id\":\"o{n}\",\"value\":{{\"order\":{n},\"user\":\"{user}\",\"amount\":{amount}}}}}\n")
        })
        .collect();
    (lines, list)
}

/// Lease spreading when a node joins (issue 21, item 11): three plugins on two nodes, each on
/// the node the cluster prefers for it (both run some); a third node joins and, within 30 s,
/// runs the plugins it is preferred for (at least one: a joining node whose random id wins
/// none is replaced by another, so the test always sees a hand-over), each plugin then on its
/// preferred node of the three. Orders published before, during and after the hand-overs
/// (some twice) are counted once by every plugin: exact balances, one credit per distinct
/// order in each plugin's topic.
#[test]
fn plugins_spread_to_a_node_that_joins() {
    let (dir, _nats, a, b) = two_nodes();
    let urls = _nats.url_list();
    let points = dir.path().join("points.wasm");
    let noop = dir.path().join("noop.wasm");
    std::fs::write(&noop, common::plugin_wasm("noop")).unwrap();
    let (points, noop) = (points.to_str().unwrap(), noop.to_str().unwrap());
    common::cli_ok(
        &a.addr,
        &["topic", "create", "order.paid", "--partitions", "2"],
        "",
    );
    let bare = |addr: &str| addr.replace("http://", "");
    let (a_id, b_id) = (node_id(&a.addr, noop), node_id(&b.addr, noop));
    let (a_bare, b_bare) = (bare(&a.addr), bare(&b.addr));
    let two = [
        (a_id.as_str(), a_bare.as_str()),
        (b_id.as_str(), b_bare.as_str()),
    ];
    // Three names the two nodes share: one preferring each, and one more; each won with a
    // rank in the lower 70 % of the range, so a joining node outranks both for at least one
    // of them with a fair chance (a name two nodes both rank near the top keeps a third off).
    let modest = |n: &str| {
        let top = two
            .iter()
            .map(|(id, _)| weir_plugins::cluster::rank(id, n))
            .max()
            .unwrap();
        top < u64::MAX / 10 * 7
    };
    let mut names: Vec<String> = Vec::new();
    for want in [Some(&a_id), Some(&b_id), None] {
        let name = (0..)
            .map(|n| format!("pts{n}"))
            .find(|n| {
                !names.contains(n) && modest(n) && want.is_none_or(|w| preferred(&two, n) == *w)
            })
            .unwrap();
        names.push(name);
    }
    for name in &names {
        let output = format!("credited.{name}");
        common::cli_ok(&a.addr, &["topic", "create", &output], "");
        common::cli_ok(
            &a.addr,
            &[
                "plugin",
                "deploy",
                name,
                "--wasm",
                points,
                "--input",
                "order.paid",
                "--output",
                &output,
                "--config",
                &format!("output={output}"),
            ],
            "",
        );
    }
    let (first, mut published) = numbered_orders(0, 30);
    common::cli_ok(&b.addr, &["publish", "order.paid", "--json"], &first);
    // Deployed through A, they run there; after the minimum hold (10 s) B takes its own.
    let started = std::time::Instant::now();
    let listed = wait_listed(&a.addr, "each plugin on its preferred node of two", |l| {
        placed(l, &names, &two)
    });
    println!(
        "spread over two nodes after {:?}:\n{listed}",
        started.elapsed()
    );

    // A third node joins: one whose id wins at least one of the names (another start gets a
    // new id).
    let mut joins = 0;
    let (c, c_id, joined) = loop {
        joins += 1;
        let joined = std::time::Instant::now();
        let c = WeirProcess::spawn(
            &dir.path().join(format!("c{joins}")),
            "127.0.0.1:0",
            &["--log", &urls],
        );
        let c_id = node_id(&c.addr, noop);
        let c_bare = bare(&c.addr);
        let three = [two[0], two[1], (c_id.as_str(), c_bare.as_str())];
        if names.iter().any(|n| preferred(&three, n) == c_id) {
            break (c, c_id, joined);
        }
        assert!(
            joins < 12,
            "12 joining nodes in a row preferred for none of {names:?}"
        );
        drop(c);
        // Its heartbeat ages out before the next one joins.
        std::thread::sleep(Duration::from_secs(5));
    };
    let c_bare = bare(&c.addr);
    let three = [two[0], two[1], (c_id.as_str(), c_bare.as_str())];
    let (during, more) = numbered_orders(30, 60);
    published.extend(more);
    common::cli_ok(&c.addr, &["publish", "order.paid", "--json"], &during);
    // Duplicates of orders already counted, through the new node.
    common::cli_ok(&c.addr, &["publish", "order.paid", "--json"], &first);
    let listed = wait_listed(&c.addr, "each plugin on its preferred node of three", |l| {
        placed(l, &names, &three)
    });
    let took = joined.elapsed();
    let on_c: Vec<&String> = names
        .iter()
        .filter(|n| runners(&listed).get(*n).is_some_and(|(id, _)| *id == c_id))
        .collect();
    println!("node {joins} to join ({c_id}) runs {on_c:?} {took:?} after joining:\n{listed}");
    assert!(
        !on_c.is_empty() && took < Duration::from_secs(30),
        "{listed}"
    );
    let (after, more) = numbered_orders(60, 90);
    published.extend(more);
    common::cli_ok(&a.addr, &["publish", "order.paid", "--json"], &after);
    common::cli_ok(&b.addr, &["publish", "order.paid", "--json"], &during);

    // Exact results through every node.
    let mut balances = std::collections::BTreeMap::new();
    for (_, user, amount) in &published {
        *balances.entry(*user).or_insert(0u64) += amount;
    }
    for name in &names {
        for (user, want) in &balances {
            let key = format!("balance/{user}");
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let (found, out, _) = common::weir_cli(&c.addr, &["state", "get", name, &key], "");
                if found && out.starts_with(&format!("{want} ")) {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{name}'s {key} is {out:?}, want {want}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let credited = common::cli_ok(
            &a.addr,
            &[
                "consume",
                &format!("credited.{name}"),
                "--from",
                "earliest",
                "--idle-ms",
                "1500",
            ],
            "",
        );
        let orders: std::collections::BTreeSet<&str> = credited
            .lines()
            .filter_map(|l| l.split("\"order\":").nth(1))
            .map(|rest| rest.split([',', '}']).next().unwrap())
            .collect();
        assert_eq!(
            (credited.lines().count(), orders.len()),
            (published.len(), published.len()),
            "one credit per distinct order from {name}:\n{credited}"
        );
    }
    drop(c);
}
