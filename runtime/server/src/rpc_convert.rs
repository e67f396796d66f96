//! Server-side conversions to protobuf: monitor rows, publish acknowledgements and errors
//! (the orphan rule keeps these as functions: both sides are other crates' types).

use tonic::Status;
use weir_api::pb;
use weir_broker::{BrokerError, Caller, PartitionAck, ProducerFields, Publish};
use weir_core::Record;

use crate::auth::Principal;
use crate::monitor::{ConsumerHealth, LagRow};
use crate::statuses::of_broker;

pub(crate) fn lag_row(r: LagRow) -> pb::LagRow {
    {
        pb::LagRow {
            kind: r.kind.as_str().into(),
            name: r.name,
            topic: r.topic,
            partition: r.partition,
            committed: r.committed,
            end: r.end,
            lag: r.lag,
            time_lag_ms: r.time_lag_ms,
            status: r.status.to_string(),
        }
    }
}

pub(crate) fn consumer_health(c: ConsumerHealth) -> pb::ConsumerHealth {
    {
        pb::ConsumerHealth {
            kind: c.kind.as_str().into(),
            name: c.name,
            status: c.status.to_string(),
            lag: c.lag,
            time_lag_ms: c.time_lag_ms,
            alerts: c.alerts,
            probes_seen: c.probes.seen,
            probes_lost: c.probes.lost,
            probes_duplicated: c.probes.duplicated,
            probe_p50_ms: c.probes.p50_ms,
            probe_p99_ms: c.probes.p99_ms,
            probe_p999_ms: c.probes.p999_ms,
            node: c.node.unwrap_or_default(),
        }
    }
}

pub(crate) fn error_response(request_id: u64, e: BrokerError) -> pb::PublishResponse {
    status_response(request_id, of_broker(e))
}

pub(crate) fn status_response(request_id: u64, status: Status) -> pb::PublishResponse {
    pb::PublishResponse {
        request_id,
        acks: Vec::new(),
        error: Some(pb::Error {
            code: status.code() as i32,
            message: status.message().to_string(),
        }),
    }
}

pub(crate) fn acks_response(request_id: u64, acks: Vec<PartitionAck>) -> pb::PublishResponse {
    pb::PublishResponse {
        request_id,
        acks: acks
            .into_iter()
            .map(|a| pb::PartitionAck {
                partition: a.partition,
                base_offset: a.appended.base_offset,
                record_count: a.appended.count,
                duplicate: a.appended.duplicate,
            })
            .collect(),
        error: None,
    }
}

/// A publish request as the broker takes it, on behalf of `caller`.
pub(crate) fn publish_of(r: pb::PublishRequest, caller: Caller) -> Publish {
    Publish {
        topic: r.topic,
        partition: r.partition,
        records: r.records.into_iter().map(Record::from).collect(),
        producer: r.producer.map(|p| ProducerFields {
            producer_id: p.producer_id,
            epoch: p.epoch,
            base_sequence: p.base_sequence,
        }),
        caller,
    }
}

/// The broker's view of a principal, for producer ownership.
pub(crate) fn caller_of(principal: &Principal) -> Caller {
    Caller::Client {
        name: principal.name.clone(),
        admin: principal.admin,
    }
}
