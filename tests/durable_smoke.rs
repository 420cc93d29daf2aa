use std::sync::{Arc, Mutex};
use std::time::Duration;

use ctrlbus::{Bus, DurableBus, Event, Filter, HandlerError, Position, Type};

#[test]
fn publish_read_subscribe_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let bus = DurableBus::open(&path).unwrap();
        let s2 = seen.clone();
        let sub = bus
            .subscribe_durable(
                "billing",
                Filter::types(["deploy.*"]).unwrap(),
                Position::Beginning,
                move |e: &Event| -> Result<(), HandlerError> {
                    s2.lock().unwrap().push(e.id);
                    Ok(())
                },
            )
            .unwrap();
        assert!(sub.wait_live(Duration::from_secs(5)));
        for i in 0..10 {
            let t = if i % 2 == 0 {
                Type::DEPLOY_STARTED
            } else {
                Type::HEALTH_PASSED
            };
            let r = bus.publish(Event::new(t, "t1")).unwrap();
            assert_eq!(r.seq, i + 1);
        }
        assert_eq!(seen.lock().unwrap().len(), 5);
        let all: Vec<_> = bus
            .read(Position::Beginning, &Filter::all())
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(all.len(), 10);
        let e = all[3].event.clone();
        let dup = bus.publish(e).unwrap();
        assert!(dup.duplicate);
        assert_eq!(dup.seq, 4);
        drop(sub);
        let c = bus.cursor("billing").unwrap();
        assert_eq!(c.delivered_seq, 10);
    }
    let bus = DurableBus::open(&path).unwrap();
    assert_eq!(bus.last_seq(), 10);
    let r = bus.publish(Event::new(Type::DEPLOY_FAILED, "t1")).unwrap();
    assert_eq!(r.seq, 11);
    let s2 = seen.clone();
    let sub = bus
        .subscribe_durable(
            "billing",
            Filter::types(["deploy.*"]).unwrap(),
            Position::Beginning,
            move |e: &Event| -> Result<(), HandlerError> {
                s2.lock().unwrap().push(e.id);
                Ok(())
            },
        )
        .unwrap();
    assert!(sub.wait_live(Duration::from_secs(5)));
    assert_eq!(seen.lock().unwrap().len(), 6);
    let mut buf = Vec::new();
    let mut rd = bus.read(Position::Seq(11), &Filter::all()).unwrap();
    rd.write_next_json(&mut buf).unwrap().unwrap();
    let line = String::from_utf8(buf).unwrap();
    let entry = bus
        .read(Position::Seq(11), &Filter::all())
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(line.trim_end(), entry.to_json());
}
