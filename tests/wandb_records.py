"""Read back what an offline wandb run wrote (its ``run-<id>.wandb`` record log).

wandb 0.31 no longer ships a Python reader: the file is a LevelDB-style log (a 7-byte
``:W&B`` header, then 32 KiB blocks of records with a 7-byte header each) of
``wandb_internal_pb2.Record`` protobufs.
"""

import json
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            yield _parse(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield _parse(pending + chunk)
            pending = b""


def _parse(raw):
    rec = wandb_internal_pb2.Record()
    rec.ParseFromString(raw)
    return rec


def _items(items):
    """Flat items, with a media value (its fields logged as nested keys) rebuilt as a dict."""
    out = {}
    for i in items:
        value = json.loads(i.value_json)
        if i.key:
            out[i.key] = value
        else:
            *path, leaf = i.nested_key
            node = out
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = value
    return out


def read_run(run_dir, *, timeout=60.0):
    """{"config": {...}, "history": [{...}, ...], "summary": {...}, "artifacts": [names]}.

    ``run.finish()`` returns once wandb's service has the run's last records, which is not
    always once they are on disk; so read until the closing ``exit`` record is there (at most
    ``timeout`` seconds) and fail loudly, with wandb's own error lines, if it never comes.
    """
    (path,) = Path(run_dir).glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        recs = list(records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in recs):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} has no exit record after {timeout:.0f} s; "
                                 f"wandb's log says:\n{wandb_errors(run_dir)}")
        time.sleep(0.2)
    out = {"config": {}, "history": [], "summary": {}, "artifacts": []}
    for rec in recs:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["config"].update(_items(rec.run.config.update))
        elif kind == "config":
            out["config"].update(_items(rec.config.update))
        elif kind == "history":
            out["history"].append(_items(rec.history.item))
        elif kind == "summary":
            out["summary"].update(_items(rec.summary.update))
        elif kind == "artifact":
            out["artifacts"].append(rec.artifact.name)
    return out


def wandb_errors(run_dir):
    """The warning and error lines of the run's wandb logs, for assertion messages."""
    lines = []
    for log in sorted(Path(run_dir, "logs").glob("*.log")):
        lines += [f"{log.name}: {l}" for l in log.read_text(errors="replace").splitlines()
                  if "ERROR" in l or "WARN" in l]
    return "\n".join(lines[-40:]) or "(no warnings or errors)"
