//! The client's plugin calls: deploy, upgrade, list, pause, remove, logs, lag and state.

use crate::client::{Client, ClientError};
use crate::pb;

/// The answer to a state query made after publishing an input record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateAnswer {
    /// The plugin has not processed the record yet.
    Pending,
    /// Processed; the committed value and its version.
    Value(Vec<u8>, u64),
    /// Processed, and the key has no value.
    Absent,
}

/// A plugin as the server reports it.
pub type PluginStatus = pb::PluginInfo;

/// What to deploy; `Default` gives the server's defaults.
#[derive(Clone, Debug, Default)]
pub struct Deploy {
    /// Plugin name.
    pub name: String,
    /// The component's bytes.
    pub wasm: Vec<u8>,
    /// Input topic.
    pub input: String,
    /// Output topics.
    pub outputs: Vec<String>,
    /// `configure` config.
    pub config: Vec<(String, String)>,
    /// `earliest` or `latest` (empty = earliest).
    pub from: String,
    /// Memory cap in MiB (0 = default).
    pub memory_mb: u32,
    /// CPU bound per batch in ms (0 = default).
    pub timeout_ms: u32,
    /// `halt` or `dlq` (empty = halt).
    pub on_error: String,
    /// Message ids remembered for dedup (0 = default).
    pub dedup_ids: u64,
    /// How long ids are remembered, ms (0 = default).
    pub dedup_age_ms: u64,
    /// Alert above this many waiting records (0 = none).
    pub alert_lag: u64,
    /// Alert when the oldest waiting record is older than this, ms (0 = none).
    pub alert_delay_ms: u64,
    /// Most records per second over all partitions (0 = unbounded).
    pub max_rate: u64,
    /// Most records one commit covers (0 = default).
    pub commit_records: u32,
    /// Longest the calls of one commit run, ms (0 = default).
    pub commit_interval_ms: u32,
}

impl Client {
    /// Deploys a plugin.
    ///
    /// # Errors
    /// Invalid wasm, a component of another world, unknown topics, a taken name.
    pub async fn deploy_plugin(&self, d: Deploy) -> Result<PluginStatus, ClientError> {
        let request = pb::DeployPluginRequest {
            name: d.name,
            wasm: d.wasm.into(),
            input: d.input,
            outputs: d.outputs,
            config: d
                .config
                .into_iter()
                .map(|(key, value)| pb::ConfigEntry { key, value })
                .collect(),
            from: d.from,
            memory_mb: d.memory_mb,
            timeout_ms: d.timeout_ms,
            on_error: d.on_error,
            max_attempts: 0,
            max_batch: 0,
            dedup_ids: d.dedup_ids,
            dedup_age_ms: d.dedup_age_ms,
            alert_lag: d.alert_lag,
            alert_delay_ms: d.alert_delay_ms,
            max_rate: d.max_rate,
            commit_records: d.commit_records,
            commit_interval_ms: d.commit_interval_ms,
        };
        Ok(self
            .inner
            .clone()
            .deploy_plugin(request)
            .await?
            .into_inner())
    }

    /// Replaces a plugin's code.
    ///
    /// # Errors
    /// Unknown plugin, invalid wasm.
    pub async fn upgrade_plugin(
        &self,
        name: &str,
        wasm: Vec<u8>,
    ) -> Result<PluginStatus, ClientError> {
        Ok(self
            .inner
            .clone()
            .upgrade_plugin(pb::UpgradePluginRequest {
                name: name.into(),
                wasm: wasm.into(),
            })
            .await?
            .into_inner())
    }

    /// Every plugin with its partitions.
    ///
    /// # Errors
    /// Transport failures.
    pub async fn list_plugins(&self) -> Result<Vec<PluginStatus>, ClientError> {
        Ok(self
            .inner
            .clone()
            .list_plugins(pb::ListPluginsRequest {})
            .await?
            .into_inner()
            .plugins)
    }

    /// Pauses (`true`) or resumes a plugin.
    ///
    /// # Errors
    /// Unknown plugin.
    pub async fn pause_plugin(&self, name: &str, pause: bool) -> Result<PluginStatus, ClientError> {
        let r = pb::PluginRef { name: name.into() };
        let mut inner = self.inner.clone();
        Ok(if pause {
            inner.pause_plugin(r).await?
        } else {
            inner.resume_plugin(r).await?
        }
        .into_inner())
    }

    /// Removes a plugin with its state.
    ///
    /// # Errors
    /// Unknown plugin.
    pub async fn remove_plugin(&self, name: &str) -> Result<(), ClientError> {
        self.inner
            .clone()
            .remove_plugin(pb::PluginRef { name: name.into() })
            .await?;
        Ok(())
    }

    /// A plugin's log lines.
    ///
    /// # Errors
    /// Unknown plugin.
    pub async fn plugin_logs(&self, name: &str) -> Result<Vec<String>, ClientError> {
        Ok(self
            .inner
            .clone()
            .plugin_logs(pb::PluginRef { name: name.into() })
            .await?
            .into_inner()
            .lines)
    }

    /// Lag, status, alerts and probe delays of one plugin or group (`""` for all).
    ///
    /// # Errors
    /// No plugin or group of that name.
    pub async fn lag(&self, name: &str) -> Result<pb::GetLagResponse, ClientError> {
        Ok(self
            .inner
            .clone()
            .get_lag(pb::GetLagRequest { name: name.into() })
            .await?
            .into_inner())
    }

    /// A plugin's committed state value and version.
    ///
    /// # Errors
    /// Unknown plugin.
    pub async fn get_state(
        &self,
        plugin: &str,
        key: &[u8],
    ) -> Result<Option<(Vec<u8>, u64)>, ClientError> {
        let r = self.state_request(plugin, key, None).await?;
        Ok(r.found.then(|| (r.value.to_vec(), r.version)))
    }

    async fn state_request(
        &self,
        plugin: &str,
        key: &[u8],
        after: Option<pb::InputPosition>,
    ) -> Result<pb::GetStateResponse, ClientError> {
        Ok(self
            .inner
            .clone()
            .get_state(pb::GetStateRequest {
                plugin: plugin.into(),
                key: key.to_vec().into(),
                after,
            })
            .await?
            .into_inner())
    }

    /// A state value as seen by the publisher of the input record at `partition`/`offset`:
    /// `Pending` until the plugin has committed past that record.
    ///
    /// # Errors
    /// Unknown plugin or partition.
    pub async fn get_state_after(
        &self,
        plugin: &str,
        key: &[u8],
        partition: u32,
        offset: u64,
    ) -> Result<StateAnswer, ClientError> {
        let r = self
            .state_request(plugin, key, Some(pb::InputPosition { partition, offset }))
            .await?;
        Ok(if r.pending {
            StateAnswer::Pending
        } else if r.found {
            StateAnswer::Value(r.value.to_vec(), r.version)
        } else {
            StateAnswer::Absent
        })
    }
}
