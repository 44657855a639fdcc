"""Runs every Sigma rule of a folder over ECS JSON lines, locally, with pySigma's SQLite backend.

    sigma_run.py RULES_DIR FILE...

The records of every FILE (one JSON object a line, as k8s-ebpf writes them) are flattened
into one SQLite table `logs` the way the backend expects: one column per dotted ECS field
name (`event.action`, `source.ip`, ...), lists as JSON text, and `timestamp` from
`@timestamp`. Each rule the collection generates (single-event rules, correlation rules,
and the base rules a correlation marks `generate: true`) is converted by the backend and
executed. Prints one JSON object: {"records": N, "hits": {"rule name": [hit, ...]}}, a
hit being the matching record's flattened fields, or for a correlation one firing: its
group keys, window, metric and events (see `firings`). Exits 1 if a rule fails to
convert or run.
"""

import json
import sqlite3
import sys
from pathlib import Path

from sigma.backends.sqlite import sqliteBackend
from sigma.collection import SigmaCollection
from sigma.correlations import SigmaCorrelationRule


def flatten(value, prefix, out):
    if isinstance(value, dict):
        for key, v in value.items():
            flatten(v, f"{prefix}.{key}" if prefix else key, out)
    elif isinstance(value, list):
        out[prefix] = json.dumps(value)
    else:
        out[prefix] = value


def load(db, files):
    rows = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    flat = {}
                    flatten(json.loads(line), "", flat)
                    flat["timestamp"] = flat.get("@timestamp")
                    rows.append(flat)
    columns = sorted({c for r in rows for c in r})
    quoted = ", ".join(f'"{c}"' for c in columns)
    db.execute(f"CREATE TABLE logs ({quoted})")
    marks = ", ".join("?" for _ in columns)
    db.executemany(
        f"INSERT INTO logs ({quoted}) VALUES ({marks})",
        [[r.get(c) for c in columns] for r in rows],
    )
    return len(rows)


def run(db, query):
    """Rows of `query`. A field no record has is a column of NULLs (added on demand, at
    most 50), as it would be an absent field in the SIEM."""
    for _ in range(50):
        try:
            return [{k: row[k] for k in row.keys()} for row in db.execute(query)]
        except sqlite3.OperationalError as e:
            prefix = "no such column: "
            if not str(e).startswith(prefix):
                raise
            db.execute(f'ALTER TABLE logs ADD COLUMN "{str(e)[len(prefix):]}"')
    raise RuntimeError("too many missing columns")


def firings(rows):
    """The backend evaluates a correlation's sliding window at every matching event, so one
    burst gives a row per event past the threshold. Rows of one group whose windows
    overlap are one firing (as a SIEM's alert suppression would show them): the merged
    window, the largest metric, every event."""
    merged = []
    for row in sorted(rows, key=lambda r: (r["group_keys"], r["window_start"])):
        last = merged[-1] if merged else None
        if last and last["group_keys"] == row["group_keys"] and row["window_start"] <= last["window_end"]:
            last["window_end"] = max(last["window_end"], row["window_end"])
            last["metric_value"] = max(last["metric_value"], row["metric_value"])
            last["event_ids"] = sorted(set(last["event_ids"]) | set(json.loads(row["event_ids"])))
        else:
            merged.append(
                {
                    "group_keys": row["group_keys"],
                    "window_start": row["window_start"],
                    "window_end": row["window_end"],
                    "metric_value": row["metric_value"],
                    "event_ids": json.loads(row["event_ids"]),
                }
            )
    for m in merged:
        m["group_keys"] = json.loads(m["group_keys"])
    return merged


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    rules_dir, files = Path(sys.argv[1]), sys.argv[2:]
    db = sqlite3.connect(":memory:")
    db.row_factory = sqlite3.Row
    records = load(db, files)
    collection = SigmaCollection.load_ruleset([rules_dir])
    collection.resolve_rule_references()
    backend = sqliteBackend()
    # Reference-only base rules are skipped below, so their `generate` flag matters.
    hits = {}
    failed = False
    for rule in collection.rules:
        if not isinstance(rule, SigmaCorrelationRule) and rule._backreferences and not any(
            getattr(c, "generate", False) for c in rule._backreferences
        ):
            # A base rule only its correlation uses (Sigma: not generated on its own).
            continue
        try:
            if isinstance(rule, SigmaCorrelationRule):
                # Converted with the rules it references, first: the backend needs their
                # conversion. Its own query is the last.
                alone = SigmaCollection([ref.rule for ref in rule.rules] + [rule])
                queries = sqliteBackend().convert(alone)[-1:]
            else:
                queries = backend.convert_rule(rule)
            found = []
            for q in queries:
                found.extend(run(db, q))
            if isinstance(rule, SigmaCorrelationRule):
                found = firings(found)
            hits[rule.name or str(rule.id)] = found
        except Exception as e:  # noqa: BLE001 - every failing rule is reported
            failed = True
            print(f"{rule.name}: {type(e).__name__}: {e}", file=sys.stderr)
    json.dump({"records": records, "hits": hits}, sys.stdout, indent=1, default=str)
    print()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
