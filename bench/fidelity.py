"""Fidelity to the papers: every method x offline tasks x seeds on the shipped backbone.

Every run: the method's default recipe (learning rate, weight decay, warm-up) for the same number
of epochs (``--epochs``, as the papers train every method on one schedule), then on test: accuracy, trainable
parameters (head excluded, the papers' convention), *measured* inference GFLOPs per image
(``FlopCounterMode``) and img/s of the deployed form (mergeable methods merged), and per method:

- ARC / LoRA / RepAdapter: max |logits(merged) - logits(unmerged)|, both accuracies, both GFLOPs;
- Dyn-Adapter: full-depth accuracy and, for thresholds calibrated on val at 50 % and 70 % FLOPs
  budgets, the test accuracy, measured FLOPs fraction and exit-stage fractions;
- DyT (r = 0.5): measured activation rate per layer and the FLOPs ratio to the dense adapter.

Runs are appended to ``fidelity_runs.jsonl`` (a rerun skips what is there), then aggregated into
``fidelity.json`` (table + claims, mean +- std over seeds) and three PNGs. The training-memory claim
reads ``p4_train_memory_fidelity.json`` (P4 on the same backbone) from the same directory when
``petl bench`` ran that section there.

``--fair`` is the fair basis: each method's learning rate is chosen per task on val (the selection
``petl sweep`` makes: best val accuracy over a grid of the recipe's lr x 1/3, x 1, x 3, seed 0,
run in-process; when the best is at an end of the grid, the grid grows by x 3 that way, up to
x 27 or x 1/27), with >= 10 epochs for every method and the probe alike, then tested with 3 seeds
at that lr (seed 0 is the sweep's own run). Each run is appended to ``fidelity_fair_runs.jsonl`` as
it ends, so a rerun resumes; ``fidelity_fair.json`` (written at the end, or by ``--aggregate-only`` at
any time) reports every (task, method) whose lr is settled and whose seeds are done. It also
carries the default basis's runs (``--baseline-dir``) re-aggregated on the fair table's tasks,
seeds and methods, so the report judges every claim on both bases side by side.

    nice .venv/bin/python bench/fidelity.py --out-dir bench/results/<date> [--quick | --fair]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

TASKS = ["digits-1k", "fashion_mnist-1k", "clipart-1k", "dsprites_loc-1k"]
METHODS = ["linear", "lora", "adapter", "repadapter", "arc", "dtl", "dtl_plus", "dyt", "dyn_adapter"]
ADAPTER_METHODS = ["lora", "adapter", "repadapter", "arc", "dtl", "dtl_plus", "dyt"]
BUDGETS = (0.5, 0.7)
HPARAMS = {"dyt": {"target_rate": 0.5}}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


@torch.no_grad()
def _logits(model, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


LR_GRID = (1 / 3, 1.0, 3.0)  # --fair: multiples of the method's recipe lr, chosen per task on val
LR_GRID_LIMIT = 27.0  # a best lr at an end of the grid extends it by x 3 that way, up to x 27 or x 1/27


def _best_sweep_run(sweep: list[dict]) -> dict:
    """The lr sweep's choice: best val accuracy; a tie goes to the multiple nearest the recipe."""
    return max(sweep, key=lambda r: (r["val_accuracy"], -abs(math.log(r["lr_multiple"]))))


def next_lr_multiple(sweep: list[dict]) -> float | None:
    """The next multiple of the recipe lr to try for one (task, method), or None once the choice is
    settled: first the base grid, then x 3 past whichever end of the grid holds the best val accuracy
    (a best lr at the edge of what was tried is not a choice), within ``LR_GRID_LIMIT``."""
    tried = sorted({r["lr_multiple"] for r in sweep})
    for mult in LR_GRID:
        if not any(math.isclose(mult, t) for t in tried):
            return mult
    best = _best_sweep_run(sweep)["lr_multiple"]
    if math.isclose(best, tried[-1]) and best * 3 <= LR_GRID_LIMIT * (1 + 1e-9):
        return best * 3
    if math.isclose(best, tried[0]) and best / 3 >= (1 - 1e-9) / LR_GRID_LIMIT:
        return best / 3
    return None


def run_one(bb, task: str, method: str, seed: int, epochs: int, lr: float | None = None) -> dict:
    from petl_platform.data import get_task, task_tensors
    from petl_platform.methods import get_method
    from petl_platform.methods.registry import spec_of
    from petl_platform.methods.dyn_exit import accuracy_flops_curve
    from petl_platform.training.measure import inference_metrics
    from petl_platform.training.run import finetune

    overrides = {"seed": seed, "progress": False, "device": "cpu", "epochs": epochs, **({"lr": lr} if lr else {})}
    model, res = finetune(task, method, bb.petl_name, HPARAMS.get(method), overrides, backbone_model=bb)
    data = task_tensors(get_task(task), bb)
    (x_val, y_val), (x_test, y_test) = data["val"], data["test"]
    model.eval()
    rec = {"task": task, "method": method, "seed": seed, "epochs": res["epochs"], "accuracy": res["accuracy"],
           "val_accuracy": res["val_accuracy"], "trainable_params": res["trainable_params"],
           "train_wall_s": res["train_wall_s"], "lr": lr}
    deployed = model
    if get_method(method).mergeable and method != "linear":
        deployed = model.merged().eval()
        unmerged_logits, merged_logits = _logits(model, x_test), _logits(deployed, x_test)
        unmerged = inference_metrics(model, x_test, y_test, max_images=64)
        rec["merge"] = {"max_abs_diff": (merged_logits - unmerged_logits).abs().max().item(),
                        "accuracy_unmerged": (unmerged_logits.argmax(-1) == y_test).float().mean().item(),
                        "accuracy_merged": (merged_logits.argmax(-1) == y_test).float().mean().item(),
                        "gflops_unmerged": unmerged["gflops_per_image"]}
    m = inference_metrics(deployed, x_test, y_test, max_images=256)
    rec.update(gflops=m["gflops_per_image"], img_per_s=m["img_per_s"])
    if spec_of(model).runtime == "early_exit":
        curve = accuracy_flops_curve(model, x_val, y_val, list(BUDGETS), x_test, y_test)
        rec["dyn"] = {"full_accuracy": curve["full_accuracy"],
                      "budgets": {str(p["budget"]): {k: p[k] for k in ("accuracy", "flops_fraction", "exit_fractions",
                                                                      "feasible")} for p in curve["points"]}}
    if spec_of(model).runtime == "token_dispatch":
        _, info = model.infer(x_test[:512])
        rec["dyt"] = {k: info[k] for k in ("activation_rate", "activation_rate_per_layer", "flops_ratio")}
    return rec


# ----------------------------------------------------------------------------- aggregation
def aggregate(runs: list[dict], p4: dict | None = None) -> dict:
    by = {}
    for r in runs:
        by.setdefault((r["method"], r["task"]), []).append(r)
    methods = [m for m in METHODS if any(k[0] == m for k in by)] + sorted({k[0] for k in by} - set(METHODS))
    tasks = [t for t in TASKS if any(k[1] == t for k in by)] + sorted({k[1] for k in by} - set(TASKS))
    rows = []
    for m in methods:
        cells = {t: _mean_std([r["accuracy"] for r in by[(m, t)]]) for t in tasks if (m, t) in by}
        mine = [r for (mm, _), rs in by.items() if mm == m for r in rs]
        row = {"method": m, "accuracy": {t: {"mean": a, "std": s, "n": len(by[(m, t)])} for t, (a, s) in cells.items()},
               "mean_accuracy": statistics.fmean(a for a, _ in cells.values()) if len(cells) == len(tasks) else None,
               "trainable_params": mine[0]["trainable_params"],
               "gflops": statistics.median(r["gflops"] for r in mine),
               "img_per_s": statistics.median(r["img_per_s"] for r in mine),
               "img_per_s_range": [min(r["img_per_s"] for r in mine), max(r["img_per_s"] for r in mine)],
               "runs": len(mine)}
        if p4 and m in p4.get("results", {}) and "peak_delta_mb" in p4["results"][m]:
            row["train_mem_mb"] = p4["results"][m]["peak_delta_mb"]
        rows.append(row)
        if m.startswith("dyn_"):  # the same models at their calibrated budgets: extra rows
            for b in BUDGETS:
                pts = {t: [r["dyn"]["budgets"][str(b)] for r in by[(m, t)]] for t in tasks if (m, t) in by}
                accs = {t: _mean_std([p["accuracy"] for p in ps]) for t, ps in pts.items()}
                frac = statistics.fmean(p["flops_fraction"] for ps in pts.values() for p in ps)
                rows.append({"method": f"{m} @{int(b * 100)}%", "budget": b,
                             "accuracy": {t: {"mean": a, "std": s, "n": len(pts[t])} for t, (a, s) in accs.items()},
                             "mean_accuracy": statistics.fmean(a for a, _ in accs.values()) if len(accs) == len(tasks) else None,
                             "trainable_params": row["trainable_params"], "gflops": row["gflops"] * frac,
                             "flops_fraction": frac, "img_per_s": None, "runs": row["runs"]})
    out = {"tasks": tasks, "methods": methods, "rows": rows, "claims": claims(rows, runs, by, tasks, p4)}
    out["exit_histograms"] = {t: [statistics.fmean(col) for col in zip(*[r["dyn"]["budgets"]["0.5"]["exit_fractions"]
                                                                    for r in by[(m, t)]])]
                              for m in methods if m.startswith("dyn_") for t in tasks if (m, t) in by}
    out["dyt_activation_per_layer"] = {t: [statistics.fmean(col) for col in zip(*[r["dyt"]["activation_rate_per_layer"]
                                                                             for r in by[("dyt", t)]])]
                                       for t in tasks if ("dyt", t) in by}
    return out


def _claim(name, measured, goal, met, detail="") -> dict:
    return {"claim": name, "measured": measured, "goal": goal, "met": None if met is None else bool(met),
            "detail": detail}


def claims(rows, runs, by, tasks, p4) -> list[dict]:
    row = {r["method"]: r for r in rows}
    out = []
    lin = row.get("linear", {}).get("mean_accuracy")
    if lin is not None:
        others = [r for r in rows if not r["method"].startswith("linear") and "budget" not in r
                  and r["mean_accuracy"] is not None]
        losers = [r["method"] for r in others if r["mean_accuracy"] <= lin]
        gaps = ", ".join(f"{r['method']} {100 * (r['mean_accuracy'] - lin):+.1f}" for r in others)
        out.append(_claim("every method beats the linear probe on average", f"pt vs probe: {gaps}",
                          "all > 0 pt", not losers if others else None, f"not beating it: {', '.join(losers)}" if losers else ""))
    dyn = [m for m in row if m.startswith("dyn_") and "budget" not in row[m]]
    for m in dyn:
        full = statistics.fmean(r["dyn"]["full_accuracy"] for r in runs if r["method"] == m)
        for b, goal, test in ((0.5, ">= -0.5 pt", lambda d: d >= -0.5), (0.7, ">= 0 pt", lambda d: d >= 0)):
            at = statistics.fmean(r["dyn"]["budgets"][str(b)]["accuracy"] for r in runs if r["method"] == m)
            frac = statistics.fmean(r["dyn"]["budgets"][str(b)]["flops_fraction"] for r in runs if r["method"] == m)
            d = 100 * (at - full)
            out.append(_claim(f"{m} at a {int(b * 100)} % budget vs its full-depth model", f"{d:+.2f} pt "
                              f"(measured FLOPs {100 * frac:.0f} %)", goal, test(d)))
    if "dyt" in row and "adapter" in row and row["dyt"]["mean_accuracy"] is not None:
        d = 100 * (row["dyt"]["mean_accuracy"] - row["adapter"]["mean_accuracy"])
        act = statistics.fmean(r["dyt"]["activation_rate"] for r in runs if r["method"] == "dyt")
        out.append(_claim("DyT (r = 0.5) within 1 pt of the dense adapter", f"{d:+.2f} pt (activation {act:.3f})",
                          ">= -1 pt", d >= -1.0))
    present = [m for m in ADAPTER_METHODS if m in row]
    if "dtl" in present:
        fewest = min(present, key=lambda m: row[m]["trainable_params"])
        out.append(_claim("DTL has the fewest trainable parameters of the adapter methods",
                          ", ".join(f"{m} {row[m]['trainable_params']:,}" for m in present), "dtl is the minimum",
                          fewest == "dtl"))
        mem = {m: p4["results"][m]["peak_delta_mb"] for m in present
               if p4 and "peak_delta_mb" in p4.get("results", {}).get(m, {})}
        if "dtl" in mem and len(mem) > 1:
            lowest = min(mem, key=mem.get)
            out.append(_claim("DTL has the lowest training memory of the adapter methods",
                              ", ".join(f"{m} {v:,.0f} MB" for m, v in mem.items()) + f" ({p4.get('backbone', '')})",
                              "dtl is the minimum", lowest == "dtl"))
        else:
            out.append(_claim("DTL has the lowest training memory of the adapter methods", "not measured",
                              "dtl is the minimum", None, "P4_fidelity did not run in this directory"))
    arc = [r for r in runs if r["method"] == "arc" and "merge" in r]
    lin_flops = row.get("linear", {}).get("gflops")
    if arc:
        diff = max(r["merge"]["max_abs_diff"] for r in arc)
        same = all(r["merge"]["accuracy_merged"] == r["merge"]["accuracy_unmerged"] for r in arc)
        merged_flops = statistics.median(r["gflops"] for r in arc)
        extra = None if lin_flops is None else merged_flops - lin_flops
        out.append(_claim("ARC's merged model is exact and costs zero extra FLOPs",
                          f"max abs logit diff {diff:.1e}, same accuracy in {sum(1 for r in arc if r['merge']['accuracy_merged'] == r['merge']['accuracy_unmerged'])}/{len(arc)} runs, "
                          f"merged {merged_flops:.4f} GFLOPs vs probe {lin_flops if lin_flops is None else f'{lin_flops:.4f}'} "
                          f"(unmerged {statistics.median(r['merge']['gflops_unmerged'] for r in arc):.4f})",
                          "diff <= 1e-4, same accuracy, +0 FLOPs",
                          diff <= 1e-4 and same and extra is not None and abs(extra) <= 1e-9))
    return out


# ----------------------------------------------------------------------------- plots
def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def plots(agg: dict, out_dir: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    pts = [(r["gflops"], 100 * r["mean_accuracy"], r["method"]) for r in agg["rows"] if r["mean_accuracy"] is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
        for g, a, m in pts:
            ax.scatter(g, a, s=28)
            ax.annotate(m, (g, a), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front, best = [], -1.0
        for g, a, _ in sorted(pts):
            if a > best:
                front.append((g, a))
                best = a
        ax.plot(*zip(*front), "k--", lw=1, label="Pareto front")
        ax.set_xlabel("measured inference GFLOPs / image (deployed form)")
        ax.set_ylabel(f"mean test accuracy over {len(agg['tasks'])} tasks (%)")
        ax.set_title("accuracy vs FLOPs: methods and early-exit budgets")
        ax.legend(fontsize=8)
        paths.append(_save(fig, out_dir / "fidelity_pareto.png"))
    if agg["exit_histograms"]:
        hist = agg["exit_histograms"]
        fig, axes = plt.subplots(1, len(hist), figsize=(3 * len(hist), 2.8), dpi=120, squeeze=False)
        for ax, (t, fr) in zip(axes[0], hist.items()):
            ax.bar(range(1, len(fr) + 1), [100 * f for f in fr])
            ax.set_title(t, fontsize=9)
            ax.set_xlabel("exit stage")
        axes[0][0].set_ylabel("% of test images (50 % budget)")
        paths.append(_save(fig, out_dir / "fidelity_exit_histograms.png"))
    if agg["dyt_activation_per_layer"]:
        fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
        for t, rates in agg["dyt_activation_per_layer"].items():
            ax.plot(range(1, len(rates) + 1), rates, "o-", label=t)
        ax.axhline(0.5, color="gray", ls="--", lw=1, label="target r = 0.5")
        ax.set_xlabel("layer")
        ax.set_ylabel("measured token activation rate")
        ax.set_title("DyT activation rate per layer (test)")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir / "fidelity_dyt_activation.png"))
    return paths


def fair_plot(agg: dict, out_dir: Path) -> list[str]:
    """Mean test accuracy of every method on the fair basis next to the default basis (same tasks
    and seeds), with the probe of each basis as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = {r["method"]: r for r in agg["baseline"]["rows"]}
    rows = [r for r in agg["rows"] if "budget" not in r and r["mean_accuracy"] is not None
            and base.get(r["method"], {}).get("mean_accuracy") is not None]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(9, 3.8), dpi=120)
    xs = range(len(rows))
    ep = agg["baseline"]["epochs"]
    ax.bar([x - 0.2 for x in xs], [100 * r["mean_accuracy"] for r in rows], 0.4,
           label=f"fair: lr chosen on val, {agg['epochs']} epochs")
    ax.bar([x + 0.2 for x in xs], [100 * base[r["method"]]["mean_accuracy"] for r in rows], 0.4,
           label=f"default: recipe lr, {ep} epochs")
    fair = {r["method"]: r for r in agg["rows"]}
    for name, row, color, ls in (("probe, fair", fair.get("linear"), "C0", "--"),
                                 (f"probe, {ep} epochs", base.get("linear"), "C1", "--"),
                                 ("probe, its own 40 epochs", base.get("linear (40 epochs)"), "k", ":")):
        if row and row["mean_accuracy"] is not None:
            ax.axhline(100 * row["mean_accuracy"], color=color, ls=ls, lw=1, label=name)
    ax.set_xticks(list(xs), [r["method"] for r in rows], rotation=30, fontsize=8)
    ax.set_ylabel(f"mean test accuracy over {len(agg['tasks'])} task(s) (%)")
    ax.set_title(f"fair vs default basis: {', '.join(agg['tasks'])}", fontsize=9)
    lowest = min(100 * min(r["mean_accuracy"], base[r["method"]]["mean_accuracy"]) for r in rows)
    ax.set_ylim(max(0.0, 10 * (lowest // 10) - 10), 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return [_save(fig, out_dir / "fidelity_fair_vs_default.png")]


def fair_runs(bb, tasks: list[str], methods: list[str], seeds: list[int], epochs: int, log: Path,
              runs: list[dict]) -> None:
    """The fair basis, one (task, method) at a time: the lr sweep on val (seed ``seeds[0]``), then the
    other seeds at the chosen lr. Appends to ``log``; what is there already is skipped."""
    from tqdm import tqdm

    from petl_platform.methods import get_method
    from petl_platform.training.loop import TrainConfig

    def record(rec, t0, **extra):
        rec.update(wall_s=round(time.time() - t0, 1), **extra)
        with log.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        runs.append(rec)

    cells = [(t, m) for t in tasks for m in methods]
    for task, method in (bar := tqdm(cells, desc="fidelity (fair)", unit="method")):
        base = TrainConfig.from_dict({**get_method(method).recipe}, "training").lr

        def sweep():
            return [r for r in runs if r["task"] == task and r["method"] == method and r["phase"] == "sweep"]

        while (mult := next_lr_multiple(sweep())) is not None:
            lr = base * mult
            bar.set_postfix_str(f"{method} {task} lr {lr:.2g}")
            t0 = time.time()
            record(run_one(bb, task, method, seeds[0], epochs, lr), t0, phase="sweep", lr_multiple=mult)
        best = _best_sweep_run(sweep())
        for seed in seeds[1:]:
            if not any(r["task"] == task and r["method"] == method and r["phase"] == "seed" and r["seed"] == seed
                       and math.isclose(r["lr"], best["lr"]) for r in runs):
                bar.set_postfix_str(f"{method} {task} seed {seed}")
                t0 = time.time()
                record(run_one(bb, task, method, seed, epochs, best["lr"]), t0, phase="seed",
                       lr_multiple=best["lr_multiple"])


def fair_selected(runs: list[dict], seeds: list[int]) -> list[dict]:
    """Per (task, method): the sweep run with the best val accuracy (as seed ``seeds[0]``) and the
    other seeds' runs at its lr; cells whose lr is not settled or whose seeds are not all done are
    left out."""
    out = []
    for task, method in dict.fromkeys((r["task"], r["method"]) for r in runs):
        sweep = [r for r in runs if r["task"] == task and r["method"] == method and r["phase"] == "sweep"]
        if not sweep or next_lr_multiple(sweep) is not None:
            continue
        best = _best_sweep_run(sweep)
        rest = [r for r in runs if r["task"] == task and r["method"] == method and r["phase"] == "seed"
                and r["seed"] in seeds[1:] and math.isclose(r["lr"], best["lr"])]
        if len(rest) == len(seeds) - 1:
            out += [best, *rest]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=4, help="epochs of every method")
    ap.add_argument("--quick", action="store_true", help="2 epochs")
    ap.add_argument("--fair", action="store_true", help="lr chosen per task on val, >= 10 epochs, 3 seeds "
                    "(fidelity_fair_runs.jsonl / fidelity_fair.json)")
    ap.add_argument("--baseline-dir", default=None,
                    help="--fair: the directory of the default basis's fidelity_runs.jsonl, re-aggregated on the fair "
                         "table's tasks and shown next to it (default: --out-dir, where it has one)")
    ap.add_argument("--backbone", default=None, help="default: the shipped backbone")
    ap.add_argument("--aggregate-only", action="store_true")
    args = ap.parse_args(argv)
    from petl_platform import create_backbone
    from petl_platform.backbones.factory import SHIPPED

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / ("fidelity_fair_runs.jsonl" if args.fair else "fidelity_runs.jsonl")
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {(r["task"], r["method"], r["seed"]) for r in runs}
    epochs = 2 if args.quick else args.epochs
    if args.fair:
        epochs = max(10, args.epochs)
        if not args.aggregate_only:
            fair_runs(create_backbone(args.backbone or SHIPPED), args.tasks, args.methods, args.seeds, epochs, log, runs)
        runs = fair_selected(runs, args.seeds)
    todo = [(s, t, m) for s in args.seeds for t in args.tasks for m in args.methods if (t, m, s) not in done]
    if todo and not args.aggregate_only and not args.fair:
        from tqdm import tqdm

        bb = create_backbone(args.backbone or SHIPPED)
        for seed, task, method in (bar := tqdm(todo, desc="fidelity", unit="run")):
            bar.set_postfix_str(f"{method} {task} seed {seed}")
            t0 = time.time()
            rec = run_one(bb, task, method, seed, epochs)
            rec["wall_s"] = round(time.time() - t0, 1)
            with log.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            runs.append(rec)
    baseline = Path(args.baseline_dir) if args.baseline_dir else out
    # P4 on the fidelity backbone (`petl bench --only P4_fidelity`); memory does not depend on the lr
    p4_path = next((d / "p4_train_memory_fidelity.json" for d in (out, baseline)
                    if (d / "p4_train_memory_fidelity.json").exists()), None)
    p4 = json.loads(p4_path.read_text()) if p4_path else None
    # a method's reference variants (e.g. "linear (40 epochs)", its own longer recipe) travel with it
    agg = aggregate([r for r in runs if r["task"] in args.tasks and r["method"].split(" ")[0] in args.methods
                     and r["seed"] in args.seeds], p4)
    agg.update(seeds=args.seeds, epochs=epochs, backbone=args.backbone or SHIPPED,
               plots=[] if args.fair else plots(agg, out))
    if args.fair:
        agg.update(basis=f"lr per task on val over recipe lr x {', x '.join(f'{m:.3g}' for m in LR_GRID)}, "
                         f"grown by x 3 past an end that wins, up to x {LR_GRID_LIMIT:g} or x 1/{LR_GRID_LIMIT:g}; "
                         f"{epochs} epochs every method, seeds {args.seeds}",
                   chosen_lr={f"{r['method']}/{r['task']}": {"lr": r["lr"], "multiple": r["lr_multiple"]}
                              for r in runs if r["phase"] == "sweep" and r["task"] in args.tasks
                              and r["method"] in args.methods})
        if (baseline / "fidelity_runs.jsonl").exists():  # the default basis on the same tasks, next to it
            base_runs = [json.loads(line) for line in (baseline / "fidelity_runs.jsonl").read_text().splitlines()]
            base_runs = [r for r in base_runs if r["task"] in agg["tasks"] and r["seed"] in args.seeds
                         and r["method"].split(" ")[0] in agg["methods"]]
            same_schedule = [r["epochs"] for r in base_runs if " (" not in r["method"]]
            if same_schedule:
                agg["baseline"] = aggregate(base_runs, p4)
                agg["baseline"].update(seeds=args.seeds, backbone=agg["backbone"], dir=str(baseline),
                                       epochs=int(statistics.median(same_schedule)))
                agg["plots"] = fair_plot(agg, out)
    (out / ("fidelity_fair.json" if args.fair else "fidelity.json")).write_text(json.dumps(agg, indent=2) + "\n")
    for c in agg["claims"]:
        print(f"[{'met' if c['met'] else 'NOT met' if c['met'] is not None else 'n/a'}] {c['claim']}: {c['measured']}")
    print(f"wrote {out / ('fidelity_fair.json' if args.fair else 'fidelity.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
