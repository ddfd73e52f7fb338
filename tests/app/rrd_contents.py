"""Read an .rrd back with rerun itself and print what it holds as JSON (run from the rerun side venv by
tests/app/test_view.py): per entity path, its row count, its "step" values, and for camera entities the
bytes of each frame as hex digests."""

import hashlib
import json
import sys
from collections import defaultdict

from rerun.chunk import RrdReader

out: dict = defaultdict(lambda: {"rows": 0, "steps": [], "frames": []})
reader = RrdReader(sys.argv[1])
for chunk in reader.stream():
    entry = out[chunk.entity_path]
    entry["rows"] += chunk.num_rows
    batch = chunk.to_record_batch()
    names = batch.schema.names
    if "step" in names:
        entry["steps"] += batch.column("step").to_pylist()
    if "Image:buffer" in names:
        for buf in batch.column("Image:buffer").to_pylist():
            entry["frames"].append(
                hashlib.sha256(bytes(buf[0] if isinstance(buf[0], list) else buf)).hexdigest()
            )
print(json.dumps({"recordings": len(reader.recordings()), "entities": out}))
