//! Python and JavaScript plugins. Each project carries its copy of the SDK file (written by
//! `weir plugin new`, so the native unit tests import it without installing anything); the
//! build writes this weir's WIT world into `.weir/`, installs the pinned build tool into the
//! project (`.weir/venv` for componentize-py, `node_modules` for componentize-qjs) and writes
//! the component to `target/NAME.wasm`.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{run, Files};

/// componentize-py, pinned: the version the Python SDK and the tests were made with.
pub const COMPONENTIZE_PY: &str = "0.25.0";
/// componentize-qjs (QuickJS), pinned. Called directly rather than through jco: jco 1.34.0's
/// `--backend-qjs-disable-async` never reaches it (a misspelt option name), so its components
/// use the component-model async ABI, which weir does not run; jco 1.35.0's componentize
/// fails outright.
pub const COMPONENTIZE_QJS: &str = "0.4.5";

const WORLD: &str = include_str!("../../../../../sdk/wit/world.wit");
const PYTHON_SDK: &str = include_str!("../../../../../sdk/python/weir_plugin.py");
const JS_SDK: &str = include_str!("../../../../../sdk/js/weir-plugin.js");

const PY_APP: &str = include_str!("../../../templates/python/app.py");
const PY_TEST: &str = include_str!("../../../templates/python/test_app.py");
const PY_GITIGNORE: &str = include_str!("../../../templates/python/gitignore");
const JS_APP: &str = include_str!("../../../templates/js/app.js");
const JS_TEST: &str = include_str!("../../../templates/js/app.test.js");
const JS_PACKAGE: &str = include_str!("../../../templates/js/package.json");
const JS_GITIGNORE: &str = include_str!("../../../templates/js/gitignore");

fn fill(template: &str, name: &str) -> String {
    template
        .replace("{{name}}", name)
        .replace("{{componentize_qjs}}", COMPONENTIZE_QJS)
}

pub(super) fn write_python(name: &str, files: &Files) -> anyhow::Result<()> {
    files.write("app.py", &fill(PY_APP, name))?;
    files.write("test_app.py", &fill(PY_TEST, name))?;
    files.write("weir_plugin.py", PYTHON_SDK)?;
    files.write(".gitignore", PY_GITIGNORE)
}

pub(super) fn write_js(name: &str, files: &Files) -> anyhow::Result<()> {
    files.write("app.js", &fill(JS_APP, name))?;
    files.write("app.test.js", &fill(JS_TEST, name))?;
    files.write("weir-plugin.js", JS_SDK)?;
    files.write("package.json", &fill(JS_PACKAGE, name))?;
    files.write(".gitignore", JS_GITIGNORE)
}

/// Writes `.weir/wit/world.wit` (this weir's world, whatever SDK copy the project has) and
/// creates `target/`; returns `.weir`.
fn prepare(path: &Path) -> anyhow::Result<PathBuf> {
    let dot = path.join(".weir");
    std::fs::create_dir_all(dot.join("wit"))?;
    std::fs::create_dir_all(path.join("target"))?;
    std::fs::write(dot.join("wit/world.wit"), WORLD)?;
    Ok(dot)
}

/// Warns when the project's copy of the SDK is not this weir's (an older `weir plugin new`):
/// it may speak an older world.
fn check_sdk_copy(path: &Path, file: &str, ours: &str) {
    if let Ok(theirs) = std::fs::read_to_string(path.join(file)) {
        if theirs != ours {
            eprintln!(
                "warning: {} differs from this weir's SDK; if the build or the deploy fails, \
                 replace it with the one `weir plugin new` writes",
                path.join(file).display()
            );
        }
    }
}

/// The project directory's own name (for `path` = "." too).
fn dir_name(path: &Path) -> anyhow::Result<String> {
    let abs = path.canonicalize()?;
    let name = abs
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow::anyhow!("{} has no usable directory name", path.display()))?;
    Ok(name.replace('-', "_"))
}

/// Prints what a build step is doing (tool installs take a while the first time).
fn step(message: &str) {
    eprintln!("weir plugin build: {message}");
}

pub(super) fn build_python(path: &Path) -> anyhow::Result<PathBuf> {
    let dot = prepare(path)?;
    check_sdk_copy(path, "weir_plugin.py", PYTHON_SDK);
    let sdk = dot.join("sdk");
    std::fs::create_dir_all(&sdk)?;
    std::fs::write(sdk.join("weir_plugin.py"), PYTHON_SDK)?;

    let venv = dot.join("venv");
    let tool = venv.join("bin/componentize-py");
    let wanted = format!("componentize-py {COMPONENTIZE_PY}");
    let installed = Command::new(&tool)
        .arg("--version")
        .output()
        .ok()
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == wanted);
    if !installed {
        step(&format!("installing {wanted} into {}", venv.display()));
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        if !venv.join("bin/pip").exists() {
            run(
                Command::new(&python).arg("-m").arg("venv").arg(&venv),
                &format!(
                    "creating a Python venv with `{python} -m venv` (Python 3.10+ with its \
                     venv module is needed to build Python plugins)"
                ),
            )?;
        }
        run(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .arg(format!("componentize-py=={COMPONENTIZE_PY}")),
            &format!("pip install componentize-py=={COMPONENTIZE_PY}"),
        )?;
    }
    let wasm = path
        .join("target")
        .join(format!("{}.wasm", dir_name(path)?));
    step("componentize-py (about 15 s)");
    // The project's directory comes first on the module path, so its own copy of the SDK
    // wins; `.weir/sdk` serves projects that import it without a copy.
    run(
        Command::new(&tool)
            .arg("-d")
            .arg(dot.join("wit"))
            .args(["-w", "consumer", "componentize", "app", "-p"])
            .arg(path)
            .arg("-p")
            .arg(&sdk)
            .arg("-o")
            .arg(&wasm)
            // Only the plugin's own interfaces are imported: weir gives plugins no WASI.
            .arg("--stub-wasi"),
        "componentize-py",
    )?;
    Ok(wasm)
}

/// The `version` of an installed npm package, if any.
fn npm_version(path: &Path, package: &str) -> Option<String> {
    let text =
        std::fs::read_to_string(path.join("node_modules").join(package).join("package.json"))
            .ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json.get("version")?.as_str().map(str::to_string)
}

pub(super) fn build_js(path: &Path) -> anyhow::Result<PathBuf> {
    let dot = prepare(path)?;
    check_sdk_copy(path, "weir-plugin.js", JS_SDK);
    for file in ["app.js", "weir-plugin.js"] {
        anyhow::ensure!(
            path.join(file).exists(),
            "{} has no {file}: a JavaScript plugin is app.js, default-exporting \
             consumer((record, ctx) => ...) from weir-plugin.js, this weir's SDK file (`weir \
             plugin new NAME --lang js` writes both)",
            path.display()
        );
    }
    if npm_version(path, "componentize-qjs").as_deref() != Some(COMPONENTIZE_QJS) {
        step(&format!(
            "installing componentize-qjs@{COMPONENTIZE_QJS} into {}",
            path.join("node_modules").display()
        ));
        let npm = std::env::var("NPM").unwrap_or_else(|_| "npm".into());
        run(
            Command::new(&npm)
                .current_dir(path)
                .args([
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--save-dev",
                    "--save-exact",
                ])
                .arg(format!("componentize-qjs@{COMPONENTIZE_QJS}")),
            &format!(
                "`{npm} install` (Node.js 20+ with npm is needed to build JavaScript plugins)"
            ),
        )?;
    }
    // The component's entry: this weir's world imports handed to the plugin's consumer.
    std::fs::write(
        dot.join("component.js"),
        "// Written by `weir plugin build`: the component's exports.\n\
         import * as state from \"weir:plugin/state@0.2.0\";\n\
         import * as log from \"weir:plugin/log@0.2.0\";\n\
         import { componentExports } from \"../weir-plugin.js\";\n\
         import plugin from \"../app.js\";\n\n\
         export const { configure, process } = componentExports(plugin, state, log);\n",
    )?;
    let name = std::fs::read_to_string(path.join("package.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|j| j.get("name")?.as_str().map(str::to_string))
        .map(|n| n.rsplit('/').next().unwrap_or(&n).replace('-', "_"))
        .map_or_else(|| dir_name(path), Ok)?;
    let wasm = path.join("target").join(format!("{name}.wasm"));
    step("componentize-qjs (QuickJS)");
    run(
        Command::new(path.join("node_modules/.bin/componentize-qjs"))
            .arg("--wit")
            .arg(dot.join("wit"))
            .arg("--js")
            .arg(dot.join("component.js"))
            // Imports resolve inside the project only.
            .arg("--module-root")
            .arg(path)
            .args(["-n", "consumer"])
            // weir runs components without the component model's async ABI, and gives
            // plugins no WASI: the component imports only the plugin's own interfaces.
            .args(["--sync", "--stub-wasi", "-o"])
            .arg(&wasm),
        "componentize-qjs",
    )?;
    Ok(wasm)
}
