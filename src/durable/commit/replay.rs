//! Replaying the WAL's frames the file does not hold yet, after a crash,
//! through the same append hooks as a live commit.

use super::*;

/// Replays the WAL frames that the redb file does not hold yet (after a
/// crash), through the same hooks as a live commit, in one durable commit;
/// then restarts the WAL.
pub(crate) fn recover(
    shared: &Shared,
    wal: &mut Wal,
    frames: Vec<crate::durable::wal::Frame>,
) -> Result<u64, StorageError> {
    let mut next = shared.last_seq.load(Ordering::Acquire) + 1;
    let mut replayed = 0u64;
    let txn = crate::durable::txn::begin(shared)?;
    {
        let mut events = crate::durable::event_blocks::EventTables::write(&txn)?;
        let mut records: Vec<(u64, &[u8])> = Vec::new();
        let mut index = crate::durable::id_index::Indexer::open(&txn)?;
        let mut appended: Vec<(u64, Event, i64)> = Vec::new();
        'frames: for frame in &frames {
            for (i, record) in frame.records.iter().enumerate() {
                let seq = frame.first_seq + i as u64;
                if seq < next {
                    continue; // already in the redb file
                }
                if seq > next {
                    // A gap between the file and the WAL: damage. What
                    // follows can't be placed in `seq` order (G3).
                    tracing::warn!(
                        expected = next,
                        found = seq,
                        "a write-ahead-log frame is out of sequence; the log ends before it"
                    );
                    break 'frames;
                }
                let (append, rec) = codec::decode_ref(record)
                    .map_err(|r| crate::durable::read::corrupted(seq, r))?;
                let event = rec
                    .to_event()
                    .map_err(|r| crate::durable::read::corrupted(seq, r))?;
                records.push((seq, record.as_slice()));
                index.add(id_key(rec.id), seq)?;
                appended.push((seq, event, append));
                next += 1;
                replayed += 1;
            }
        }
        index.finish()?;
        events.append(records)?;
        for hook in shared.hooks.read().iter() {
            // Hooks see each replayed group with its own append time.
            let mut i = 0;
            while i < appended.len() {
                let t = appended[i].2;
                let j = appended[i..]
                    .iter()
                    .position(|a| a.2 != t)
                    .map_or(appended.len(), |k| i + k);
                let part: Vec<(u64, &Event)> =
                    appended[i..j].iter().map(|(s, e, _)| (*s, e)).collect();
                hook.on_append(&txn, &part, t)?;
                i = j;
            }
        }
    }
    txn.commit()?;
    shared.last_seq.store(next - 1, Ordering::Release);
    shared.applied_seq.store(next - 1, Ordering::Release);
    shared.fan.lock().next_seq = next;
    wal.reset()
        .map_err(|e| StorageError::Redb(redb::Error::Io(e)))?;
    Ok(replayed)
}
