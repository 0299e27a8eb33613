"""``petl bench``: every benchmark side by side on this machine, one report.

Runs the bench scripts one after another (each in its own process, so one's threads, Ray cluster
or memory never leaks into the next), each writing its JSON (+ PNGs) into one directory
(default ``bench/results/<date>/``), then writes there:

- ``report.md``: goals vs measured (median, min-max spread over the repeats, n), the fidelity
  table and claims, the plots, the machine, and what each section cost;
- ``report.json``: every figure of the table, machine facts and section run records;
- ``logs/<section>.log``: each script's output;
- ``carried.json``: the sections not run into this directory, carried from an earlier one.

A report is self-contained: a section not run into its directory is carried from the newest older
dated folder next to it (``bench/results/<older date>/``) that has it. Its JSON and plots are copied
in, labelled with the date they were measured, so every figure and plot the report cites is a file
in its own directory.

``--quick`` (under 15 min on 2 cores) runs fewer repeats, smaller configurations and no ViT-B/16
where the goal is defined on the shipped backbone; fidelity then only re-aggregates runs already
in the directory (its training runs take about an hour: ``--only fidelity``). ``--report``
re-renders the report from the JSONs already there.

    petl bench [--quick] [--only P1,P6,fidelity] [--out DIR] [--report]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
P4_FIDELITY = ["--backbone", "petl_vit_t12_p4_32", "--batch", "64", "--suffix", "_fidelity", "--methods", "linear", "lora",
               "adapter", "repadapter", "arc", "dtl", "dtl_plus", "dyt", "dyn_adapter", "full"]

# section -> (script, quick args, full args, the JSON it writes)
SECTIONS = {
    "params": ("param_table.py", [], [], "param_table.json"),
    "P1": ("p1_fanout.py", ["--quick"], [], "p1_fanout.json"),
    "P2": ("p2_early_exit.py", ["--quick"], [], "p2_early_exit.json"),
    "P3": ("p3_token_dispatch.py", ["--quick"], [], "p3_token_dispatch.json"),
    "P4": ("p4_train_memory.py", ["--quick"], [], "p4_train_memory.json"),
    # the fidelity table's training-memory column: every method on the shipped backbone (the fidelity one)
    "P4_fidelity": ("p4_train_memory.py", None, P4_FIDELITY, "p4_train_memory_fidelity.json"),
    "P5": ("p5_mixed_tasks.py", ["--quick"], [], "p5_mixed_tasks.json"),
    "P6": ("p6_gflops.py", ["--quick"], [], "p6_gflops.json"),
    "multitenant": ("multitenant.py", ["--quick"], [], "multitenant.json"),  # P9, P10, P11
    "serve": ("serve_load.py", ["--quick"], [], "serve_load.json"),
    "predict": ("batch_predict.py", ["--quick"], [], "batch_predict.json"),  # petl predict (Ray Data) vs in-process
    # T1 (a sweep's trial-epoch vs the plain loop's epoch), T2 (petl train through Ray vs --local)
    "overhead": ("trial_overhead.py", ["--quick", "--compare-reuse"], ["--compare-reuse"], "trial_overhead.json"),
    # T2 as a user types it: each `petl train` command starts its own local cluster (warm workers or not)
    "cli_train": ("cli_train.py", None, [], "cli_train.json"),
    "P7": ("p7_asha_vs_grid.py", ["--quick", "--epochs", "4"], [], "p7_asha_vs_grid.json"),
    "colocation": ("colocation_hop.py", ["--repeats", "7"], [], "colocation_hop.json"),
    "dyt_curve": ("dyt_curve.py", None, [], "dyt_curve.json"),  # None: not in --quick
    "fidelity": ("fidelity.py", ["--aggregate-only"], [], "fidelity.json"),
    # lr chosen per task on val, >= 10 epochs every method, 3 seeds (hours on 2 cores; resumable)
    "fidelity_fair": ("fidelity.py", None, ["--fair"], "fidelity_fair.json"),
    # each method's recipe lr from the fair basis's runs, and its gap to per-task tuning (reads, no training)
    "recipes": ("recipe_lr.py", [], [], "recipe_lr.json"),
    # the fair basis through petl sweep: 4 tasks x every method x (lr, a second hyperparameter), ASHA
    # (hours on 2 cores; resumable)
    "fair_sweep": ("fair_sweep.py", None, [], "fair_sweep.json"),
}

# every file a section leaves in its directory (its JSON first: the section is there when that is), so
# that a report can carry a section it did not run from an earlier directory
ARTIFACTS = {name: [produced] for name, (_, _, _, produced) in SECTIONS.items()}
ARTIFACTS["P2"] += ["p2_accuracy_vs_flops.png"]
ARTIFACTS["dyt_curve"] += ["dyt_accuracy_vs_flops.png", "dyt_activation_rate.png"]
ARTIFACTS["fidelity"] += ["fidelity_pareto.png", "fidelity_exit_histograms.png", "fidelity_dyt_activation.png"]
ARTIFACTS["fidelity_fair"] += ["fidelity_fair_vs_default.png"]
ARTIFACTS["P7"] += ["p7_runs.json"]  # each finished sweep, so a rerun resumes
ARTIFACTS["fair_sweep"] += ["fair_sweep_runs.jsonl"]
# the reliability suite's figures: not run by `petl bench`, copied next to the bench JSONs (see figures())
ARTIFACTS.update({"corpus": ["corpus.json"], "faults_replica_kill": ["faults_replica_kill.json"],
                  "faults_node_loss_during_sweep": ["faults_node_loss_during_sweep.json"],
                  "faults_node_loss_while_serving": ["faults_node_loss_while_serving.json"]})
CARRIED = "carried.json"
DATED = re.compile(r"\d{4}-\d{2}-\d{2}")


# ----------------------------------------------------------------------------- carrying
def carried(out: Path) -> dict:
    """``out``'s carried sections: section -> {measured: date, files, cmd, wall_s, quick}."""
    return _load(out, CARRIED) or {}


def _save_carried(out: Path, manifest: dict) -> None:
    path = out / CARRIED
    if manifest:
        path.write_text(json.dumps(manifest, indent=2) + "\n")
    elif path.exists():
        path.unlink()


def older_dirs(out: Path) -> list[Path]:
    """The dated result folders next to ``out`` (``bench/results/<date>/``) older than it, newest first
    (every dated one when ``out``'s own name is not a date)."""
    if not out.parent.is_dir():
        return []
    dirs = [d for d in out.parent.iterdir() if d.is_dir() and DATED.fullmatch(d.name) and d.resolve() != out.resolve()]
    if DATED.fullmatch(out.name):
        dirs = [d for d in dirs if d.name < out.name]
    return sorted(dirs, key=lambda d: d.name, reverse=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def carry(out: Path) -> dict:
    """Copy into ``out`` every section it has no result for (its JSON and plots) from the newest older
    dated folder that has it, recorded in ``carried.json`` with the date it was measured (that folder's,
    or the date that folder itself carried it from). Returns the manifest.

    A carried section whose JSON has since been rewritten in ``out`` (the script run into it directly)
    is no longer carried: its entry goes, and so do its copies the run did not rewrite."""
    manifest = {}
    for name, rec in carried(out).items():
        files, digests = rec.get("files", []), rec.get("sha256", {})
        primary = ARTIFACTS.get(name, [None])[0]
        if primary and (out / primary).is_file() and digests.get(primary) == _sha256(out / primary):
            manifest[name] = rec
            continue
        for f in files:  # rerun in place: drop the stale copies it did not replace
            if f != primary and (out / f).is_file() and digests.get(f) == _sha256(out / f):
                (out / f).unlink()
    for name, files in ARTIFACTS.items():
        if (out / files[0]).exists():
            continue
        src = next((d for d in older_dirs(out) if (d / files[0]).is_file()), None)
        if src is None:
            continue
        run = (_load(src, "runs.json") or {}).get(name, {})
        rec = carried(src).get(name) or {"measured": src.name, **{k: run[k] for k in ("cmd", "wall_s", "quick", "finished")
                                                                   if k in run}}
        rec["files"] = [f for f in files if (src / f).is_file()]
        for f in rec["files"]:
            shutil.copy2(src / f, out / f)
        rec["sha256"] = {f: _sha256(out / f) for f in rec["files"]}
        manifest[name] = rec
    _save_carried(out, manifest)
    return manifest


def uncarry(out: Path, name: str) -> None:
    """Drop a carried section's copies before the section runs into ``out`` (its own files replace them)."""
    manifest = carried(out)
    if name in manifest:
        for f in manifest.pop(name)["files"]:
            (out / f).unlink(missing_ok=True)
        _save_carried(out, manifest)


def measured_on(out: Path, manifest: dict) -> dict:
    """file name -> the date its figures were measured: the carried date, or ``out``'s name."""
    dates = {f: out.name for files in ARTIFACTS.values() for f in files}
    dates.update({f: rec["measured"] for rec in manifest.values() for f in rec["files"]})
    return dates


def _label(files: list[str], dates: dict, out: Path, manifest: dict) -> str:
    carried_files = {f for rec in manifest.values() for f in rec["files"]}
    labels = []
    for f in files:
        label = dates.get(f, out.name) + (" (carried)" if f in carried_files else "")
        if label not in labels:
            labels.append(label)
    return ", ".join(labels)


# ----------------------------------------------------------------------------- running
def run_sections(names: list[str], out: Path, quick: bool) -> dict:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    for name in names:
        script, quick_args, full_args, produced = SECTIONS[name]
        args = quick_args if quick else full_args
        if args is None:  # keep the record of an earlier run of this section into the same directory
            runs[name] = runs[name] if "rc" in runs.get(name, {}) else {"skipped": "not part of --quick"}
            continue
        if name == "fidelity" and quick and not (out / "fidelity_runs.jsonl").exists():
            runs[name] = {"skipped": "--quick does not train the fidelity runs (about an hour): "
                                     "`petl bench --only fidelity` trains them into this directory"}
            continue
        uncarry(out, name)
        cmd = [sys.executable, str(BENCH / script), "--out-dir", str(out), *args]
        print(f"[{name}] bench/{script} {' '.join(args)}", flush=True)
        t0 = time.time()
        with open(logs / f"{name}.log", "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=BENCH.parent)
        shown = out.relative_to(BENCH.parent) if out.is_relative_to(BENCH.parent) else out
        rec = {"cmd": " ".join([f"bench/{script}", "--out-dir", str(shown), *args]), "rc": proc.returncode, "wall_s": round(time.time() - t0, 1),
               "quick": quick, "log": f"logs/{name}.log", "finished": dt.datetime.now().isoformat(timespec="seconds")}
        if proc.returncode != 0 or not (out / produced).exists():
            tail = (logs / f"{name}.log").read_text().strip().splitlines()[-3:]
            rec["error"] = " | ".join(tail) or f"exit {proc.returncode}"
        runs[name] = rec
        status = "ok" if "error" not in rec else f"FAILED: {rec['error']}"
        print(f"[{name}] {rec['wall_s']:.0f}s {status}", flush=True)
        runs_path.write_text(json.dumps(runs, indent=2) + "\n")
    runs_path.write_text(json.dumps(runs, indent=2) + "\n")
    return runs


# ----------------------------------------------------------------------------- figures
def _in_flight(row: dict) -> int:
    """Requests in flight on the lost replicas: from the fault until its detection (Serve's routers
    still send to them until then); older fault files recorded only those in flight at the fault."""
    return row.get("in_flight_until_detect", row["in_flight_at_fault"])


def gpu_md(out: Path) -> list[str]:
    """The GPU check (``bench/gpu_check.py``, run on a lent GPU and copied here as ``gpu_check*.json``):
    every runtime with 64 tasks in a batch of 64, against the bare backbone and against one task."""
    runs = [(p.name, json.loads(p.read_text())) for p in sorted(out.glob("gpu_check*.json"))]
    if not runs:
        return []
    lines = ["", "## On a GPU (`bench/gpu_check.py`)", "",
             "Engine only (no Ray: the GPU machine has none). Batch 64; N = 64 distinct tasks vs N = 1; the "
             "replica's path feeds uint8 pixels from pinned host memory and builds each row's answer.", "",
             "| file | device | backbone | dtype | bare img/s | runtime / method | N = 64 img/s | vs bare | N = 1 img/s | "
             "P5 (N=64 / N=1) |", "|---|---|---|---|---:|---|---:|---:|---:|---:|"]
    for name, r in runs:
        for key, v in r.get("runtimes", {}).items():
            one = f"{v['one_task_img_per_s']:,.0f}" if "one_task_img_per_s" in v else "-"
            p5 = f"{v['p5_ratio']:.2f}x" if "p5_ratio" in v else "-"
            lines.append(f"| `{name}` | {r['device']} | {r['backbone']} | {r['dtype']} | {r['bare_backbone_img_per_s']:,.0f} "
                         f"| {key} | {v['img_per_s']:,.0f} | {v['vs_bare']:.2f}x | {one} | {p5} |")
        if "replica_path_lora" in r:
            rp = r["replica_path_lora"]
            lines.append(f"| `{name}` | {r['device']} | {r['backbone']} | {r['dtype']} | {r['bare_backbone_img_per_s']:,.0f} "
                         f"| replica path (uint8 in, answers out), lora | {rp['img_per_s']:,.0f} | {rp['vs_bare']:.2f}x | - | "
                         f"{rp['vs_engine']:.2f}x the engine |")
    return lines


def _load(out: Path, name: str) -> dict | None:
    p = out / name
    return json.loads(p.read_text()) if p.exists() else None


def _per_round(ratios: list[float]) -> str:
    return ", ".join(f"{x:.2f}x" for x in ratios)


def _rounds_note(t2: dict, warm: bool) -> str:
    """What T2's rounds say. On a trainer: the first job starts it, the later jobs run in its
    process. As Tune trials on a cluster with warm workers: Ray starts idle workers with the
    cluster only, so the first job's trial took a warm one and later jobs' trials started cold."""
    if t2.get("runs_as", "").startswith("a trainer"):
        return (f"; per round {_per_round(t2.get('per_round', []))}: the first job started the trainer "
                f"({'on a warm worker' if warm else 'a new process, no warm workers'}), the later jobs ran in its "
                "process")
    if not warm:
        return ""
    return (f"; warm workers, per round {_per_round(t2.get('per_round', []))}: the first trial after the cluster "
            "started took a warm worker, later ones started cold (Ray 2.60 starts no new idle workers)")


def _fig(fid, name, median, spread, n, goal, met, unit="x", source="", note="") -> dict:
    return {"id": fid, "figure": name, "median": median, "spread": spread, "n": n, "unit": unit, "goal": goal,
            "met": None if met is None else bool(met), "source": source, "note": note}


def figures(out: Path) -> list[dict]:
    """Every figure with its goal, read from the JSONs in ``out`` (missing benches are skipped)."""
    figs = []
    if p1 := _load(out, "p1_fanout.json"):
        for r in p1["results"]:
            figs.append(_fig("P1", f"shared-trunk fan-out, {p1['tasks']} DTL tasks, batch {r['batch']} ({p1['backbone']})",
                             r["speedup_median"], [r["speedup_min"], r["speedup_max"]], r["repeats"], ">= 1.7x",
                             r["speedup_median"] >= 1.7, source="p1_fanout.json",
                             note=f"blocks run {r['blocks_run_shared']} vs {r['blocks_run_independent']}; outputs equal "
                                  f"(max diff {r['max_abs_diff_vs_alone']:.0e})"))
    if p2 := _load(out, "p2_early_exit.json"):
        drop = p2["accuracy_drop_pt"]
        for key in ("throughput_b1", "throughput_b64"):
            r = p2[key]
            figs.append(_fig("P2", f"early exit at a {int(100 * p2['budget'])} % budget vs full depth, batch {r['batch']} "
                                   f"({p2['method']}, {p2['task']})", r["speedup"], r["speedup_range"],
                             p2.get("repeats"), ">= 1.8x at <= 0.5 pt loss",
                             r["speedup"] >= 1.8 and drop <= 0.5, source="p2_early_exit.json",
                             note=f"accuracy {100 * p2['full_depth']['test_accuracy']:.1f} -> "
                                  f"{100 * p2['dynamic']['test_accuracy']:.1f} % ({-drop:+.1f} pt), measured FLOPs "
                                  f"{100 * p2['dynamic']['flops_fraction']:.0f} %"))
    if p3 := _load(out, "p3_token_dispatch.json"):
        for name, r in p3["runs"].items():
            figs.append(_fig("P3", f"DyT r=0.5 vs dense adapter, batch {r['batch']}, {name} ({r['backbone']})",
                             r["speedup_median"], [r["speedup_min"], r["speedup_max"]], r["repeats"], ">= 1.3x",
                             r["speedup_median"] >= 1.3, source="p3_token_dispatch.json",
                             note=f"measured activation {r['measured_activation_rate']:.3f}, FLOPs ratio {r['flops_ratio']:.2f}"))
    if p4 := _load(out, "p4_train_memory.json"):
        for key, r in p4.get("ratios", {}).items():
            res = p4["results"]
            ref = key.split("/")[1]
            figs.append(_fig("P4", f"training memory {key} (batch {p4['batch']}, {p4['backbone']})", r["ratio"], None, 1,
                             f"<= {r['goal']}x", r["met"], source="p4_train_memory.json",
                             note=f"{res['dtl']['peak_delta_mb']:,.0f} vs {res[ref]['peak_delta_mb']:,.0f} MB; {p4['measure']}"))
    serve = _load(out, "serve_load.json")
    if serve:
        figs += served_p5(serve)
    mt = _load(out, "multitenant.json")
    if (p5 := _load(out, "p5_mixed_tasks.json")) and not (mt and mt.get("P5")):  # multitenant's P5 (banks) wins
        for method, r in p5["families"].items():
            for n, v in r["by_n"].items():
                figs.append(_fig("P5", f"batch {p5['batch']} over N = {n} {method} tasks vs one merged task, in-process "
                                       f"({p5['backbone']})", v["ratio_median"], [v["ratio_min"], v["ratio_max"]],
                                 p5["rounds"], ">= 0.85x at N = 64" if n == "64" else "reported",
                                 v["ratio_median"] >= 0.85 if n == "64" else None, source="p5_mixed_tasks.json",
                                 note=f"{v['img_per_s']:.0f} vs {r['single_img_per_s']:.0f} img/s; answers equal alone "
                                      f"(max diff {r['max_abs_diff_vs_alone']:.0e})"))
    if mt:
        figs += multitenant_figures(mt)
    if bp := _load(out, "batch_predict.json"):
        what = f"{bp['images']} images x {bp['tasks']} LoRA tasks, batch {bp['batch']} ({bp['backbone']})"
        for key, r in (bp.get("runs") or {"default": {"actors": bp["ray_data_actors"], "device": bp["ray_data_device"],
                                                      "img_per_s": bp["ray_data_img_per_s"], "ratio": bp["ratio"]}}).items():
            default = key == "default"
            figs.append(_fig("predict", f"petl predict (Ray Data, {key}: {r['actors']} {r['device']} actor(s)"
                                        f"{', ' + str(r['threads']) + ' threads each' if r.get('threads') else ''}) vs "
                                        f"the in-process engine, {what}", r["ratio"], r.get("ratio_range"),
                             bp.get("rounds", 1), ">= 0.6x" if default else "reported",
                             r["ratio"] >= 0.6 if default else None, source="batch_predict.json",
                             note=f"{r['img_per_s']:.1f} vs {bp['in_process_img_per_s']:.1f} img/s; Ray end to end "
                                  f"(reads, decoding, actor start-up, parquet), in-process engine calls only"
                                  + (f"; {r['overhead_s']:.0f} s beyond the engine's own time (first result at "
                                     f"{r['first_result_s']:.0f} s)" if "overhead_s" in r else "")
                                  + (f"; with warm workers, per round {_per_round(r['per_round'])}"
                                     if bp.get("warm_workers") and r.get("per_round") else "")))
    # the default run (LoRA) and any other method's run of the same bench (trial_overhead_<method>.json)
    for name in ["trial_overhead.json", *sorted(p.name for p in out.glob("trial_overhead_*.json")
                                                if "before" not in p.name)]:
        if not (ov := _load(out, name)):
            continue
        what = f"{ov['method']} on {ov['task']}, {ov['epochs']} epochs, {ov['cpus']} CPUs ({ov['backbone']})"
        t2 = ov["T2"]
        if t1 := ov.get("T1"):  # a T2-only run (--trials 0) has no sweep
            parts = ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in t1["breakdown_s_per_trial_epoch"].items())
            figs.append(_fig("T1", f"sweep wall per trial-epoch ({ov['trials']} trials, FIFO, one at a time with every "
                                   f"CPU) vs the plain loop's epoch, {what}", t1["ratio"], t1["range"], ov["rounds"],
                             "<= 2x", t1["met"], source=name,
                             note=f"{t1['per_trial_epoch_s']:.1f} vs {ov['plain_epoch_s']:.1f} s; s per trial-epoch: "
                                  f"{parts}"))
        if fresh := ov.get("T1_fresh_actors"):
            figs.append(_fig("T1", f"the same with a new actor per trial (Tune's default, before issue 23), {what}",
                             fresh["ratio"], fresh["range"], ov["rounds"], "reported", None, source=name,
                             note=f"{fresh['per_trial_epoch_s']:.1f} s per trial-epoch"))
        runs_as = t2.get("runs_as", "a one-worker Ray Train TorchTrainer")  # older runs: "one Tune trial"
        figs.append(_fig("T2", f"petl train through Ray ({runs_as}) on a running cluster vs --local (the plain "
                               f"loop), {what}", t2["ratio"], t2["range"], ov["rounds"], "<= 1.5x", t2["met"],
                         source=name, note=f"{t2['ray_train_wall_s']:.1f} vs {ov['plain_wall_s']:.1f} s"
                                          + _rounds_note(t2, bool(ov.get("warm_workers")))))
        if tt := ov.get("T2_torch_trainer"):
            figs.append(_fig("T2", f"the same job through a one-worker Ray Train TorchTrainer (how one worker ran "
                                   f"before), {what}", tt["ratio"], tt["range"], ov["rounds"], "reported", None,
                             source=name, note=f"{tt['ray_train_wall_s']:.1f} vs {ov['plain_wall_s']:.1f} s"))
    if cli := _load(out, "cli_train.json"):
        what = f"{cli['method']} on {cli['task']}, {cli['epochs']} epochs, {cli['cpus']} CPUs, each command a process"
        w = cli["wall_s"]
        figs.append(_fig("T2", f"petl train with the local cluster it starts vs --local, end to end, {what}",
                         cli["ray"]["ratio"], cli["ray"]["range"], cli["rounds"], "reported", None,
                         source="cli_train.json",
                         note=f"{w['ray']:.1f} vs {w['local']:.1f} s; cluster start-up included"))
    if p6 := _load(out, "p6_gflops.json"):
        for bb, per_batch in p6["backbones"].items():
            for b, r in per_batch.items():
                figs.append(_fig("P6", f"{bb} forward, batch {b}: achieved / matmul peak", r["fraction_of_peak"],
                                 r["fraction_range"], p6["rounds"], "none set (reported)", None, unit="of peak",
                                 source="p6_gflops.json",
                                 note=f"{r['achieved_gflops_s']:.1f} vs {r['peak_gflops_s']:.1f} GFLOP/s "
                                      f"({r['gflops_per_image']:.3f} GFLOPs/image)"))
        shipped = next(iter(p6["backbones"].values()))
        if serve and "p8" in serve:
            gpi = shipped[max(shipped, key=int)]["gflops_per_image"]
            achieved = serve["p8"]["saturation_rps"] * gpi
            figs.append(_fig("P6", "served through HTTP at saturation: achieved / matmul peak", achieved / p6["peak_gflops_s"],
                             None, 1, "none set (reported)", None, unit="of peak", source="serve_load.json + p6_gflops.json",
                             note=f"{serve['p8']['saturation_rps']:.1f} req/s x {gpi:.3f} GFLOPs = {achieved:.1f} GFLOP/s "
                                  f"vs peak {p6['peak_gflops_s']:.1f}"))
    if p7 := _load(out, "p7_asha_vs_grid.json"):
        figs += p7_figs(p7)
    if (first := _load(out, "p7_asha_vs_grid_drop_rates.json")) and first.get("space") != (p7 or {}).get("space"):
        # the grid P7 first ran (p_shallow x p_deep x p_m), kept beside the default-space one
        figs.append(_fig("P7", f"the first grid (dyn_linear's three drop rates: 3 distinct settings): ASHA's trial-epochs",
                         first["compute_ratio"]["median"], [first["compute_ratio"]["min"], first["compute_ratio"]["max"]],
                         len(first["rounds"]), "reported", None, source="p7_asha_vs_grid_drop_rates.json",
                         note=f"best val {first['best_gap_pt']['median']:+.2f} pt behind the grid's"))
    if rl := _load(out, "recipe_lr.json"):
        gaps = [p["test_gap_pt"] for c in rl["methods"].values() for p in c["per_task"].values()]
        met = sum(c["met"] for c in rl["methods"].values())
        figs.append(_fig("R1", "petl train at the recipe lr, 10 epochs: test accuracy behind the per-task tuned lr "
                               "(largest gap over methods and tasks)", max(gaps), [min(gaps), max(gaps)], len(gaps),
                         "<= 1 pt", max(gaps) <= 1.0, unit="pt", source="recipe_lr.json",
                         note=f"{met} of {len(rl['methods'])} methods within 1 pt on every task"))
    if (fs := _load(out, "fair_sweep.json")) and (done := {m: e for m, e in fs["methods"].items() if "met" in e}):
        gaps = [g["test_gap_pt"] for e in done.values() for g in e["gaps"].values()]
        met = [m for m, e in done.items() if e["met"]]
        figs.append(_fig("R1", "petl train at the recipe, 10 epochs, vs the lr and a second hyperparameter tuned per "
                               "task by petl sweep, 4 tasks: test accuracy behind (largest gap over methods and tasks)",
                         max(gaps), [min(gaps), max(gaps)], len(gaps), "<= 1 pt", not set(done) - set(met), unit="pt",
                         source="fair_sweep.json",
                         note=f"{len(met)} of {len(done)} methods within 1 pt on every task ({', '.join(met) or 'none'}); "
                              f"{fs['cells_done']} of {fs['cells']} sweeps done"))
    if serve:
        figs += served_s(serve)
    if serve and "p8" in serve:
        p8 = serve["p8"]
        h, b1 = p8["at_half_saturation"], p8["batch1"]
        figs.append(_fig("P8", "p99/p50 latency at 50 % of saturation (open loop)", p8["ratio_half"], None, 1, "<= 3x",
                         p8["ratio_half"] <= 3, source="serve_load.json",
                         note=f"p50 {h['p50_ms']:.0f} ms, p99 {h['p99_ms']:.0f} ms at {h['rate']:.1f} req/s "
                              f"({h['requests']} requests, {h['failed']} failed)"))
        figs.append(_fig("P8", "p99/p50 latency at batch 1 (one request at a time)", p8["ratio_batch1"], None, 1, "<= 3x",
                         p8["ratio_batch1"] <= 3, source="serve_load.json",
                         note=f"p50 {b1['p50_ms']:.0f} ms, p99 {b1['p99_ms']:.0f} ms"))
    if serve and "served_p1" in serve:
        s1 = serve["served_p1"]
        figs.append(_fig("P1 served", f"{s1['tasks_per_request']} tasks in one request vs one request each, through HTTP",
                         s1["speedup"], None, 1, "reported next to P1", None, source="serve_load.json"))
    for key, how in (("served_p2", "one PNG per /v1/predict request"), ("served_p2_multi", "16-image OIP requests")):
        if serve and key in serve:
            p2s, r = serve[key], serve[key]["rounds"]
            goal = p2s.get("goal")  # earlier runs: reported only
            figs.append(_fig("P2 served", "50 % budget vs full depth, through HTTP" + (f", {how}" if goal else ""),
                             p2s["speedup"], [min(r), max(r)], len(r), f">= {goal:g}x" if goal else "reported next to P2",
                             p2s["speedup"] >= goal if goal else None, source="serve_load.json",
                             note=f"{p2s['request']}, {p2s['concurrency']} in flight" if goal else ""))
    if serve and "replica_kill" in serve:
        k = serve["replica_kill"]
        figs.append(_fig("kill", "replica killed under load: failed requests", k["failed"], None, 1,
                         f"<= requests in flight on it (<= {k['in_flight_bound']})", k["failed"] <= k["in_flight_bound"],
                         unit="requests", source="serve_load.json", note=f"of {k['requests']}; statuses {k['statuses']}"))
    # the reliability suite's figures (tests/test_bad_input_corpus.py, tests/test_faults.py with
    # PETL_CORPUS_OUT=DIR/corpus.json PETL_FAULTS_OUT=DIR), copied next to the bench JSONs
    if corpus := _load(out, "corpus.json"):
        counts = corpus["by_status"]
        figs.append(_fig("corpus", f"bad-input corpus through Ray Serve: {corpus['cases']} cases, responses that are 500",
                         counts.get("500", 0), None, 1, "0 (and every case its expected status)",
                         counts.get("500", 0) == 0 and corpus["mismatches"] == 0, unit="responses",
                         source="corpus.json", note="by status " + ", ".join(f"{k}: {v}" for k, v in counts.items()) +
                                                   f"; {corpus['mismatches']} cases off their expected status"))
    if kill := _load(out, "faults_replica_kill.json"):
        for k in kill["kills"]:
            bound = _in_flight(k)
            figs.append(_fig("faults", f"1 of 2 {k['deployment']} replicas killed under bounded load: failed requests",
                             k["failed"], None, 1, f"<= in flight until detected ({bound}), none sent after, all 503 + "
                             "Retry-After", k["failed"] <= bound and not k["failed_started_after_detect"]
                             and k["failures_503_retry_after_json"], unit="requests",
                             source="faults_replica_kill.json",
                             note=f"of {k['requests']}; statuses {k['statuses']}; {k['in_flight_at_fault']} in flight at "
                                  f"the kill; detected after {k['detect_s']} s; "
                                  f"max wait after detection {k['max_wait_after_detect_s']} s vs 2x p99 "
                                  f"{2 * kill['baseline']['p99_s']:.2f} s"))
    if sweep := _load(out, "faults_node_loss_during_sweep.json"):
        figs.append(_fig("faults", "node running a sweep trial removed mid-trial: epochs lost", sweep["epochs_lost"], None, 1,
                         "<= 1 epoch, sweep finishes", sweep["epochs_lost"] <= 1 and sweep["trial_error"] is None,
                         unit="epochs", source="faults_node_loss_during_sweep.json",
                         note=f"removed after epoch {sweep['epoch_at_removal']}, resumed from epoch {sweep['resumed_from_epoch']}"))
    if node := _load(out, "faults_node_loss_while_serving.json"):
        bound = _in_flight(node)
        figs.append(_fig("faults", "node holding serving replicas removed under load: failed requests", node["failed"], None, 1,
                         f"<= in flight until detected ({bound}), none sent after",
                         node["failed"] <= bound and not node["failed_started_after_detect"],
                         unit="requests", source="faults_node_loss_while_serving.json",
                         note=f"of {node['requests']}; statuses {node['statuses']}; {node['in_flight_at_fault']} in flight "
                              f"at the loss, detected after {node['detect_s']} s; replicas lost {node['replicas_lost']}"))
    if co := _load(out, "colocation_hop.json"):
        figs.append(_fig("co-location", f"trunk states shipped to another replica vs co-located tails, batch {co['batch']}",
                         co["hop_overhead"], co.get("ratio_range"), co.get("repeats", 15), "reported (why tails are co-located)",
                         None, source="colocation_hop.json", note=f"{co['states_shipped_mb']:.1f} MB per batch"))
    return figs


def multitenant_figures(mt: dict) -> list[dict]:
    """P5 (banks), P9a/P9b, P10, P11 and M1 of ``bench/multitenant.py``: every ratio a median of
    interleaved repeats, with its min and max."""
    src, figs = "multitenant.json", []
    where = f"{mt['backbone']}, store: {mt.get('store', '?')}"
    if p5 := mt.get("P5"):
        for method, r in p5["families"].items():
            for n, v in r["by_n"].items():
                figs.append(_fig("P5", f"batch {p5['batch']} over N = {n} banked {method} tasks vs one merged task "
                                       f"({mt['backbone']})", v["median"], [v["min"], v["max"]], v["n"],
                                 f">= {r['goal']}x at N = 64" if n == "64" else "reported",
                                 r["met"] if n == "64" else None, source=src,
                                 note=f"answers equal alone (max diff {r['max_abs_diff_vs_alone']:.0e})"
                                      + (f"; one call per task instead of gathered rows: {r['n64_segments']['median']}x"
                                         if n == "64" else "")))
    for method, r in (mt.get("P9") or {}).items():
        a, b = r["P9a"], r["P9b"]
        figs.append(_fig("P9a", f"cold load from the node's object store, first request minus a resident one, {method} "
                                f"({where})", a["extra_ms_p50"], [a["extra_ms_p50"], a["extra_ms_p99"]], a["loads"],
                         "<= 20 ms p50", a["met"], unit="ms", source=src,
                         note=f"p99 {a['extra_ms_p99']} ms; a resident task answers in {a['resident_ms_p50']} ms; "
                              f"alias look-up not cached: +{r['P9a_uncached_alias']['extra_ms_p50']} ms"))
        figs.append(_fig("P9b", f"cold load from S3 through the registry, first request to answer, {method} ({where})",
                         b["cold_ms_p50"], [b["cold_ms_p50"], b["cold_ms_p99"]], b["loads"], "<= 100 ms p50, <= 300 ms p99",
                         b["met"], unit="ms", source=src,
                         note=f"p99 {b['cold_ms_p99']} ms; a resident task answers in {b['resident_ms_p50']} ms"))
    if r := mt.get("P10"):
        for key, label in (("from_s3", "from S3"), ("from_node", "from the node's object store")):
            v = r[key]["ratio_p99"]
            figs.append(_fig("P10", f"p99 of a loaded LoRA task while 20 tasks cold-load {label} vs quiet ({mt['backbone']})",
                             v["median"], [v["min"], v["max"]], v["n"], "<= 1.5x", v["median"] <= 1.5, source=src,
                             note=f"p99 {r[key]['loading_p99_ms']['median']:.1f} vs {r[key]['quiet_p99_ms']['median']:.1f} ms"))
    if r := mt.get("P11"):
        for label, v in r["results"].items():
            goal = ">= 0.9x" if label == "all_resident" else ">= 0.5x, batch p99 <= 3x all-resident"
            figs.append(_fig("P11", f"{r['tasks']} LoRA tasks, Zipf({r['zipf_s']}) batches of {r['batch']} vs one-task "
                                    f"batches, {label.replace('_', ' ')} ({v['budget_mb']} MB, {v['policy']})",
                             v["ratio"]["median"], [v["ratio"]["min"], v["ratio"]["max"]], v["ratio"]["n"], goal, v["met"],
                             source=src, note=f"batch p99 {v['batch_p99_ms']} ms ({v['batch_p99_vs_all_resident']}x "
                                              f"all-resident); {v['loads_per_round']} loads a round"))
    if m := mt.get("M1"):
        figs.append(_fig("M1", f"replica memory per resident LoRA task vs its tensor bytes ({m['tasks']} tasks, "
                               f"{mt['backbone']})", m["ratio"], None, 1, "<= 1.3x", m["met"], source=src,
                         note=f"{m['anon_growth_bytes_per_task'] / 1024:.0f} KB vs {m['tensor_bytes_per_task'] / 1024:.0f} KB"))
    return figs


def served_p5(serve: dict) -> list[dict]:
    """P5 through HTTP: mixed-task traffic vs one task (linear probes; LoRA, the hard case; LoRA in
    16-image OIP requests)."""
    figs = []
    for key, what in (("p5", "tasks"), ("p5_lora", "LoRA tasks"), ("p5_lora_multi", "LoRA tasks")):
        if key not in serve:
            continue
        r = serve[key]
        rs = [x["ratio"] for x in r["rounds"]]
        how = {"p5": "", "p5_lora": " (hard case)", "p5_lora_multi": " (hard case), 16-image OIP requests"}[key]
        if "request" in r and key == "p5_lora":
            how += ", one PNG per /v1/predict request"
        figs.append(_fig("P5 served", f"{r.get('tasks', serve['tasks'])} {what} in flight vs one {what[:-1]}, throughput "
                                      f"through HTTP{how}", r["ratio"], [min(rs), max(rs)], len(rs), ">= 0.85x",
                         r["ratio"] >= 0.85, source="serve_load.json",
                         note=f"{r['request']}, {r['concurrency']} in flight" if "request" in r else ""))
    return figs


def p7_figs(p7: dict) -> list:
    """P7's two rows: the median (and mean) over ASHA's seeds against one grid run (files before
    2026-12-05 held one round with its own grid run)."""
    rs = [r["compute_ratio"] for r in p7["rounds"]]
    gaps = [r["best_gap_pt"] for r in p7["rounds"]]
    grid = p7.get("grid") or p7["rounds"][0]["fifo"]
    ratio = p7["compute_ratio"]["median"] if "grid" in p7 else p7["compute_ratio_median"]
    gap = p7["best_gap_pt"]["median"] if "grid" in p7 else p7["best_gap_pt_median"]
    mean = (lambda k, fmt: f"; mean {fmt.format(p7[k]['mean'])}") if "grid" in p7 else (lambda k, fmt: "")
    rungs = f", rungs at {', '.join(map(str, p7['rungs']))}" if "rungs" in p7 else ""
    asha = ", ".join(str(r["asha"]["trial_epochs"]) for r in p7["rounds"])
    return [_fig("P7", f"ASHA (reduction factor {p7.get('reduction_factor', 3):g}{rungs}) vs full grid "
                       f"({p7['grid_points']} points x {p7['epochs']} epochs, {p7['method']}, {p7['task']}): "
                       "trial-epochs", ratio, [min(rs), max(rs)], len(rs), "<= 0.333x", ratio <= 1 / 3,
                 source="p7_asha_vs_grid.json",
                 note=f"ASHA {asha} vs the grid's {grid['trial_epochs']} trial-epochs ({len(rs)} seed(s))"
                      + mean("compute_ratio", "{:.3f}x")),
            _fig("P7", "ASHA's best val accuracy behind the grid's best", gap, [min(gaps), max(gaps)], len(gaps),
                 "<= 0.5 pt", gap <= 0.5, unit="pt", source="p7_asha_vs_grid.json",
                 note=f"grid best {100 * grid['best_val_accuracy']:.1f} %" + mean("best_gap_pt", "{:+.2f} pt"))
            ] + p7_reported_figs(p7, grid)


def p7_reported_figs(p7: dict, grid: dict) -> list:
    """P7's reported rows beside ASHA's: ASHA on the grid's written order, and Hyperband (``petl sweep
    --scheduler hyperband``) on the same grid."""
    figs = [_fig("P7", "ASHA on the grid in its written order (ascending lr), before grids were shuffled by the seed: "
                       "trial-epochs", r["compute_ratio"], None, 1, "reported", None, source="p7_asha_vs_grid.json",
                 note=f"{r['trial_epochs']} trial-epochs; best val {r['best_gap_pt']:+.2f} pt behind the grid's")
            for r in p7.get("asha_grid_in_order", [])]
    hb = p7.get("hyperband")
    if not hb:
        return figs
    rs = [r["compute_ratio"] for r in hb["rounds"]]
    gaps = [r["best_gap_pt"] for r in hb["rounds"]]
    used = ", ".join(str(r["hyperband"]["trial_epochs"]) for r in hb["rounds"])
    return figs + [_fig("P7", f"Hyperband (Tune's, reduction factor {p7['reduction_factor']:g}) on the same grid: trial-epochs",
                 hb["compute_ratio"]["median"], [min(rs), max(rs)], len(rs), "reported", None,
                 source="p7_asha_vs_grid.json", note=f"Hyperband {used} vs the grid's {grid['trial_epochs']}"),
            _fig("P7", "Hyperband's best val accuracy behind the grid's best", hb["best_gap_pt"]["median"],
                 [min(gaps), max(gaps)], len(gaps), "reported", None, unit="pt", source="p7_asha_vs_grid.json")]


def served_s(serve: dict) -> list[dict]:
    """S1-S4 and G1 (issue 21): the served data plane against the engine in process, on one task and
    the same images (``bench/serve_load.py``)."""
    figs, src = [], "serve_load.json"
    cpu = serve.get("generator", {}).get("max_cpu_frac")
    gen = f"; load generator (own process) at most {cpu:.2f} of a core" if cpu is not None else ""

    def med(rounds, key):
        return statistics.median(r[key] for r in rounds)

    if s1 := serve.get("s1"):
        rs = s1["rounds"]
        figs.append(_fig("S1", f"served img/s at saturation, {s1['images_per_request']}-image OIP requests (binary UINT8) "
                               f"vs the engine in process at batch {s1['in_process_batch']} ({serve['task']})",
                         s1["ratio"], s1["ratio_range"], len(rs), f">= {s1['goal']:g}x", s1["ratio"] >= s1["goal"], source=src,
                         note=f"{med(rs, 'served_img_s'):.0f} vs {med(rs, 'in_process_img_s'):.0f} img/s at "
                              f"{s1['concurrency']} in flight{gen}"))
    if s2 := serve.get("s2"):
        rs = s2["rounds"]
        figs.append(_fig("S2", f"served img/s at saturation, one PNG per /v1/predict request vs the engine in process on "
                               f"PNGs at batch {s2['in_process_batch']} (decode counted)", s2["ratio"], s2["ratio_range"],
                         len(rs), f">= {s2['goal']:g}x", s2["ratio"] >= s2["goal"], source=src,
                         note=f"{med(rs, 'served_img_s'):.0f} vs {med(rs, 'in_process_img_s'):.0f} img/s at "
                              f"{s2['concurrency']} in flight"))
    if s3 := serve.get("s3"):
        rs = s3["rounds"]
        figs.append(_fig("S3", "p50 latency, one request in flight (one PNG, /v1/predict) vs one in-process batch-1 call",
                         s3["ratio"], s3["ratio_range"], len(rs), f"<= {s3['goal']:g}x", s3["ratio"] <= s3["goal"], source=src,
                         note=f"{med(rs, 'served_p50_ms'):.1f} vs {med(rs, 'in_process_ms'):.1f} ms"))
    if s4 := serve.get("s4"):
        rs, ra = s4["rounds"], s4["retry_after_fraction"]
        shed = (f"{100 * s4['shed_fraction']:.0f} % shed with 503, "
                + ("none, so no Retry-After to check" if ra is None else f"{100 * ra:.0f} % of them with Retry-After"))
        figs.append(_fig("S4", f"at 4x the saturating concurrency ({s4['concurrency']} in flight): throughput vs saturation",
                         s4["ratio"], s4["ratio_range"], len(rs), f">= {s4['goal']:g}x, every 503 with Retry-After",
                         s4["ratio"] >= s4["goal"] and ra in (None, 1.0), source=src,
                         note=f"{med(rs, 'overload_img_s'):.0f} vs {med(rs, 'saturation_img_s'):.0f} img/s; {shed}"
                         + (f"; clients {s4['clients']}; clients that retry at once instead: "
                            f"{s4['no_wait_ratio']:.2f}x" if "no_wait_ratio" in s4 else "")))
        figs.append(_fig("S4", f"at {s4['concurrency']} in flight: p99/p50 latency of the admitted (200) requests",
                         s4["tail"], s4["tail_range"], len(rs), f"<= {s4['tail_goal']:g}x", s4["tail"] <= s4["tail_goal"],
                         source=src, note=f"p50 {med(rs, 'p50_ms'):.0f} ms, p99 {med(rs, 'p99_ms'):.0f} ms"))
    for step, message in serve.get("errors", {}).items():
        figs.append(_fig(step, "not measured: the step failed (see the serve log)", None, None, 0, "-", None, source=src,
                         note=message[:300]))
    if g1 := serve.get("g1"):
        name = "served img/s vs the bare backbone in bf16 at the same batch, on a GPU"
        if "skipped" in g1:
            figs.append(_fig("G1", name, None, None, 0, "reported", None, source=src, note=f"not measured: {g1['skipped']}"))
        else:
            figs.append(_fig("G1", f"{name} ({g1['gpu']}, batch {g1['batch']})", g1["ratio"], None, 1, "reported", None,
                             source=src, note=f"{g1['served_img_s']:.0f} vs {g1['bare_bf16_img_s']:.0f} img/s"))
    return figs


# ----------------------------------------------------------------------------- rendering
def _num(v, unit) -> str:
    if v is None:
        return "-"
    if unit == "of peak":
        return f"{100 * v:.0f} %"
    if unit == "x":
        return f"{v:.2f}x"
    if unit == "pt":
        return f"{v:+.2f} pt"
    return f"{v:g}"


def _spread(f) -> str:
    if not f["spread"]:
        return f"n={f['n']}"
    lo, hi = f["spread"]
    return f"{_num(lo, f['unit'])} - {_num(hi, f['unit'])} (n={f['n']})"


def _met(m) -> str:
    return "n/a" if m is None else ("**met**" if m else "**missed**")


def fidelity_md(fid: dict) -> list[str]:
    tasks = fid["tasks"]
    recipe = (f"trains {fid['epochs']} epochs with its default recipe (lr, weight decay)" if "basis" not in fid else
              f"has its lr chosen per task on val ({fid['basis']}); the chosen lr multiples: "
              + ", ".join(f"{k} x{v['multiple']:.3g}" for k, v in fid["chosen_lr"].items()))
    lines = [f"Shipped backbone `{fid['backbone']}`, {len(tasks)} tasks x {len(fid['seeds'])} seeds "
             f"({', '.join(map(str, fid['seeds']))}); every method {recipe}. Accuracy is test top-1, mean +- std "
             "over seeds; GFLOPs are measured per image for the deployed form (mergeable methods merged); img/s is the "
             "median over runs at batch 64 (noisy on this shared 2-core machine); train memory is P4's fresh-process "
             "peak where `P4_fidelity` ran in this directory (or, for the fair basis, in its baseline's).", "",
             "| method | params | GFLOPs | img/s | train mem (MB) | " + " | ".join(tasks) + " | mean |",
             "|---|---:|---:|---:|---:|" + "---:|" * (len(tasks) + 1)]
    for r in fid["rows"]:
        cells = [f"{100 * r['accuracy'][t]['mean']:.1f} +- {100 * r['accuracy'][t]['std']:.1f}" if t in r["accuracy"] else "-"
                 for t in tasks]
        ips = "-" if r.get("img_per_s") is None else f"{r['img_per_s']:.0f}"
        mem = f"{r['train_mem_mb']:,.0f}" if r.get("train_mem_mb") is not None else "-"
        mean = "-" if r["mean_accuracy"] is None else f"{100 * r['mean_accuracy']:.1f}"
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['gflops']:.4f} | {ips} | {mem} | "
                     + " | ".join(cells) + f" | {mean} |")
    refs = [r["method"] for r in fid["rows"] if " (" in r["method"]]
    if refs:
        lines += ["", f"Rows {', '.join(refs)}: a reference run of that method with its own longer recipe, outside "
                      "the claims (which compare every method on the same schedule)."]
    lines += ["", "| claim (papers) | measured | goal | reproduced |", "|---|---|---|---|"]
    for c in fid["claims"]:
        detail = f" ({c['detail']})" if c.get("detail") else ""
        lines.append(f"| {c['claim']} | {c['measured']}{detail} | {c['goal']} | {_met(c['met'])} |")
    return lines


def recipe_md(rl: dict) -> list[str]:
    """``bench/recipe_lr.py``'s table: per method the lr that wins on val across the tasks, and per
    task what it gives up against that task's own best lr."""
    tasks = sorted({t for c in rl["methods"].values() for t in c["per_task"]})
    lines = [f"Each method's recipe lr is the one lr that won on val across the tasks of the fair basis "
             f"(`{rl['runs']}`, seed 0, 10 epochs); the gap is the per-task tuned lr's accuracy minus the recipe's "
             f"(test, val in brackets; negative: the recipe did better). Goal: {rl['goal']}.", "",
             "| method | recipe lr | " + " | ".join(f"{t}: gap (tuned lr)" for t in tasks) + " | within 1 pt |",
             "|---|---:|" + "---|" * len(tasks) + "---|"]
    for method, c in rl["methods"].items():
        cells = []
        for t in tasks:
            p = c["per_task"].get(t)
            cells.append("-" if p is None else f"{p['test_gap_pt']:+.1f} pt ({p['val_gap_pt']:+.1f}; x{p['tuned_multiple']:.3g})")
        lines.append(f"| {method} | {c['lr']:.3g} | " + " | ".join(cells) + f" | {_met(c['met'])} |")
    return lines


def fair_sweep_md(fs: dict) -> list[str]:
    """``bench/fair_sweep.py``'s tables: per method and task the point each sweep chose (test accuracy,
    val in brackets), the recipe chosen across the tasks and what it gives up per task, then the
    claims that test accuracy alone decides on this basis."""
    tasks, ep = fs["tasks"], fs["epochs"]
    mults = "/".join(f"{m:.3g}" for m in fs["lr_multiples"])
    picks = [p for e in fs["methods"].values() for p in e["per_task"].values()]
    chosen, ends = len(picks), sum(bool(p.get("lr_at_end")) for p in picks)
    lines = [f"Each method swept with `petl sweep` (Ray Tune, ASHA: rungs at 1, 3 and 9 of {ep} epochs, 2 trials at a "
             f"time, seed 0) on each offline task over a 3 x 3 grid: the recipe's lr x {mults}, and a second "
             f"hyperparameter with today's default in the middle. A task's choice is its best val accuracy among the "
             f"trials that ran every epoch. **{fs['cells_done']} of {fs['cells']} sweeps done**; they used "
             f"{fs['trial_epochs']} of their grids' {fs['grid_epochs']} trial-epochs. {ends} of the {chosen} choices "
             "sit at an end of the lr grid, where the best lr may lie beyond it.", "",
             "| method | searched | " + " | ".join(f"{t}: choice, test (val)" for t in tasks) + " |",
             "|---|---|" + "---|" * len(tasks)]

    def point(c, key):
        return f"lr {c['lr']:.3g}, {key} {c[key]:g}"

    for m, e in fs["methods"].items():
        key = fs["second"][m]
        cells = [(f"{point(p['choice'], key)}: {100 * p['test']:.1f} ({100 * p['val']:.1f})"
                  if (p := e["per_task"].get(t)) else "not run yet") for t in tasks]
        lines.append(f"| {m} | lr, {key} | " + " | ".join(cells) + " |")
    done = {m: e for m, e in fs["methods"].items() if "recipe" in e}
    if done:
        lines += ["", f"The recipe per method: the lr and the rate searched beside it at the median of the tasks' "
                  "choices on their grids, a rank, bottleneck or DyT target rate as the papers set it; where that is "
                  "not today's recipe, the better of the two on mean val across the tasks. The gap "
                  f"is the task's choice minus the recipe's run at {ep} epochs (test, val in brackets; negative: the "
                  f"recipe did better). Goal: {fs['goal']}.", "",
                  "| method | recipe | " + " | ".join(f"{t} gap" for t in tasks) + " | mean test: tuned / recipe | within 1 pt |",
                  "|---|---|" + "---:|" * len(tasks) + "---|---|"]
        for m, e in done.items():
            key = fs["second"][m]
            gaps = [f"{g['test_gap_pt']:+.1f} pt ({g['val_gap_pt']:+.1f})" if (g := e["gaps"].get(t)) else "pending"
                    for t in tasks]
            means = (f"{100 * e['mean_test_tuned']:.1f} / {100 * e['mean_test_recipe']:.1f}" if "mean_test_tuned" in e
                     else "-")
            lines.append(f"| {m} | {point(e['recipe'], key)} (lr x{e['lr_multiple']:.3g}) | " + " | ".join(gaps)
                         + f" | {means} | {_met(e.get('met'))} |")
    if fs.get("claims"):
        lines += ["", "Claims that test accuracy alone decides, on this basis (the others need per-run FLOPs, exits "
                  "or merges, measured on the bases above):", "", "| claim (papers) | measured | goal | met |",
                  "|---|---|---|---|"]
        for c in fs["claims"]:
            detail = f" ({c['detail']})" if c.get("detail") else ""
            lines.append(f"| {c['claim']} | {c['measured']}{detail} | {c['goal']} | {_met(c['met'])} |")
    return lines


def fidelity_compare_md(fid: dict) -> list[str]:
    """The fair basis next to the default one (``fid["baseline"]``, re-aggregated on the same tasks and
    seeds): accuracy per task on each basis, and every claim judged on each."""
    base, tasks = fid["baseline"], fid["tasks"]
    ep = base["epochs"]
    fair_rows, base_rows = ({r["method"]: r for r in f["rows"]} for f in (fid, base))

    def acc(row, t):
        return "-" if row is None or t not in row["accuracy"] else f"{100 * row['accuracy'][t]['mean']:.1f}"

    def mean(row):
        return None if row is None or row["mean_accuracy"] is None else 100 * row["mean_accuracy"]

    lines = [f"Next to it, the default basis on the same tasks and seeds: every method {ep} epochs at its recipe's "
             f"lr (runs in `{base['dir']}`). Test accuracy, mean over seeds (%):", "",
             "| method | " + " | ".join(f"{t} fair | {t} {ep} ep" for t in tasks) + " | mean fair | mean "
             f"{ep} ep | fair - {ep} ep |", "|---|" + "---:|" * (2 * len(tasks) + 3)]
    for m in dict.fromkeys([*fair_rows, *base_rows]):
        f, b = fair_rows.get(m), base_rows.get(m)
        mf, mb = mean(f), mean(b)
        lines.append(f"| {m} | " + " | ".join(f"{acc(f, t)} | {acc(b, t)}" for t in tasks)
                     + f" | {'-' if mf is None else f'{mf:.1f}'} | {'-' if mb is None else f'{mb:.1f}'} | "
                     + ("-" if mf is None or mb is None else f"{mf - mb:+.1f} pt") + " |")
    fair_claims, base_claims = ({c["claim"]: c for c in f["claims"]} for f in (fid, base))
    lines += ["", f"| claim (papers) | fair basis | {ep}-epoch basis |", "|---|---|---|"]
    for name in dict.fromkeys([*fair_claims, *base_claims]):
        cells = []
        for c in (fair_claims.get(name), base_claims.get(name)):
            detail = f" ({c['detail']})" if c and c.get("detail") else ""
            cells.append("not measured" if c is None else f"{_met(c['met'])}: {c['measured']}{detail}")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return lines


def machine() -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "loadavg": os.getloadavg()}


def _carried_note(name: str, manifest: dict) -> list[str]:
    rec = manifest.get(name)
    if not rec:
        return []
    return [f"*Measured {rec['measured']}, not rerun in this run: carried here ({', '.join(f'`{f}`' for f in rec['files'])} "
            f"copied from that run's folder).*", ""]


def render(out: Path, runs: dict, quick: bool, machine_facts: dict | None = None) -> str:
    """Write report.md and report.json into ``out``, first carrying in every section it lacks from an
    older dated folder (see carry()); ``machine_facts``: the machine the runs were measured on when
    only re-rendering (default: this one)."""
    manifest = carry(out)
    dates = measured_on(out, manifest)
    figs = figures(out)
    for f in figs:
        f["measured"] = _label(f["source"].split(" + "), dates, out, manifest)
    fid = _load(out, "fidelity.json")
    m = machine_facts or machine()
    modes = {r["quick"] for r in runs.values() if "quick" in r}
    mode = "mixed (see Sections run)" if len(modes) > 1 else ("--quick" if quick else "full")
    lines = [f"# petl-platform benchmark report, {out.name}", "",
             f"Machine: {m['cpu_count']} CPU cores ({m['cpu']}), GPU: {'yes' if m['cuda'] else 'none'}, "
             f"torch {m['torch']}, Python {m['python']}. Mode: {mode}. "
             "Every ratio is measured side by side in one run (interleaved where timed); the median of the repeats "
             "with the min-max spread. Reproduce: `make bench` (full) or `petl bench --quick`."
             + (" Sections not rerun in this run are carried from the run that measured them (their files copied "
                "into this folder); the `measured on` column gives each figure's date." if manifest else ""), "",
             "## Goals vs measured", "",
             "| id | figure | measured (median) | spread | goal | met | measured on | notes |",
             "|---|---|---:|---|---|---|---|---|"]
    for f in figs:
        lines.append(f"| {f['id']} | {f['figure']} | {_num(f['median'], f['unit'])} | {_spread(f)} | {f['goal']} | "
                     f"{_met(f['met'])} | {f['measured']} | {f['note']} |")
    lines += ["", "## Fidelity to the papers (relative claims, offline data)", ""]
    lines += _carried_note("fidelity", manifest)
    lines += fidelity_md(fid) if fid else ["Not run in this directory (`petl bench --only fidelity`)."]
    fair = _load(out, "fidelity_fair.json")
    lines += ["", "### The fair basis: lr chosen per task on val, >= 10 epochs, 3 seeds", ""]
    lines += _carried_note("fidelity_fair", manifest)
    lines += fidelity_md(fair) if fair else ["Not run in this directory (`petl bench --only fidelity_fair`)."]
    if fair and fair.get("baseline"):
        lines += [""] + fidelity_compare_md(fair)
    if rl := _load(out, "recipe_lr.json"):
        lines += ["", "### Recipe lrs from the fair basis", ""] + _carried_note("recipes", manifest) + recipe_md(rl)
    if fs := _load(out, "fair_sweep.json"):
        lines += ["", "### The fair basis through `petl sweep`: 4 tasks, the lr and a second hyperparameter", ""]
        lines += _carried_note("fair_sweep", manifest) + fair_sweep_md(fs)
    pngs = sorted(p.name for p in out.glob("*.png"))
    if pngs:
        owner = {f: name for name, files in ARTIFACTS.items() for f in files}
        lines += ["", "## Plots", ""]
        for p in pngs:
            lines += [f"![{p}]({p})", "", f"*{owner.get(p, 'plot')}, measured {_label([p], dates, out, manifest)}*", ""]
        lines.pop()
    lines += ["", "## Sections run", "", "| section | mode | wall | status | command |", "|---|---|---:|---|---|"]
    for name, r in runs.items():
        status = r.get("skipped") or r.get("error") or "ok"
        mode = "-" if "quick" not in r else ("quick" if r["quick"] else "full")
        wall = f"{r['wall_s']:.0f} s" if "wall_s" in r else "-"
        lines.append(f"| {name} | {mode} | {wall} | {status} | `{r.get('cmd', '-')}` |")
    total = sum(r.get("wall_s", 0) for r in runs.values())
    lines.append(f"| total | | {total:.0f} s ({total / 60:.1f} min) | | |")
    if manifest:
        lines += ["", "## Sections carried from earlier runs", "",
                  "Not rerun in this run: each section's files were copied into this folder from the folder of the run "
                  "that measured it, so the report cites only files of its own folder.", "",
                  "| section | measured | mode | wall | files | command |", "|---|---|---|---:|---|---|"]
        for name, r in sorted(manifest.items(), key=lambda kv: (kv[1]["measured"], kv[0])):
            mode = "-" if "quick" not in r else ("quick" if r["quick"] else "full")
            wall = f"{r['wall_s']:.0f} s" if "wall_s" in r else "-"
            files = ", ".join(f"`{f}`" for f in r["files"])
            lines.append(f"| {name} | {r['measured']} | {mode} | {wall} | {files} | `{r.get('cmd', '-')}` |")
    lines += gpu_md(out)
    lines += ["", "## CPU-only caveats", "",
              "- No GPU: every timing is fp32 on CPU cores shared with the OS; GPU ratios differ (kernel launch overhead "
              "favours batching more, memory bandwidth less).",
              "- P1, P3 (ViT-B/16), P4 and P6 (ViT-B/16) use random-weight ViT-B/16: timing and memory only, no accuracy.",
              "- Accuracy figures (P2, P7, fidelity) use the small shipped backbone (32 px, patch 4, 12 blocks) on offline "
              "data with short CPU schedules, not ViT-B/16 IN-21k on VTAB-1k; the VTAB-1k protocol (`jobs/vtab.py`) "
              "was only run on a fake tree here.",
              "- P4's CPU memory is a peak-RSS delta in a fresh process per method, not CUDA allocator bytes.",
              "- Serving figures (S1-S4, P5, P8, served P1/P2, replica kill) run Ray Serve's proxy and replicas, the "
              "load generator (its own process) and, for S1-S3, the in-process engine on the same cores; the "
              "in-process side runs while the server is idle.", ""]
    md = "\n".join(lines)
    (out / "report.md").write_text(md)
    (out / "report.json").write_text(json.dumps({"machine": m, "quick": quick, "figures": figs, "runs": runs,
                                                 "carried": manifest,
                                                 "fidelity_claims": fid["claims"] if fid else None}, indent=2) + "\n")
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="petl bench", description="run every benchmark side by side; write one report")
    ap.add_argument("--quick", action="store_true", help="the reduced suite (under 15 min on 2 cores)")
    ap.add_argument("--only", default="", help=f"comma list of sections: {', '.join(SECTIONS)}")
    ap.add_argument("--out", default="", help="output directory (default bench/results/<today>)")
    ap.add_argument("--report", action="store_true", help="only re-render report.md from the JSONs in --out")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"petl bench: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else BENCH / "results" / dt.date.today().isoformat()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.report:
        runs = json.loads((out / "runs.json").read_text()) if (out / "runs.json").exists() else {}
    else:
        if "fidelity" in names:  # fidelity reads P4's memory figures: P4 first
            names = [n for n in names if n != "fidelity"] + ["fidelity"]
        runs = run_sections(names, out, args.quick)
    quick = any(r.get("quick") for r in runs.values()) if args.report else args.quick
    # re-rendering reports the machine the runs were measured on, not the one rendering
    previous = (_load(out, "report.json") or {}).get("machine") if args.report else None
    render(out, runs, quick, previous)
    failed = [n for n in names if "error" in runs.get(n, {})]
    print(f"wrote {out / 'report.md'} and report.json ({time.time() - t0:.0f}s)"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
