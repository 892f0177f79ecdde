"""Reads one partition of a topic straight from tansu's SQLite database (tansu 0.6,
`--storage-engine sqlite://tansu.db`) and prints every record as one JSON line, in
the format of kafka_read_upstream.py: offset, key and value as hex (null when
absent), timestamp, headers (in the order stored).

Why not through the broker: tansu's SQLite storage answers a Fetch by looking up each
record's headers in a table without an index, so reading back ~100,000 records takes
longer than a test can wait (tests/ship_crash_rate.rs). This reads what the broker
holds (its committed records) from its own tables.

usage: tansu_sqlite_read.py DATABASE TOPIC PARTITION
"""

import json
import sqlite3
import sys


def main() -> int:
    database, topic, partition = sys.argv[1], sys.argv[2], int(sys.argv[3])
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)
    row = connection.execute(
        "select tp.id from topition tp join topic t on tp.topic = t.id where t.name = ? and tp.partition = ?",
        (topic, partition),
    ).fetchone()
    if row is None:
        print(f"no topition {topic}/{partition}", file=sys.stderr)
        return 2
    topition = row[0]
    headers: dict[int, list] = {}
    for offset, key, value in connection.execute(
        "select offset_id, k, v from header where topition = ? order by rowid", (topition,)
    ):
        headers.setdefault(offset, []).append(
            [bytes(key).decode("utf-8", "replace"), None if value is None else bytes(value).hex()]
        )
    out = sys.stdout
    for offset, timestamp, key, value in connection.execute(
        "select offset_id, timestamp, k, v from record where topition = ? order by offset_id", (topition,)
    ):
        out.write(
            json.dumps(
                {
                    "offset": offset,
                    "key": None if key is None else bytes(key).hex(),
                    "value": None if value is None else bytes(value).hex(),
                    "timestamp": timestamp if isinstance(timestamp, int) else 0,
                    "headers": headers.get(offset, []),
                }
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
