use ctrlbus::{DurableBus, Event, InstanceId, Type};
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let n: usize = a[1].parse().unwrap();
    let qr: bool = a[2].parse().unwrap();
    let apply_ms: u64 = a[3].parse().unwrap();
    let batch: usize = a[4].parse().unwrap();
    let path = std::path::PathBuf::from("/tmp/scr/live.redb");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file("/tmp/scr/live.redb.wal");
    {
        let bus = DurableBus::builder()
            .sync(false)
            .quick_repair(qr)
            .apply_interval(std::time::Duration::from_millis(apply_ms))
            .open(&path)
            .unwrap();
        let mut i = 0;
        while i < n {
            let b: Vec<Event> = (i..(i + batch).min(n))
                .map(|k| {
                    Event::new(Type::DEPLOY_STARTED, format!("tenant-{}", k % 7))
                        .with_instance(InstanceId::new())
                        .with_actor("deployer")
                        .with_payload_value("data", "x".repeat(289))
                })
                .collect();
            i += b.len();
            bus.publish_batch(b).unwrap();
        }
    }
    let len = std::fs::metadata(&path).unwrap().len();
    let db = redb::Database::builder().open(&path).unwrap();
    let txn = db.begin_write().unwrap();
    let s = txn.stats().unwrap();
    println!(
        "n {n} qr {qr} apply {apply_ms} batch {batch}: file/event {:.1} allocated/event {:.1} frag/event {:.1}",
        len as f64 / n as f64,
        (s.allocated_pages() * 4096) as f64 / n as f64,
        s.fragmented_bytes() as f64 / n as f64
    );
}
