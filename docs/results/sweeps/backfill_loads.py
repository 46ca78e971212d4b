"""Give recorded MQAR runs of the paper variant the accuracy-by-load split that runs record
since `accuracy_by_load` (session 18): retrain each selected run from its config, which is
seeded by the config alone, and keep the split only if the retrained model scores the recorded
accuracy to the last digit (so it is the recorded model); else the record is left alone and
the mismatch reported.

Selected: each (layer, P, T) point's best run (the one the report shows), lacking the split,
whose best accuracy is below 1 (at 100% every bucket is 100%), with P >= --min-pairs (and
d_model = --d-model if given); the longest sequences (the highest loads) first.

    PYTHONPATH=src python docs/results/sweeps/backfill_loads.py \
        docs/results/sweeps/fig3-full --min-pairs 128
    PYTHONPATH=src python docs/results/sweeps/backfill_loads.py \
        docs/results/sweeps/mqar_catalogue-full --min-pairs 64 --d-model 32

One thread (the sweeps ran with `--threads 1`; another count may round differently); each run
costs what it cost in the sweep. The record is rewritten atomically, with
`accuracy_by_load_backfilled` set, beside a sweep that may be running on the directory.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

import ttr
from ttr.experiments import leaderboard
from ttr.experiments.sweep_tasks import MQARRun, run_mqar
from ttr.sweep import finished, write_json_atomic

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("results_dir", type=Path)
parser.add_argument("--min-pairs", type=int, default=1)
parser.add_argument("--d-model", type=int, help="only the runs of this width")
parser.add_argument("--dry-run", action="store_true", help="list the runs and stop")
args = parser.parse_args()

ttr.tune_allocator()
torch.set_num_threads(1)
found = finished(args.results_dir)  # run id -> record
run_ids = {id(r): run_id for run_id, r in found.items()}
records = leaderboard.mqar_records(found.values())
meta = json.loads((args.results_dir / "sweep.json").read_text())
planned = leaderboard.planned_mqar(leaderboard.planned_sweep(meta)[1])
# the run each report row shows, so that the report's by-load table gains exactly these
best = leaderboard.best_mqar_runs(records, planned)  # (layer, variant, d, P, T) -> record
todo = [(args.results_dir / "runs" / f"{r['label']}-{run_ids[id(r)]}.json", r)
        for (_, variant, d, P, T), r in sorted(best.items(), key=lambda kv: -kv[0][4])
        if variant == "paper" and P >= args.min_pairs and args.d_model in (None, d)
        and r["result"]["accuracy"] < 1
        and "accuracy_by_load" not in r["result"]]
print(f"{len(todo)} runs to backfill, {sum(r['seconds'] for _, r in todo) / 3600:.2f} h "
      "as recorded:")
for path, _ in todo:
    print("  ", path.name)
if args.dry_run:
    raise SystemExit
for path, record in tqdm(todo, desc="runs"):
    start = time.perf_counter()
    with tqdm(total=record["config"]["steps"], desc=record["label"], leave=False) as bar:
        result = run_mqar(MQARRun.from_dict(record["config"]),
                          lambda done, total, bar=bar: bar.update(done - bar.n))
    took = time.perf_counter() - start
    if result["accuracy"] != record["result"]["accuracy"]:
        tqdm.write(f"{path.name}: retrained to {result['accuracy']!r}, recorded "
                   f"{record['result']['accuracy']!r}; left alone")
        continue
    record["result"]["accuracy_by_load"] = result["accuracy_by_load"]
    record["result"]["accuracy_by_load_backfilled"] = True
    write_json_atomic(path, record)
    tqdm.write(f"{path.name}: the same accuracy; split added ({took / 60:.1f} min)")
