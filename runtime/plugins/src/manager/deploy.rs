//! Deploying a plugin: validate, compile, take it (cluster mode), allocate its producers and
//! starting offsets, store its spec, start it.

use std::sync::Arc;

use weir_core::StartAt;

use super::{blocking, PluginManager};
use crate::request::{validate, DeployRequest, ManagerError, PluginInfo};
use crate::spec::{OnError, PluginSpec, StartFrom};
use crate::store::Cursor;

impl PluginManager {
    /// Validates, compiles and starts a new plugin. A refused deploy (bad request, bad wasm)
    /// changes nothing; one that fails half-way (storage) may leave an unused wasm file (its
    /// producer ids are released), never a half-deployed plugin.
    ///
    /// # Errors
    /// Bad name or limits, existing plugin, unknown topics, invalid or mismatched wasm.
    pub async fn deploy(&self, request: DeployRequest) -> Result<PluginInfo, ManagerError> {
        validate(&self.config, &request)?;
        // Before the admin lock: a topic created through another node may take a moment to
        // be known here, and the cluster loop waits on the lock.
        self.seams.input.know_topic(&request.input).await;
        for output in &request.outputs {
            self.seams.input.know_topic(output).await;
        }
        if self.plugins.lock().contains_key(&request.name) {
            return Err(ManagerError::Exists(request.name));
        }
        // Compiling takes seconds for a Python component: not under the admin lock.
        let compiled = self.compile(request.wasm.clone()).await?;
        let _admin = self.admin.lock().await;
        if self.plugins.lock().contains_key(&request.name) {
            return Err(ManagerError::Exists(request.name));
        }
        if let Some(quota) = request.owner_quota {
            let owned = self
                .plugins
                .lock()
                .values()
                .filter(|r| r.runtime.spec.owner == request.owner)
                .count();
            if owned >= quota {
                return Err(ManagerError::Quota(format!(
                    "{} already owns {owned} plugins, the limit is {quota}: remove one first \
                     (or raise max_plugins in the auth file / --max-plugins-per-principal)",
                    request.owner.as_deref().unwrap_or("anonymous")
                )));
            }
        }
        let input_partitions = self.seams.input.partition_count(&request.input)?;
        for output in &request.outputs {
            self.seams.output.partition_count(output)?;
        }
        self.save_wasm(&compiled.sha256, request.wasm.clone(), true)
            .await?;
        // Cluster mode: the deploying node runs the plugin first (it takes the lease and the
        // plugin's store before writing it); the cluster loop may move it later.
        if let Some(cluster) = self.seams.cluster.clone() {
            let (store, name) = (self.seams.store.clone(), request.name.clone());
            // Deployed through another node a moment ago (not yet in this node's map).
            if blocking(move || Ok(store.specs()?))
                .await?
                .iter()
                .any(|s| s.name == name)
            {
                return Err(ManagerError::Exists(request.name));
            }
            let name = request.name.clone();
            let holder = blocking(move || Ok(cluster.take(&name)?)).await?;
            if holder.is_some() {
                return Err(ManagerError::Exists(request.name));
            }
            let (placement, name) = (self.placement.clone(), request.name.clone());
            if let Err(e) = blocking(move || Ok(placement.claim(&name)?)).await {
                self.forget_lease(&request.name, None).await;
                return Err(e);
            }
        }
        let mut outputs = request.outputs.clone();
        let spec_name = request.name.clone();
        if request.on_error == OnError::Dlq {
            let dlq = format!("{spec_name}.dlq");
            if let Err(e) = self.seams.output.ensure_topic(&dlq, input_partitions).await {
                self.forget_lease(&request.name, None).await;
                return Err(e.into());
            }
            outputs.push(dlq);
        }
        let mut producer_ids = Vec::new();
        let mut cursors = Vec::new();
        let allocated: Result<(), ManagerError> = async {
            for p in 0..input_partitions {
                producer_ids.push(self.seams.output.new_producer().await?);
                let start = match request.start {
                    StartFrom::Earliest => StartAt::Earliest,
                    StartFrom::Latest => StartAt::Latest,
                };
                let offset = self
                    .seams
                    .input
                    .resolve_start(&request.input, p, start)
                    .await?;
                cursors.push(Cursor::at(offset));
            }
            Ok(())
        }
        .await;
        if let Err(e) = allocated {
            self.release_producers(&request.name, &producer_ids).await;
            self.forget_lease(&request.name, None).await;
            return Err(e);
        }
        let spec = PluginSpec {
            name: request.name,
            version: 1,
            wasm_sha256: compiled.sha256.clone(),
            input: request.input,
            outputs,
            config: request.config,
            limits: request.limits,
            on_error: request.on_error,
            max_attempts: request.max_attempts,
            max_batch: request.max_batch,
            dedup: request.dedup,
            producer_ids,
            paused: false,
            owner: request.owner,
            alerts: request.alerts,
            max_rate: request.max_rate,
            commit: request.commit,
            restarts: 0,
        };
        let (seams, created) = (self.seams.clone(), spec.clone());
        let stored = blocking(move || {
            seams.store.create(&created, &cursors)?;
            seams
                .durability
                .sync_now()
                .map_err(|e| ManagerError::Io(e.to_string()))
        })
        .await;
        if let Err(e) = stored {
            self.release_producers(&spec.name, &spec.producer_ids).await;
            self.forget_lease(&spec.name, None).await;
            return Err(e);
        }
        tracing::info!(message = "Plugin deployed.", plugin = %spec.name, input = %spec.input, sha256 = %spec.wasm_sha256);
        if let Err(e) = self.start(spec.clone(), Arc::new(compiled)).await {
            // Deployed, but not running here: not taken, so the cluster loop opens it and
            // takes it over again (its lease is this node's) instead of believing it runs.
            self.give_back(&spec_name);
            return Err(e);
        }
        self.placement.started(&spec_name);
        self.info(&spec_name)
    }
}
