//! `weir plugin new NAME --lang rust|python|js` (a plugin project that builds and passes its
//! test as generated) and `weir plugin build [PATH]` (a component of the `weir:plugin/consumer`
//! world, installing the language's build tool, pinned, where it is missing).
//!
//! Rust plugins build with cargo for wasm32-wasip2 (`rust.rs`); Python plugins with
//! componentize-py in a project-local venv, JavaScript plugins with componentize-qjs (QuickJS)
//! in the project's node_modules (`script.rs`). A project's language is read off its files:
//! `Cargo.toml`, `package.json`, `app.py`.

mod rust;
mod script;

use std::path::{Path, PathBuf};
use std::process::Command;

/// A plugin project's language.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    /// A Rust crate using weir-sdk.
    Rust,
    /// A Python module using weir_plugin.py, built with componentize-py.
    Python,
    /// A JavaScript module using weir-plugin.js, built with componentize-qjs.
    Js,
}

/// Files of a project being generated.
pub(super) struct Files {
    root: PathBuf,
}

impl Files {
    fn write(&self, rel: &str, text: &str) -> anyhow::Result<()> {
        let path = self.root.join(rel);
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        std::fs::write(&path, text)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
    }
}

/// The sample input every template ships (`weir test app --input input.jsonl`).
const SAMPLE_INPUT: &str = include_str!("../../../templates/input.jsonl");

/// Creates `dir/name`: a consumer that counts records per key, its native unit test and a
/// sample input. `sdk` (Rust only) overrides the weir-sdk path dependency.
pub(super) fn new_plugin(
    name: &str,
    dir: &Path,
    lang: Lang,
    sdk: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    weir_core::validate_topic_name(name)
        .map_err(|e| anyhow::anyhow!("invalid plugin name: {}", e.replace("topic name", "name")))?;
    anyhow::ensure!(
        name.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) && !name.contains('.'),
        "a plugin name starts with a letter and has no '.': {name:?}"
    );
    anyhow::ensure!(
        sdk.is_none() || lang == Lang::Rust,
        "--sdk is for Rust plugins; Python and JavaScript projects get this weir's SDK file"
    );
    let root = dir.join(name);
    anyhow::ensure!(!root.exists(), "{} already exists", root.display());
    let files = Files { root: root.clone() };
    files.write("input.jsonl", SAMPLE_INPUT)?;
    match lang {
        Lang::Rust => rust::write_crate(name, &files, sdk)?,
        Lang::Python => script::write_python(name, &files)?,
        Lang::Js => script::write_js(name, &files)?,
    }
    Ok(root)
}

/// What to run after `weir plugin new` in a project of `lang`.
pub(super) fn next_steps(lang: Lang, root: &Path) -> String {
    let test = match lang {
        Lang::Rust => "cargo test",
        Lang::Python => "python3 -m unittest",
        Lang::Js => "node --test",
    };
    format!("cd {} && {test} && weir plugin build", root.display())
}

/// What to run after `weir plugin build`: try it locally, then deploy it.
pub(super) fn after_build(project: &Path, wasm: &Path) -> String {
    let name = project
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "NAME".into());
    let shown = wasm
        .strip_prefix(project)
        .unwrap_or(wasm)
        .display()
        .to_string();
    let input = if project.join("input.jsonl").exists() {
        "input.jsonl"
    } else {
        "FILE.jsonl"
    };
    format!(
        "next: weir test {shown} --input {input}\n\
         then: weir plugin deploy {name} --wasm {shown} --input TOPIC --output TOPIC..."
    )
}

/// The language of the project at `path`.
pub(super) fn detect(path: &Path) -> anyhow::Result<Lang> {
    if path.join("Cargo.toml").exists() {
        Ok(Lang::Rust)
    } else if path.join("package.json").exists() {
        Ok(Lang::Js)
    } else if path.join("app.py").exists() {
        Ok(Lang::Python)
    } else {
        anyhow::bail!(
            "{} has no Cargo.toml, package.json or app.py, so it is not a plugin project \
             (create one with `weir plugin new NAME --lang rust|python|js`)",
            path.display()
        )
    }
}

/// Builds the plugin project at `path`; returns the component.
pub(super) fn build_plugin(path: &Path) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(path.is_dir(), "{} is not a directory", path.display());
    match detect(path)? {
        Lang::Rust => rust::build(path),
        Lang::Python => script::build_python(path),
        Lang::Js => script::build_js(path),
    }
}

/// Runs a build step, failing with `what` when it cannot start or exits unsuccessfully (its
/// own output has already gone to the terminal).
fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("{what}: cannot run {program}: {e}"))?;
    anyhow::ensure!(
        status.success(),
        "{what} failed ({status}; see the output above)"
    );
    Ok(())
}
