"""One command for the leaderboard: train and evaluate every image family and the CNN baseline on the
synthetic data and the shared MedMNIST subsets over 3 seeds; write ``docs/results.md`` and a CSV.

Every job is ``python train.py model=<m> data=<d> seed=<s> ...`` (printed, and listed in the results
with its exact command), run in its own folder ``<out>/<data>/<model>/seed<s>``; its metrics.yaml and
job.yaml are copied into the store ``docs/leaderboard/<data>/<model>/seed<s>`` (committed), and a job
the store holds is skipped, so an interrupted leaderboard resumes where it stopped, also in a fresh
checkout (the cnn model a later proto_head / GdVAE job needs is then rebuilt by its seeded command). Each job
measures on the test split (``train(cfg)``: accuracy/AUROC on the whole split, explanation metrics on
256 balanced test images; the CNN's Grad-CAM layer is chosen on val). Families run with
``evaluate.compare_baseline=false``: the baseline is the ``cnn`` job of the same data and seed, trained by
the same command with the same trainer budget (GdVAE loads it as its independent judge,
``evaluate.baseline``). Columns: accuracy, AUROC, hit rate, deletion AUC (the headline is the worst of
grey / blur / noise, then each substrate), insertion AUC (likewise, worst = lowest), stability, map IoU,
and any family metric a job reports; mean ± std over seeds (std over the seeds that ran; n in the table).

    python benchmarks/leaderboard.py            # everything (hours on a CPU)
    python benchmarks/leaderboard.py --quick    # smoke: 1 seed, synthetic, tiny subsets, 1 short epoch
    python benchmarks/leaderboard.py --jobs 2   # two jobs at once (one thread each)
    python benchmarks/leaderboard.py --report-only   # tables from the jobs done so far (marked incomplete)
"""

from __future__ import annotations

import argparse
import csv
import re
import os
import shlex
import statistics
import subprocess
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["cnn", "bagnet", "patchnet", "patch_additive", "protopnet", "prob_protopnet", "proto_head", "sop", "gdvae"]
DATA = ["synthetic", "breastmnist", "pneumoniamnist", "retinamnist"]
COLUMNS = ["acc", "auroc", "hit_rate", "energy_in_mask", "deletion_auc", "deletion_auc[grey]", "deletion_auc[blur]",
           "deletion_auc[noise]", "insertion_auc", "insertion_auc[grey]", "insertion_auc[blur]",
           "insertion_auc[noise]", "stability", "map_iou", "argmax_shift"]
QUICK = ["trainer=fast", "data.n_train=128", "data.n_val=64", "data.n_test=64", "evaluate.n_images=32",
         "evaluate.steps=8"]


NEEDS_CNN = {"proto_head": ["model.backbone_checkpoint={}"],  # {}: the cnn job's model folder (see command)
             "gdvae": ["evaluate.baseline={}", "evaluate.posthoc=false"]}
# A family runs with its library defaults unless its defaults are for other data: then with the zoo's recipe
# for that data, chosen on val. GdVAE's default decoder draws the whole image (the medical images); the
# synthetic images are objects on a textured background, where its counterfactuals are judged valid by the
# cnn job only 0.32 ± 0.05 of the time (test, 3 seeds). The recipe (conf/experiment/gdvae_synthetic.yaml:
# object decoder, FiLM, class term, recon σ at the data's noise, prototype path) was chosen on val, judged
# by the cnn job of seed 0: 0.90 vs 0.26 for the defaults (benchmarks/gdvae_val_validity.py,
# docs/notes/gdvae.md).
RECIPES = {("gdvae", "synthetic"): ["experiment=gdvae_synthetic"]}


def command(model: str, data: str, seed: int, out: Path, extra: list[str]) -> list[str]:
    """The job's train.py command; ``out`` is the job's folder (<root>/<data>/<model>/seed<s>)."""
    out = out.resolve()
    out = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out  # commands run from ROOT: portable
    # Two families use the cnn job of the same data and seed (run before them: cnn comes first in
    # FAMILIES): proto_head sits on it as its frozen backbone (as conf/experiment/proto_head_synthetic.yaml
    # does with the shipped cnn-synthetic), and it is GdVAE's independent judge of counterfactual
    # validity and realism (its post-hoc rows are the cnn job's own, not measured again).
    cnn_job = out.parent.parent / "cnn" / out.name / "model"
    named = [a.format(cnn_job) for a in NEEDS_CNN.get(model, [])]
    return [sys.executable, "train.py", f"model={model}", f"data={data}", f"seed={seed}", "logger=none",
            *RECIPES.get((model, data), []), "evaluate.compare_baseline=false", f"hydra.run.dir={out}", *named,
            *extra]


def plain_row(name: str) -> str:
    """A row name without the Grad-CAM layer, which can differ between seeds."""
    name = re.sub(r"grad-cam best\[[^\]]*\]", "grad-cam best", name)
    return re.sub(r"grad-cam\[[^\]]*\]", "grad-cam last", name)


def job_rows(metrics: dict) -> dict[str, dict[str, float]]:
    """metrics.yaml ("row/metric": value) -> rows; accuracy/AUROC copied onto the job's other rows."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if "/" not in key or not isinstance(value, (int, float)):
            continue
        row, metric = key.rsplit("/", 1)
        if metric.startswith("test") or metric.startswith("val"):
            continue
        rows.setdefault(plain_row(row), {})[metric] = float(value)
    cls = next((r for r in rows.values() if "acc" in r), {})
    return {name: {**{k: cls[k] for k in ("acc", "auroc") if k in cls}, **r} for name, r in rows.items()}


def job_folder(out: Path, job: tuple[str, str, int]) -> Path:
    d, m, s = job
    return out / d / m / f"seed{s}"


_cnn_locks: dict[tuple[str, int], threading.Lock] = {}


def run_job(job: tuple[str, str, int], out: Path, store: Path, extra: list[str], shown: str) -> str | None:
    """Run one train.py job in its folder under ``out`` unless the store holds its metrics.yaml; copy
    metrics.yaml and job.yaml (wall time, start/end, commit) into the store. The failure line, or None."""
    d, m, s = job
    folder = job_folder(out, job)
    if (job_folder(store, job) / "metrics.yaml").exists():
        print(f"skip (done): {shown}", flush=True)
        return None
    if m in NEEDS_CNN:
        failed = rebuild_cnn_model((d, "cnn", s), out, store, extra)
        if failed:
            return f"{shown}  (its cnn job: {failed})"
    print(f"$ {shown}", flush=True)
    if m == "cnn":  # held while it trains, so a proto_head / GdVAE job of its seed waits instead of rebuilding
        with _cnn_locks.setdefault((d, s), threading.Lock()):
            failed = train_job(job, folder, store, extra)
    else:
        failed = train_job(job, folder, store, extra)
    return f"{shown}  ({failed})" if failed else None


def train_job(job: tuple[str, str, int], folder: Path, store: Path | None, extra: list[str]) -> str | None:
    d, m, s = job
    started, commit = time.time(), git_commit()  # the code the job starts with
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # one core per job
    proc = subprocess.run(command(m, d, s, folder, extra), cwd=ROOT, capture_output=True, text=True, env=env)
    ended = time.time()
    print(f"  {'ok' if proc.returncode == 0 else 'FAILED'} in {ended - started:.0f} s: {d} {m} seed {s}", flush=True)
    if proc.returncode != 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "error.log").write_text(proc.stdout + proc.stderr)
        return f"log: {folder / 'error.log'}"
    # start/end as Unix times, not file mtimes: the store is committed and git keeps no mtimes
    (folder / "job.yaml").write_text(yaml.safe_dump({"wall_s": round(ended - started), "started": round(started),
                                                     "ended": round(ended), "commit": commit,
                                                     "machine": machine()}))
    if store is not None:
        record = job_folder(store, job)
        if record.resolve() != folder.resolve():
            record.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.yaml", "job.yaml"):
                shutil.copyfile(folder / name, record / name)
    return None


def rebuild_cnn_model(cnn: tuple[str, str, int], out: Path, store: Path, extra: list[str]) -> str | None:
    """The cnn job's model folder for proto_head / GdVAE. A leaderboard resumed in a fresh checkout has
    the cnn job's committed metrics but not its weights (not committed: a MB each); the same seeded
    command rebuilds them (CPU runs are reproducible), and the rebuilt job's accuracy must match the
    stored one, else the dependent job would sit on a different model than the one reported."""
    folder = job_folder(out, cnn)
    with _cnn_locks.setdefault((cnn[0], cnn[2]), threading.Lock()):  # proto_head and gdvae may both ask
        if not (folder / "model").exists():
            print(f"  rebuilding the cnn model of {cnn[0]} seed {cnn[2]} (its metrics are stored)", flush=True)
            failed = train_job(cnn, folder, None, extra)
            if failed:
                return failed
    stored = job_folder(store, cnn) / "metrics.yaml"
    if stored.exists() and (folder / "metrics.yaml").exists():  # checked on every use, not only on a rebuild
        acc = {k: v for k, v in yaml.safe_load(stored.read_text()).items() if k.endswith("/acc")}
        again = {k: v for k, v in yaml.safe_load((folder / "metrics.yaml").read_text()).items() if k in acc}
        if again != acc:
            # seeded CPU runs repeat on one machine, not across CPUs (other kernels, other rounding)
            return (f"the rebuilt cnn model differs from the stored job ({again} vs {acc}; a different CPU "
                    f"rounds differently): delete {job_folder(store, cnn)} and the records that sit on it "
                    f"({', '.join(str(job_folder(store, (cnn[0], m, cnn[2]))) for m in NEEDS_CNN)}) and rerun")
    return None


README = ROOT / "README.md"
README_BEGIN, README_END = "<!-- leaderboard:begin (benchmarks/leaderboard.py writes this block from docs/results.csv) -->", \
    "<!-- leaderboard:end -->"
HEADLINE = [("acc", "acc"), ("auroc", "AUROC"), ("hit_rate", "hit rate"), ("deletion_auc", "deletion ↓ (worst)"),
            ("insertion_auc", "insertion ↑ (worst)")]
GDVAE = [("cf_validity_judge", "validity by the cnn"), ("cf_validity_judge_worst", "worst class (cnn)"),
         ("cf_validity", "self-judged"), ("cf_judge_nn_ratio", "realism (nn ratio, cnn)")]


def headline(csv_path: Path) -> str:
    """The README's results block, read from the leaderboard's CSV: per data set, each family's own
    explanation row (``<model> (<kind>)``) and the cnn's best-layer Grad-CAM and IG rows; then GdVAE's
    counterfactual validity, judged by the cnn job of the same seed, with the self-judged one beside it."""
    rows = list(csv.DictReader(csv_path.open()))

    def cell(r: dict, c: str) -> str:
        return f"{float(r[c + '_mean']):.3f} ± {float(r[c + '_std']):.3f}" if r.get(c + "_mean") else "-"

    def own(r: dict) -> bool:
        if r["model"] == "cnn":
            return r["row"] in ("cnn grad-cam best", "cnn integrated-gradients")
        return re.fullmatch(rf"{re.escape(r['model'])} \([a-z -]+\)", r["row"]) is not None and bool(
            r.get("deletion_auc_mean"))

    lines = ["Test split, mean ± std over seeds (n), from [docs/results.md](docs/results.md); deletion / insertion: "
             "the worst of the grey, blur and noise substrates. Hit rate needs ground-truth masks (synthetic only).", ""]
    for d in dict.fromkeys(r["data"] for r in rows):
        here = [r for r in rows if r["data"] == d and own(r)]
        cols = [(c, name) for c, name in HEADLINE if any(r.get(c + "_mean") for r in here)]
        lines += [f"**{d}**", "", "| model | explanation | n | " + " | ".join(n for _, n in cols) + " |",
                  "|" + "---|" * (len(cols) + 3)]
        lines += [f"| {r['model']} | {r['row'][len(r['model']) + 1:].strip('()')} | {r['n_seeds']} | "
                  + " | ".join(cell(r, c) for c, _ in cols) + " |" for r in here]
        lines.append("")
    cf = [r for r in rows if r["row"] == "gdvae (counterfactuals)" and r.get("cf_validity_judge_mean")]
    if cf:
        lines += ["**GdVAE counterfactuals** (toward every other class; judge: the cnn job of the same data and seed)",
                  "", "| data | n | " + " | ".join(n for _, n in GDVAE) + " |", "|" + "---|" * (len(GDVAE) + 2)]
        lines += [f"| {r['data']} | {r['n_seeds']} | " + " | ".join(cell(r, c) for c, _ in GDVAE) + " |" for r in cf]
        lines.append("")
    return "\n".join(lines)


def write_readme_block(csv_path: Path, readme: Path = README) -> None:
    """Replace the README's block between the markers with :func:`headline` (its numbers' one home)."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme}: no leaderboard block ({README_BEGIN} ... {README_END})")
    head, rest = text.split(README_BEGIN, 1)
    readme.write_text(head + README_BEGIN + "\n" + headline(csv_path) + "\n" + README_END + rest.split(README_END, 1)[1])


def busy_hours(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals, in hours: the leaderboard's wall time when it ran
    in several invocations (sessions) with idle gaps between them."""
    total, reach = 0.0, float("-inf")
    for b, e in sorted(spans):
        total += max(0.0, e - max(b, reach))
        reach = max(reach, e)
    return total / 3600


def git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "zoo", "conf", "train.py"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return (proc.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty else "")


def machine() -> str:
    """The CPU and torch build a job ran on: seeded CPU runs repeat on one machine, not across CPUs."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, synthetic only, tiny subsets, 1 short epoch")
    ap.add_argument("--out", type=Path, default=None, help="job folders (default logs/leaderboard[-quick])")
    ap.add_argument("--store", type=Path, default=None,
                    help="where each job's metrics.yaml + job.yaml are kept (default docs/leaderboard, committed, "
                         "so a leaderboard resumes in a fresh checkout; --quick: the job folders)")
    ap.add_argument("--results", type=Path, default=None,
                    help="markdown (default docs/results.md; --quick: <out>/results.md)")
    ap.add_argument("--models", nargs="+", default=FAMILIES)
    ap.add_argument("--data", nargs="+", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--jobs", type=int, default=1, help="jobs run at once (each on one thread)")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: write the results of the jobs already done (the rest listed as not run)")
    args = ap.parse_args()
    tag = "-quick" if args.quick else ""
    out = args.out or ROOT / "logs" / f"leaderboard{tag}"
    store = args.store or (out if args.quick else ROOT / "docs" / "leaderboard")
    md = args.results or (out / "results.md" if args.quick else ROOT / "docs" / "results.md")  # smoke: not in docs
    data = args.data or (["synthetic"] if args.quick else DATA)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    extra = QUICK if args.quick else []

    jobs = [(d, m, s) for d in data for m in args.models for s in seeds]  # synthetic (first in DATA) first
    commands = {(d, m, s): "python " + shlex.join(command(m, d, s, job_folder(out, (d, m, s)), extra)[1:])
                for d, m, s in jobs}
    started_all = time.perf_counter()
    failed: list[str] = []
    if not args.report_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads only wait on subprocesses
            failed = [f for f in pool.map(lambda job: run_job(job, out, store, extra, commands[job]), jobs) if f]
    missing = [commands[j] for j in jobs if not (job_folder(store, j) / "metrics.yaml").exists()]
    wall = time.perf_counter() - started_all
    cells: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    job_commits: set[str] = set()
    machines: set[str] = set()  # wall times compare only within one machine
    spans: list[tuple[float, float]] = []  # (start, end) of each job done
    order = {name: i for i, name in enumerate([*DATA, *FAMILIES])}
    for d, m, s in sorted(jobs, key=lambda j: (order.get(j[0], len(order)), order.get(j[1], len(order)), j[2])):
        path = job_folder(store, (d, m, s)) / "metrics.yaml"
        if path.exists():
            job_file = path.parent / "job.yaml"
            job = yaml.safe_load(job_file.read_text()) if job_file.exists() else {}
            job_commits.add(job.get("commit", "unknown"))
            machines.add(job.get("machine", "not recorded"))
            if "started" in job:
                spans.append((job["started"], job["ended"]))
            for row, values in job_rows(yaml.safe_load(path.read_text())).items():
                cells.setdefault((d, m, row), []).append(values)

    columns = [c for c in COLUMNS if any(c in v for vs in cells.values() for v in vs)]
    columns += sorted({k for vs in cells.values() for v in vs for k in v} - set(columns))

    def stat(values: list[dict[str, float]], c: str) -> tuple[str, float | None, float | None]:
        xs = [v[c] for v in values if c in v]
        if not xs:
            return "-", None, None
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{statistics.fmean(xs):.3f} ± {sd:.3f}", statistics.fmean(xs), sd

    md.parent.mkdir(parents=True, exist_ok=True)
    with md.with_suffix(".csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["data", "model", "row", "n_seeds", *(x for c in columns for x in (f"{c}_mean", f"{c}_std"))])
        for (d, m, row), values in cells.items():
            w.writerow([d, m, row, len(values), *(x if x is not None else "" for c in columns
                                                  for x in stat(values, c)[1:])])
    lines = ["# Leaderboard" + (" (--quick smoke run: not a result)" if args.quick else ""), "",
             f"Generated by `python benchmarks/leaderboard.py{' --quick' if args.quick else ''}` "
             f"({time.strftime('%Y-%m-%d')}). Test split; the Grad-CAM layer is chosen on val. deletion_auc = "
             "the worst (highest) of the grey / blur / noise substrates, insertion_auc = the worst (lowest); "
             "equal-score pixels switch together. Mean ± std over seeds " + ", ".join(map(str, seeds)) + " of each "
             "seed's value (the headline is each seed's worst substrate, so its mean can exceed every "
             "substrate's mean). Each family trains with its defaults (`trainer.max_epochs` null: 6 epochs "
             "or its schedule's length), except " + ", ".join(f"{m} on {d} (`{' '.join(r)}`)" for (m, d), r in
                                                       RECIPES.items()) + ", whose defaults are for other data "
             "(see the command); the cnn rows are the baseline job of the same data and seeds. "
             f"Code: commit(s) {', '.join(sorted(job_commits))}. Machine(s): {'; '.join(sorted(machines))}. " + (
                 f"Wall time: {busy_hours(spans):.2f} h while jobs were running (the union of the jobs' "
                 f"start-to-end intervals over all invocations; the gaps between them do not count), "
                 f"{sum(e - b for b, e in spans) / 3600:.2f} h summed over the {len(spans)} jobs (each on one "
                 "thread; " if spans else "(") + f"this invocation: {wall:.0f} s with "
             f"{args.jobs} job(s) at once, jobs already done skipped; each job's wall time and commit are in its "
             "folder's job.yaml).", ""]
    main = [c for c in COLUMNS if c in columns]  # one wide table per data set; family metrics listed below it
    for d in data:
        lines += [f"## {d}", "", "| model | row | n | " + " | ".join(main) + " |", "|" + "---|" * (len(main) + 3)]
        family: list[str] = []
        for (dd, m, row), values in cells.items():
            if dd == d:
                lines.append(f"| {m} | {row} | {len(values)} | " + " | ".join(stat(values, c)[0] for c in main) + " |")
                family += [f"| {m} | {row} | {c} | {stat(values, c)[0]} |" for c in columns
                           if c not in main and stat(values, c)[1] is not None]
        if family:
            lines += ["", f"Family metrics ({d}):", "", "| model | row | metric | mean ± std |", "|---|---|---|---|",
                      *family]
        lines.append("")
    lines += ["## Commands", "", "Run from the repository root; each writes its folder's metrics.yaml.", "", "```",
              *commands.values(), "```", ""]
    if failed:
        lines += ["## Failed jobs", "", *(f"- `{x}`" for x in failed), ""]
    if missing:
        lines[0] += f" — INCOMPLETE: {len(missing)} of {len(jobs)} jobs not run yet"
        lines += ["## Jobs not run yet", "", "Rerun the same command: it skips the jobs already done.", "",
                  *(f"- `{x}`" for x in missing), ""]
    md.write_text("\n".join(lines))
    print(f"wrote {md} and {md.with_suffix('.csv')}" + (f"; {len(failed)} job(s) failed" if failed else ""))
    if args.results is None and not args.quick:  # the published page: the README's numbers follow it
        write_readme_block(md.with_suffix(".csv"))
        print(f"updated the results block of {README}")


if __name__ == "__main__":
    main()
