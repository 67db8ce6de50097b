"""Rehearse OSV-5M at full size without it: fabricate an OSV-5M-shaped dataset and its embeddings
(benchmark.fabricate), then run every stage after embedding on it, each in its own process, exactly as a
user runs them on real data. Prints a table and, last, one JSON line: per stage its wall seconds, peak RSS
(GB) and exit code, plus the GeoScores.

    python -m benchmark.rehearse                                    # 5,100,000 train / 210,122 test / 768-d
    python -m benchmark.rehearse --train 1000000 --test 20000 --out runs/rehearse-1m
    python -m benchmark.rehearse --out runs/rehearse-1m --from benchmark    # rerun the last stages

Stages:
    fabricate   python -m benchmark.fabricate         train.csv, test.csv (no val), image files, shards
    index       python -m embed.build --splits train test --set tune=false
                                                      reads both splits, finds every shard embedded, indexes
    tune        python -m retrieve.tune               no val: 2,000 train images held out of their search
    query       python -m retrieve.query --split test the engine's predictions for every test image
    benchmark   python -m benchmark.run               every method; the heads validate on held-out train
    score       python -m benchmark.score --json      the query stage's predictions, OSV-5M's metrics
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmark.fabricate import rehearsal_model
from geovote.layout import model_slug

STAGES = ("fabricate", "index", "tune", "query", "benchmark", "score")


def stage_commands(out: Path, n_train: int, n_test: int, dim: int, head_minutes: float | None,
                   bootstrap: int) -> dict[str, list[str]]:
    model = rehearsal_model(dim)
    engine = out / "geovote" / model_slug(model)
    index = engine / "index"
    pred = engine / "predictions-test.parquet"
    run = ["-m", "benchmark.run", "--data", str(out), "--engine", str(engine), "--out", str(out / "run"),
           "--set", f"bootstrap={bootstrap}"]
    if head_minutes is not None:
        run += ["--set", f"head_minutes={head_minutes}"]
    return {
        "fabricate": ["-m", "benchmark.fabricate", "--train", str(n_train), "--test", str(n_test), "--dim",
                      str(dim), "--out", str(out)],
        "index": ["-m", "embed.build", "--data", str(out), "--model", model, "--splits", "train",
                  "test", "--set", "tune=false"],
        "tune": ["-m", "retrieve.tune", "--index", str(index), "--data", str(out)],
        "query": ["-m", "retrieve.query", "--index", str(index), "--data", str(out), "--split", "test",
                  "--out", str(pred)],
        "benchmark": run,
        "score": ["-m", "benchmark.score", str(pred), "--truth", str(out / "test.csv"), "--json"],
    }


def _memory_kb(pid: int) -> tuple[int, int]:
    """(VmHWM, RssAnon + RssShmem) of a live process (kB), (0, 0) once it is gone. VmHWM: its peak RSS
    since its exec (the kernel's own high-water mark; the rusage of a child, os.wait4's ru_maxrss, also
    counts the parent's pages at the fork, 2 GB under pytest). RssAnon + RssShmem: the memory it holds
    that the kernel cannot drop, unlike the pages of the files it maps (the re-rank copy)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":" in line)
        kb = {k: int(fields.get(k, "0 kB").split()[0]) for k in ("VmHWM", "RssAnon", "RssShmem")}
        return kb["VmHWM"], kb["RssAnon"] + kb["RssShmem"]
    except (OSError, ValueError):
        return 0, 0


def run_stage(name: str, args: list[str], log_dir: Path, sample_s: float = 0.05) -> dict:
    """Run `python args...` to completion; its wall time, peak RSS (the kernel's high-water mark VmHWM of
    the stage's own process, not of processes it starts, which no stage of the rehearsal does; it
    includes the mapped files' pages it touched; read every `sample_s` until it exits, so a peak in its
    last `sample_s` can be missed), peak private memory (sampled likewise: what must stay
    resident) and exit code. Its output goes to <log_dir>/<name>.log."""
    log_path = log_dir / f"{name}.log"
    t0 = time.perf_counter()
    peak_kb = [0, 0]
    done = threading.Event()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT)

        def sample():
            while not done.is_set():
                hwm, private = _memory_kb(proc.pid)  # the zombie reads 0 until it is reaped below
                peak_kb[0], peak_kb[1] = max(peak_kb[0], hwm), max(peak_kb[1], private)
                done.wait(sample_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status = os.waitpid(proc.pid, 0)
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(peak_kb[0] / 2**20, 2),
            "peak_private_gb": round(peak_kb[1] / 2**20, 2), "rc": proc.returncode, "log": str(log_path)}


def geoscores(out: Path, dim: int) -> dict:
    """The GeoScores the stages left behind: tuning's held-out train, the query stage's test predictions
    (benchmark.score) and every benchmark.run method."""
    scores = {}
    params = out / "geovote" / model_slug(rehearsal_model(dim)) / "index" / "retrieve.json"
    if params.is_file():
        tuned = json.loads(params.read_text())["validation"]["voting"]
        scores["tune (held-out train)"] = round(tuned["geoscore"])
    score_log = out / "logs" / "score.log"
    if score_log.is_file():
        lines = [ln for ln in score_log.read_text().splitlines() if ln.startswith("{")]
        if lines:
            scores["query --split test"] = round(json.loads(lines[-1])["geoscore"])
    results = out / "run" / "results.json"
    if results.is_file():
        for m in json.loads(results.read_text())["methods"]:
            scores[m["name"]] = round(m["geoscore"])
    return scores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.rehearse", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=5_100_000)
    ap.add_argument("--test", type=int, default=210_122)
    ap.add_argument("--dim", type=int, default=768, help="embedding width, any (768: the model pixels:16; "
                                                         "512: pixels:8@512, benchmark.fabricate)")
    ap.add_argument("--out", type=Path, help="default runs/rehearse-<UTC time>")
    ap.add_argument("--from", dest="start", choices=STAGES, default="fabricate",
                    help="skip the stages before this one (their outputs are in --out already)")
    ap.add_argument("--head-minutes", type=float, help="each head's training budget (benchmark.run default)")
    ap.add_argument("--bootstrap", type=int, default=200, help="benchmark.run's bootstrap resamples")
    args = ap.parse_args(argv)
    try:
        rehearsal_model(args.dim)
    except ValueError as e:
        ap.error(str(e))
    if args.train < 100 or args.test < 1:
        ap.error("--train must be at least 100 and --test at least 1")
    out = args.out or Path("runs") / time.strftime("rehearse-%Y%m%d-%H%M%S", time.gmtime())
    out = out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    commands = stage_commands(out, args.train, args.test, args.dim, args.head_minutes, args.bootstrap)
    todo = STAGES[STAGES.index(args.start):]
    stages, failed = {}, None
    print(f"rehearsal: {args.train:,} train / {args.test:,} test / {args.dim}-d in {out}", flush=True)
    for name in todo:
        r = run_stage(name, commands[name], out / "logs")
        stages[name] = r
        print(f"  {name:<10} {r['wall_s']:8.1f} s  {r['peak_rss_gb']:6.2f} GB RSS  "
              f"{r['peak_private_gb']:6.2f} GB private  exit {r['rc']}", flush=True)
        if r["rc"] != 0:
            failed = name
            tail = Path(r["log"]).read_text().splitlines()[-15:]
            print(f"{name} failed (exit {r['rc']}); the end of {r['log']}:\n  " + "\n  ".join(tail),
                  file=sys.stderr)
            break
    scores = geoscores(out, args.dim)
    print("\n| stage | wall s | peak RSS GB | peak private GB |\n|---|---:|---:|---:|")
    for name, r in stages.items():
        print(f"| {name} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['peak_private_gb']:.2f} |")
    print(f"| total | {sum(r['wall_s'] for r in stages.values()):.1f} | "
          f"{max(r['peak_rss_gb'] for r in stages.values()):.2f} | "
          f"{max(r['peak_private_gb'] for r in stages.values()):.2f} |")
    print("\n| GeoScore | |\n|---|---:|\n" + "\n".join(f"| {k} | {v} |" for k, v in scores.items()))
    summary = {"train": args.train, "test": args.test, "dim": args.dim, "out": str(out),
               "stages": {k: {f: v[f] for f in ("wall_s", "peak_rss_gb", "peak_private_gb", "rc")}
                          for k, v in stages.items()},
               "total_wall_s": round(sum(r["wall_s"] for r in stages.values()), 1),
               "max_peak_rss_gb": max(r["peak_rss_gb"] for r in stages.values()),
               "max_peak_private_gb": max(r["peak_private_gb"] for r in stages.values()), "geoscores": scores}
    print(json.dumps(summary), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    from geovote.cli import exit_now

    exit_now(main())
