#!/usr/bin/env python3
"""Bytes per stored event in SQLite for the events examples/disk_usage wrote.

usage: disk_usage_sqlite.py DIR
Two layouts: the event JSON keyed by seq with a unique index on the id (what
ctrlbus offers: read by seq, look up by id), and the JSON alone.
"""
import json, os, sqlite3, sys

d = sys.argv[1] if len(sys.argv) > 1 else "."
lines = open(os.path.join(d, "disk_usage.jsonl"), "rb").read().splitlines()
for name, schema, with_id in [
    ("sqlite-json+id-index", "create table log(seq integer primary key, id text unique not null, event blob not null)", True),
    ("sqlite-json", "create table log(seq integer primary key, event blob not null)", False),
]:
    path = os.path.join(d, "disk_usage.sqlite")
    for suffix in ("", "-wal", "-shm"):
        try:
            os.remove(path + suffix)
        except FileNotFoundError:
            pass
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("pragma journal_mode=wal")
    c.execute(schema)
    c.execute("begin")
    for line in lines:
        if with_id:
            c.execute("insert into log(id, event) values (?, ?)", (json.loads(line)["id"], line))
        else:
            c.execute("insert into log(event) values (?)", (line,))
    c.execute("commit")
    c.execute("pragma wal_checkpoint(truncate)")
    c.execute("vacuum")
    c.close()
    size = os.path.getsize(path)
    print(json.dumps({"system": name, "events": len(lines), "bytes_per_event": round(size / len(lines), 1)}))
    os.remove(path)
