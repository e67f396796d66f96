//! `cargo xtask check`: the architecture's invariants as checks that fail the build when broken
//! (ARCHITECTURE.md names each): which crate may depend on which (workspace crates and the
//! third-party crates that define a layer: sled, wasmtime, tonic/prost), no import cycles
//! between the top-level modules of a crate, and no source file over 500 lines without the
//! reason at its top. `cargo xtask test` runs it first.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Workspace crates and the workspace crates each may depend on (normal and build
/// dependencies; tests may use anything).
const ALLOWED: &[(&str, &[&str])] = &[
    ("weir-codec", &[]),
    ("weir-sdk-macros", &[]),
    ("weir-sdk", &["weir-codec", "weir-sdk-macros"]),
    ("weir-core", &[]),
    ("weir-metrics", &[]),
    ("weir-log", &["weir-core", "weir-metrics"]),
    ("weir-jetstream", &["weir-core", "weir-log"]),
    ("weir-cluster", &[]),
    ("weir-broker", &["weir-core", "weir-log", "weir-metrics"]),
    ("weir-kafka", &["weir-broker", "weir-core"]),
    ("weir-wasm", &[]),
    (
        "weir-plugins",
        &[
            "weir-codec",
            "weir-core",
            "weir-log",
            "weir-metrics",
            "weir-wasm",
        ],
    ),
    ("weir-api", &["weir-core"]),
    (
        "weir-server",
        &[
            "weir-api",
            "weir-broker",
            "weir-core",
            "weir-jetstream",
            "weir-kafka",
            "weir-log",
            "weir-metrics",
            "weir-plugins",
            "weir-wasm",
        ],
    ),
    ("weir", &["weir-api", "weir-core", "weir-server"]),
    ("quickstart", &["weir-api"]),
    ("flash-sale", &["weir-api"]),
    // Plugins know the SDK alone.
    ("points", &["weir-sdk"]),
    ("red-envelope", &["weir-sdk"]),
    ("analytics-filter", &["weir-sdk"]),
    ("order", &["weir-sdk"]),
    ("chaos", &["weir-sdk"]),
    ("noop", &["weir-sdk"]),
    ("not-a-consumer", &[]),
    ("xtask", &["weir-cluster"]),
];

/// Third-party crates that belong to one layer: only these workspace crates may name them.
const OWNED: &[(&str, &[&str])] = &[
    ("sled", &["weir-log"]),
    ("wasmtime", &["weir-wasm"]),
    ("wasmtime-wasi", &["weir-wasm"]),
    ("wasmtime-wasi-io", &["weir-wasm"]),
    ("tonic", &["weir-api", "weir-server"]),
    ("tonic-prost", &["weir-api"]),
    ("tonic-prost-build", &["weir-api"]),
    ("prost", &["weir-api"]),
    ("async-nats", &["weir-jetstream"]),
    ("kafka-protocol", &["weir-kafka"]),
];

/// One package's declared dependencies: (name, kind) where kind is "normal", "build" or "dev".
pub type Deps = BTreeMap<String, Vec<(String, String)>>;

/// Reads the workspace's packages and their declared dependencies from `cargo metadata`.
pub fn workspace_deps() -> Result<Deps> {
    let out = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut deps = Deps::new();
    for p in meta["packages"].as_array().context("packages")? {
        let name = p["name"].as_str().context("name")?.to_string();
        let list = p["dependencies"]
            .as_array()
            .context("dependencies")?
            .iter()
            .map(|d| {
                let kind = d["kind"].as_str().unwrap_or("normal").to_string();
                (d["name"].as_str().unwrap_or_default().to_string(), kind)
            })
            .collect();
        deps.insert(name, list);
    }
    Ok(deps)
}

/// Every dependency that breaks a rule, as a sentence.
pub fn forbidden_edges(deps: &Deps) -> Vec<String> {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut broken = Vec::new();
    for (package, list) in deps {
        for (dep, kind) in list.iter().filter(|(_, k)| k != "dev") {
            if let Some(owners) = OWNED.iter().find(|(name, _)| name == dep).map(|(_, o)| o) {
                if !owners.contains(&package.as_str()) {
                    broken.push(format!(
                        "{package} depends on {dep} ({kind}); only {} may",
                        owners.join(", ")
                    ));
                }
            }
            if deps.contains_key(dep) {
                match allowed.get(package.as_str()) {
                    Some(ok) if ok.contains(&dep.as_str()) => {}
                    Some(ok) => broken.push(format!(
                        "{package} depends on {dep}; it may depend on [{}] only",
                        ok.join(", ")
                    )),
                    None => broken.push(format!(
                        "{package} is not in xtask's crate graph: add it to ALLOWED in xtask/src/check.rs and to ARCHITECTURE.md"
                    )),
                }
            }
        }
    }
    broken
}

/// Top-level modules of a crate's `src` and which of them each refers to (`crate::m`).
fn module_graph(src: &Path) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(src)? {
        let path = entry?.path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if matches!(name.as_str(), "lib" | "main") {
            continue;
        }
        let mut text = String::new();
        let files: Vec<std::path::PathBuf> = if path.is_dir() {
            rs_files(&path)?
        } else if path.extension().is_some_and(|e| e == "rs") {
            vec![path.clone()]
        } else {
            continue;
        };
        for f in files {
            text.push_str(&std::fs::read_to_string(&f)?);
        }
        let mut refs = crate_refs(&text);
        refs.remove(&name);
        graph.insert(name, refs);
    }
    let names: BTreeSet<String> = graph.keys().cloned().collect();
    for refs in graph.values_mut() {
        refs.retain(|r| names.contains(r));
    }
    Ok(graph)
}

/// The top-level modules a file's text names after `crate::`, grouped imports
/// (`use crate::{a, b::c}`) included.
pub fn crate_refs(text: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut refs = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + 7..];
        if let Some(group) = rest.strip_prefix('{') {
            // The names at the group's top level: after `{` and after each `,` at depth 0.
            let mut depth = 0;
            let mut start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if c.is_whitespace() => {}
                    _ if start => {
                        start = false;
                        refs.insert(ident(&group[j..]));
                    }
                    _ => {}
                }
            }
        } else {
            refs.insert(ident(rest));
        }
    }
    refs.remove("");
    refs
}

fn rs_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(rs_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(out)
}

/// A cycle among modules, if any: the modules on it.
pub fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(c) = visit(node, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

/// Runs every check; the error lists what is broken.
pub fn check() -> Result<()> {
    let mut broken = forbidden_edges(&workspace_deps()?);
    for krate in std::fs::read_dir("runtime")? {
        let src = krate?.path().join("src");
        if !src.is_dir() {
            continue;
        }
        if let Some(cycle) = find_cycle(&module_graph(&src)?) {
            broken.push(format!(
                "import cycle in {}: {}",
                src.display(),
                cycle.join(" → ")
            ));
        }
    }
    // Every Rust file of the project (generated and vendored ones live in ignored folders).
    for dir in [
        "runtime", "tests", "examples", "plugins", "sdk", "codec", "xtask",
    ] {
        if !Path::new(dir).is_dir() {
            continue;
        }
        for file in rs_files(Path::new(dir))? {
            if file.components().any(|c| {
                matches!(
                    c.as_os_str().to_str(),
                    Some("target" | "node_modules" | "vendor" | ".weir")
                )
            }) {
                continue;
            }
            let text = std::fs::read_to_string(&file)?;
            let head: String = text.lines().take(12).collect::<Vec<_>>().join("\n");
            if text.lines().count() > 500 && !head.contains("Over 500 lines") {
                broken.push(format!(
                    "{} has {} lines: split it, or say why at its top (\"Over 500 lines because ...\")",
                    file.display(),
                    text.lines().count()
                ));
            }
        }
    }
    if !broken.is_empty() {
        bail!(
            "the architecture's invariants are broken:\n  {}",
            broken.join("\n  ")
        );
    }
    eprintln!("architecture check: crate edges, module cycles and file sizes ok");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_imports_count_as_references() {
        let refs = crate_refs(
            "use crate::{tls, convert::{a, b}, statuses};\nfn f() { crate::monitor::run(); }",
        );
        let want: BTreeSet<String> = ["convert", "monitor", "statuses", "tls"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(refs, want);
    }

    fn deps(edges: &[(&str, &str, &str)]) -> Deps {
        let mut d = Deps::new();
        for name in ["weir-core", "weir-log", "weir-broker", "weir-api"] {
            d.insert(name.into(), Vec::new());
        }
        for (from, to, kind) in edges {
            d.get_mut(*from)
                .unwrap()
                .push((to.to_string(), kind.to_string()));
        }
        d
    }

    #[test]
    fn forbidden_edges_are_found_and_allowed_ones_pass() {
        let ok = deps(&[
            ("weir-log", "sled", "normal"),
            ("weir-broker", "weir-log", "normal"),
            ("weir-api", "tonic", "normal"),
            ("weir-broker", "tempfile", "dev"),
        ]);
        assert_eq!(forbidden_edges(&ok), Vec::<String>::new());
        let bad = deps(&[
            ("weir-broker", "sled", "normal"),
            ("weir-core", "weir-log", "normal"),
            ("weir-log", "tonic", "build"),
        ]);
        let broken = forbidden_edges(&bad);
        assert_eq!(broken.len(), 3, "{broken:?}");
        assert!(
            broken[0].contains("weir-broker depends on sled"),
            "{broken:?}"
        );
    }

    #[test]
    fn cycles_are_found() {
        let graph: BTreeMap<String, BTreeSet<String>> = [
            ("a", vec!["b"]),
            ("b", vec!["c"]),
            ("c", vec!["a"]),
            ("d", vec![]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
        .collect();
        assert_eq!(find_cycle(&graph).unwrap(), vec!["a", "b", "c", "a"]);
        let mut acyclic = graph.clone();
        acyclic.get_mut("c").unwrap().clear();
        assert_eq!(find_cycle(&acyclic), None);
    }

    #[test]
    fn this_workspace_keeps_its_invariants() {
        std::env::set_current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).unwrap();
        check().unwrap();
    }
}
