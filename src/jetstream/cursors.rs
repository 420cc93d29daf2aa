//! Listing, showing and seeking durable subscriptions on JetStream: their
//! consumers' state, read from the servers.
//!
//! A subscription's consumer carries its filter in the consumer's metadata
//! (`ctrlbus.filter`), which is also how ctrlbus's cursors are told apart
//! from the stream's other consumers. JetStream can't move a consumer's
//! start, so a seek deletes the consumer and creates it again with the
//! same configuration and the new start; it is refused while a process
//! runs the subscription (a pull request is waiting).

use async_nats::jetstream;
use async_nats::jetstream::consumer::DeliverPolicy;
use futures_util::StreamExt;

use super::durable::{consumer_name, dead_stream, subscription_name};
use super::{JetStreamBus, cluster, from_offset, to_offset};
use crate::durable::{CursorInfo, CursorState, Position};
use crate::error::{CursorError, StorageError};
use crate::filter::Filter;

/// The metadata key of a subscription's filter (as JSON).
pub(super) const FILTER_KEY: &str = "ctrlbus.filter";

impl JetStreamBus {
    /// Every durable subscription of the stream, by name.
    ///
    /// `state` is `catch_up` while some process runs the subscription (it
    /// has a pull request waiting) and `idle` otherwise; `missed` is always
    /// 0 (the stream has no retention that outruns a consumer).
    ///
    /// # Errors
    /// [`StorageError::Cluster`] when the cluster does not answer.
    pub fn cursors(&self) -> Result<Vec<CursorInfo>, StorageError> {
        let inner = &self.inner;
        let last = self.last_seq()?;
        let infos = inner.block_on(self.retrying(|| async {
            let stream = inner.stream().await?;
            let mut list = stream.consumers();
            let mut infos = Vec::new();
            while let Some(info) = list.next().await {
                infos.push(info.map_err(cluster)?);
            }
            Ok(infos)
        }))?;
        let mut out = Vec::new();
        for info in infos {
            if info.config.metadata.contains_key(FILTER_KEY) {
                let name = subscription_name(&info.name);
                let dead = self.dead_count(&name)?;
                out.push(cursor_info(&name, &info, last, dead)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// One durable subscription.
    ///
    /// # Errors
    /// [`CursorError::InvalidName`], [`CursorError::Unknown`],
    /// [`CursorError::Storage`].
    pub fn cursor(&self, name: &str) -> Result<CursorInfo, CursorError> {
        let info = self.consumer_info(name)?;
        let last = self.last_seq()?;
        let dead = self.dead_count(name)?;
        Ok(cursor_info(name, &info, last, dead)?)
    }

    fn consumer_info(&self, name: &str) -> Result<jetstream::consumer::Info, CursorError> {
        let info = self.on_consumer(name, |stream, cname| async move {
            stream.consumer_info(cname).await.map_err(|e| e.to_string())
        })?;
        if info.config.metadata.contains_key(FILTER_KEY) {
            Ok(info)
        } else {
            Err(CursorError::Unknown(name.to_owned()))
        }
    }

    /// Moves the durable subscription `name`: it next receives the event at
    /// `position`. Events between are skipped (forward) or handled again
    /// (backward).
    ///
    /// # Errors
    /// [`CursorError::Unknown`]; [`CursorError::Active`] while a process
    /// runs the subscription; [`CursorError::UnknownEvent`] for a
    /// [`Position::Id`] (not supported on JetStream);
    /// [`CursorError::Storage`]. Nothing is changed on error.
    pub fn seek(&self, name: &str, position: Position) -> Result<CursorInfo, CursorError> {
        let info = self.consumer_info(name)?;
        if info.num_waiting > 0 || info.num_ack_pending > 0 {
            return Err(CursorError::Active(name.to_owned()));
        }
        let deliver_policy = match position {
            Position::Beginning => DeliverPolicy::All,
            Position::End => DeliverPolicy::ByStartSequence {
                start_sequence: self.last_seq()? + 1,
            },
            Position::Seq(s) => DeliverPolicy::ByStartSequence {
                start_sequence: s.max(1),
            },
            Position::Time(t) => DeliverPolicy::ByStartTime {
                start_time: to_offset(t),
            },
            Position::Id(id) => return Err(CursorError::UnknownEvent(id)),
        };
        let mut config = info.config.clone();
        config.deliver_policy = deliver_policy;
        let inner = &self.inner;
        let cname = consumer_name(name);
        inner
            .block_on(async {
                let stream = inner.stream().await?;
                stream.delete_consumer(&cname).await.map_err(cluster)?;
                stream.create_consumer(config).await.map_err(cluster)
            })
            .map_err(CursorError::Storage)?;
        self.cursor(name)
    }

    /// How many dead letters the subscription `name` has.
    fn dead_count(&self, name: &str) -> Result<u64, StorageError> {
        let inner = &self.inner;
        let dead = dead_stream(&inner.stream);
        let subject = format!("{dead}.{}", consumer_name(name));
        inner.block_on(async {
            let Ok(stream) = inner.js().get_stream(&dead).await else {
                return Ok(0); // none yet
            };
            let mut info = stream
                .info_with_subjects(subject.clone())
                .await
                .map_err(cluster)?;
            let mut n = 0;
            while let Some(s) = info.next().await {
                n += s.map_err(cluster)?.1 as u64;
            }
            Ok(n)
        })
    }
}

fn cursor_info(
    name: &str,
    info: &jetstream::consumer::Info,
    last_seq: u64,
    dead: u64,
) -> Result<CursorInfo, StorageError> {
    let filter: Filter = info
        .config
        .metadata
        .get(FILTER_KEY)
        .map(|f| serde_json::from_str(f))
        .transpose()
        .map_err(|e| StorageError::Corrupted {
            table: "consumer metadata",
            key: name.to_owned(),
            reason: format!("filter: {e}"),
        })?
        .unwrap_or_default();
    let delivered = handled_seq(info);
    let updated = info
        .ack_floor
        .last_active
        .map_or_else(|| from_offset(info.created), from_offset);
    Ok(CursorInfo {
        name: name.to_owned(),
        filter,
        delivered_seq: delivered,
        next_seq: delivered + 1,
        lag: last_seq.saturating_sub(delivered),
        state: if info.num_waiting > 0 || info.num_ack_pending > 0 {
            CursorState::CatchUp
        } else {
            CursorState::Idle
        },
        dead_letters: dead,
        missed: 0,
        created_at: from_offset(info.created),
        updated_at: updated,
        last_error: None,
    })
}

/// Every event up to this `seq` has been handled by the consumer: its ack
/// floor, or, with nothing awaiting an answer, the last one delivered (the
/// server starts a consumer's "delivered" at the `seq` before its start).
pub(super) fn handled_seq(info: &jetstream::consumer::Info) -> u64 {
    if info.num_ack_pending == 0 {
        info.ack_floor
            .stream_sequence
            .max(info.delivered.stream_sequence)
    } else {
        info.ack_floor.stream_sequence
    }
}
