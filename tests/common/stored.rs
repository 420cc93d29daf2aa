//! Editing a closed log's stored events through redb itself, as disk
//! damage or a bad edit would: the records are in `event_blocks` (see
//! `src/durable/event_blocks.rs` for the layout these helpers write).

use std::path::Path;

use redb::{ReadableDatabase, ReadableTable};

const BLOCKS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("event_blocks");

fn open(path: &Path) -> redb::Database {
    redb::Database::builder()
        .set_concurrency_mode(redb::ConcurrencyMode::SingleWriter)
        .open(path)
        .unwrap()
}

/// The records of a block, or `None` if its layout is damaged.
pub fn records_of(block: &[u8]) -> Vec<Vec<u8>> {
    let word = |i: usize| u32::from_le_bytes(block[i..i + 4].try_into().unwrap()) as usize;
    let count = word(0);
    let data = 4 + 4 * count;
    (0..count)
        .map(|i| {
            let start = if i == 0 { 0 } else { word(4 + 4 * (i - 1)) };
            block[data + start..data + word(4 + 4 * i)].to_vec()
        })
        .collect()
}

/// A block of `records`.
pub fn block_of(records: &[Vec<u8>]) -> Vec<u8> {
    let mut out = (records.len() as u32).to_le_bytes().to_vec();
    let mut end = 0;
    for r in records {
        end += r.len();
        out.extend_from_slice(&(end as u32).to_le_bytes());
    }
    for r in records {
        out.extend_from_slice(r);
    }
    out
}

/// Edits the block holding `seq` with `f` (its first `seq`, its bytes);
/// panics if no block holds it.
pub fn edit_block(path: &Path, seq: u64, f: impl FnOnce(u64, &mut Vec<u8>)) {
    let db = open(path);
    let txn = db.begin_write().unwrap();
    {
        let mut t = txn.open_table(BLOCKS).unwrap();
        let (first, mut bytes) = {
            let (k, v) = t.range(..=seq).unwrap().next_back().unwrap().unwrap();
            (k.value(), v.value().to_vec())
        };
        f(first, &mut bytes);
        t.insert(first, bytes.as_slice()).unwrap();
    }
    txn.commit().unwrap();
}

/// Replaces the record of `seq` with `bytes`, inside its block.
pub fn replace_record(path: &Path, seq: u64, bytes: &[u8]) {
    edit_block(path, seq, |first, block| {
        let mut records = records_of(block);
        let i = (seq - first) as usize;
        assert!(i < records.len(), "no block holds seq {seq}");
        records[i] = bytes.to_vec();
        *block = block_of(&records);
    });
}

/// The first `seq` of every block, in order.
pub fn block_starts(path: &Path) -> Vec<u64> {
    let db = open(path);
    let txn = db.begin_read().unwrap();
    let t = txn.open_table(BLOCKS).unwrap();
    t.iter().unwrap().map(|r| r.unwrap().0.value()).collect()
}

/// The stored record of `seq`, from its block.
pub fn record_of(path: &Path, seq: u64) -> Option<Vec<u8>> {
    let db = open(path);
    let txn = db.begin_read().unwrap();
    let t = txn.open_table(BLOCKS).unwrap();
    let (first, block) = {
        let (k, v) = t.range(..=seq).unwrap().next_back()?.unwrap();
        (k.value(), v.value().to_vec())
    };
    records_of(&block).into_iter().nth((seq - first) as usize)
}
