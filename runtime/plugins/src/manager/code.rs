//! A plugin's code: compiling it, storing its wasm (in `<data>/wasm`, and in cluster mode in
//! the replicated store for the other nodes), loading it back.

use bytes::Bytes;
use weir_wasm::{CompiledPlugin, PluginError};

use super::{blocking, PluginManager};
use crate::request::ManagerError;
use crate::spec::PluginSpec;

impl PluginManager {
    pub(super) async fn compile(&self, wasm: Bytes) -> Result<CompiledPlugin, ManagerError> {
        if wasm.len() > self.config.max_wasm_bytes {
            return Err(PluginError::TooLarge {
                size: wasm.len(),
                max: self.config.max_wasm_bytes,
            }
            .into());
        }
        let _slot = self
            .compiling
            .acquire()
            .await
            .expect("the compile semaphore is never closed");
        let engine = self.engine.clone();
        blocking(move || Ok(engine.compile(&wasm)?)).await
    }

    /// A deployed plugin's code, compiled: from `<data>/wasm`, or in cluster mode from the
    /// replicated store when this node has not seen it yet.
    pub(super) async fn load_compiled(
        &self,
        spec: &PluginSpec,
    ) -> Result<CompiledPlugin, ManagerError> {
        let path = self.wasm_dir.join(format!("{}.wasm", spec.wasm_sha256));
        if !path.exists() {
            if let Some(cluster) = self.seams.cluster.clone() {
                let sha = spec.wasm_sha256.clone();
                let wasm = blocking(move || Ok(cluster.kv().get_blob(&sha)?)).await?;
                let wasm = wasm.ok_or_else(|| {
                    ManagerError::Io(format!(
                        "plugin {}: its wasm {} is not in the cluster's store",
                        spec.name, spec.wasm_sha256
                    ))
                })?;
                // What was read is what the spec names, or it is not kept.
                let compiled = self.compile(wasm.clone()).await?;
                if compiled.sha256 != spec.wasm_sha256 {
                    return Err(ManagerError::Io(format!(
                        "plugin {}: the cluster's store returned wasm {} for {}; retrying",
                        spec.name, compiled.sha256, spec.wasm_sha256
                    )));
                }
                self.save_wasm(&spec.wasm_sha256, wasm, false).await?;
                return Ok(compiled);
            }
        }
        let (engine, name) = (self.engine.clone(), spec.name.clone());
        blocking(move || {
            let wasm = std::fs::read(&path).map_err(|e| {
                ManagerError::Io(format!(
                    "plugin {name}: cannot read {}: {e}",
                    path.display()
                ))
            })?;
            Ok(engine.compile(&wasm)?)
        })
        .await
    }

    /// Stores a plugin's wasm in `<data>/wasm` and, with `share` in cluster mode, in the
    /// replicated store for the other nodes.
    pub(super) async fn save_wasm(
        &self,
        sha256: &str,
        wasm: Bytes,
        share: bool,
    ) -> Result<(), ManagerError> {
        let (dir, path) = (
            self.wasm_dir.clone(),
            self.wasm_dir.join(format!("{sha256}.wasm")),
        );
        let cluster = self.seams.cluster.clone().filter(|_| share);
        let sha = sha256.to_string();
        blocking(move || {
            if let Some(cluster) = cluster {
                cluster.kv().put_blob(&sha, &wasm)?;
            }
            use std::io::Write;
            if path.exists() {
                return Ok(());
            }
            let io = |e: std::io::Error| {
                ManagerError::Io(format!(
                    "cannot store the plugin wasm in {}: {e}",
                    dir.display()
                ))
            };
            let tmp = path.with_extension("tmp");
            let mut file = std::fs::File::create(&tmp).map_err(io)?;
            file.write_all(&wasm).map_err(io)?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io)
        })
        .await
    }
}
