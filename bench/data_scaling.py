"""How the data stages scale: validate and vectorize on the corpus replicated 1x, 4x, 16x.

Builds `fra-eng.zip` archives holding the corpus `k` times. Copy 0 is the corpus as it is; copy
j >= 1 appends the marker token ` c<j>` to both sides of every line, so copies are distinct pairs
(deduplication keeps them) and distinct English sources (the split hashes them apart, so the
train/valid/test shares stay those of the corpus). Each stage runs as its own subprocess
(`pipelines/validate.py`, then `pipelines/vectorize.py`) with the params file given, except that
`validate.max_rows` and the zip-bomb guards are raised to fit the replicated corpus. Wall time and
peak RSS (the child's `ru_maxrss` from `os.wait4`) are recorded per stage and size.

Prints one JSON object (also written to `<out>.json`) and plots time and peak RSS against pairs
to `<out>.png`. The machine's load average is recorded before and after each stage: on a shared
machine the timings are only as good as the load beside them.

Usage: python bench/data_scaling.py [--archive ../shared/data/fra-eng.zip] [--sizes 1 4 16]
           [--params params.yaml] [--profile FILE] [--out reports/bench/data_scaling]
           [--work-dir DIR] [--timeout 3600]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from nmt.config import load_params, merge, read_yaml

REPO = Path(__file__).resolve().parents[1]
MEMBER = "fra-eng/fra.txt"


def replicate(archive: Path, copies: int, out: Path, member: str) -> int:
    """Write `out` holding the corpus member of `archive` `copies` times; return its line count."""
    with zipfile.ZipFile(archive) as zf:
        name = next(n for n in zf.namelist() if n.endswith("/" + member) or n == member)
        lines = [ln.removesuffix(b"\r") for ln in zf.read(name).split(b"\n") if ln.strip()]
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf, \
            zf.open(MEMBER, "w", force_zip64=True) as fh:
        for copy in range(copies):
            marker = f" c{copy}".encode() if copy else b""
            for line in lines:
                fields = line.split(b"\t")
                if len(fields) >= 2:  # malformed lines stay as they are (validate rejects them)
                    fields[:2] = [fields[0] + marker, fields[1] + marker]
                fh.write(b"\t".join(fields) + b"\n")
    return len(lines) * copies


def _params_file(params: Path, profile: Path | None, lines: int, out: Path) -> Path:
    raw = merge(read_yaml(params), read_yaml(profile)) if profile else read_yaml(params)
    bundled = raw["download"].get("bundled", "")
    if bundled and not Path(bundled).is_absolute():  # keep the path valid from the work dir
        raw["download"]["bundled"] = str((params.parent / bundled).resolve())
    raw = merge(raw, {"validate": {"max_rows": max(raw["validate"]["max_rows"], 2 * lines)},
                      "download": {"max_uncompressed_bytes": 1 << 40,
                                   "max_compression_ratio": 1000.0}})
    out.write_text(json.dumps(raw), encoding="utf-8")  # JSON is YAML
    load_params(out)  # fail here, not inside a timed stage
    return out


def run_stage(args: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run one stage script; wall time, the child's peak RSS, exit code, load average."""
    load_before = os.getloadavg()
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as fh:
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=fh, stderr=fh)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen quiet
    return {"wall_s": round(time.perf_counter() - start, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "exit_code": proc.returncode, "timed_out": time.perf_counter() > deadline,
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()], "log": str(log)}


def bench_size(archive: Path, copies: int, work: Path, params: Path, profile: Path | None,
               timeout: float) -> list[dict[str, Any]]:
    """Both stages on the corpus replicated `copies` times; one result row per stage."""
    folder = work / f"x{copies}"
    folder.mkdir(parents=True, exist_ok=True)
    base = load_params(params, profile)
    lines = replicate(archive, copies, folder / "fra-eng.zip", base.download.corpus_member)
    params_file = _params_file(params, profile, lines, folder / "params.json")
    pairs, processed = folder / "pairs.parquet", folder / "processed"
    stages = {
        "validate": ["pipelines/validate.py", "--params", str(params_file), "--archive",
                     str(folder / "fra-eng.zip"), "--out", str(pairs), "--reports",
                     str(folder / "reports/validation")],
        "vectorize": ["pipelines/vectorize.py", "--params", str(params_file), "--pairs",
                      str(pairs), "--out-dir", str(processed), "--stats",
                      str(folder / "reports/stats.json")],
    }
    rows = []
    for stage, args in stages.items():
        row = {"copies": copies, "lines": lines, "stage": stage,
               **run_stage(args, folder / f"{stage}.log", timeout)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if row["exit_code"] != 0:
            break
    if len(rows) == 2 and rows[1]["exit_code"] == 0:
        stats = json.loads((folder / "reports/stats.json").read_text(encoding="utf-8"))
        rows[1]["train_pairs"] = stats["train"]["pairs"]
    for row in rows:
        row["pairs_per_hour"] = round(lines / row["wall_s"] * 3600) if row["wall_s"] else None
    return rows


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Wall time and peak RSS against pairs, one line per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for stage, color in (("validate", "tab:blue"), ("vectorize", "tab:orange")):
        done = [r for r in rows if r["stage"] == stage and r["exit_code"] == 0]
        x = [r["lines"] / 1e6 for r in done]
        axes[0].plot(x, [r["cpu_s"] for r in done], "o-", color=color, label=f"{stage} CPU")
        axes[0].plot(x, [r["wall_s"] for r in done], "x--", color=color, alpha=0.5,
                     label=f"{stage} wall (load-dependent)")
        axes[1].plot(x, [r["peak_rss_mb"] / 1024 for r in done], "o-", color=color, label=stage)
    axes[0].set(xlabel="pairs (millions)", ylabel="seconds", title="time per stage")
    axes[1].set(xlabel="pairs (millions)", ylabel="peak RSS (GiB)", title="peak memory per stage")
    axes[1].axhline(4, color="grey", linestyle="--", linewidth=1, label="4 GiB target")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=REPO / "data/external/fra-eng.zip")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16],
                        help="copies of the corpus per run")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--profile", type=Path, default=None, help="params overrides file")
    parser.add_argument("--out", type=Path, default=REPO / "reports/bench/data_scaling",
                        help="writes <out>.json and <out>.png")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep archives and outputs here (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per stage run")
    args = parser.parse_args(argv)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="data-scaling-"))
    result: dict[str, Any] = {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
        "machine_note": "shared machine: compare timings with the load averages beside them "
                        "(1, 5, 15 min, before and after each stage); cpu_s is steadier",
        "archive": str(args.archive), "sizes": args.sizes, "results": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for copies in args.sizes:
            result["results"] += bench_size(
                args.archive.resolve(), copies, work.resolve(), args.params.resolve(),
                args.profile.resolve() if args.profile else None, args.timeout)
            # written after every size, so a run stopped early keeps what it measured
            args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n",
                                                     encoding="utf-8")
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    plot(result["results"], args.out.with_suffix(".png"))
    print(json.dumps(result, indent=2))
    return 0 if all(r["exit_code"] == 0 for r in result["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
