"""`petl bench`: the orchestrator, the fidelity aggregation and claims, the report."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from petl_platform.cli import main

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _module(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(method, task, seed, acc, params=1000, gflops=1.0, **extra):
    return {"task": task, "method": method, "seed": seed, "accuracy": acc, "trainable_params": params,
            "gflops": gflops, "img_per_s": 100.0 + seed, **extra}


def _dyn(full, at50, at70, frac50=0.5, frac70=0.7):
    b = {"accuracy": 0, "flops_fraction": 0, "exit_fractions": [0.5, 0.5], "feasible": True}
    return {"full_accuracy": full, "budgets": {"0.5": {**b, "accuracy": at50, "flops_fraction": frac50},
                                               "0.7": {**b, "accuracy": at70, "flops_fraction": frac70}}}


def test_fidelity_claims_follow_the_figures():
    fid = _module("fidelity")
    runs = []
    for task in ("a", "b"):
        for seed in (0, 1):
            runs += [_run("linear", task, seed, 0.60, params=0, gflops=1.0),
                     _run("adapter", task, seed, 0.70 + 0.01 * seed, params=300),
                     _run("dtl", task, seed, 0.58, params=100),  # below the probe: claim must fail
                     _run("dyt", task, seed, 0.70, params=300,
                          dyt={"activation_rate": 0.5, "activation_rate_per_layer": [0.4, 0.6], "flops_ratio": 0.7}),
                     _run("arc", task, seed, 0.65, params=200, gflops=1.0,
                          merge={"max_abs_diff": 2e-6, "accuracy_merged": 0.65, "accuracy_unmerged": 0.65,
                                 "gflops_unmerged": 1.2}),
                     _run("dyn_adapter", task, seed, 0.70, params=400, dyn=_dyn(0.70, 0.692, 0.71))]
    p4 = {"backbone": "b", "results": {"dtl": {"peak_delta_mb": 50.0}, "adapter": {"peak_delta_mb": 40.0}}}
    agg = fid.aggregate(runs, p4)
    claims = {c["claim"]: c for c in agg["claims"]}
    beats = claims["every method beats the linear probe on average"]
    assert beats["met"] is False and "dtl" in beats["detail"]
    assert claims["dyn_adapter at a 50 % budget vs its full-depth model"]["met"] is False  # -0.8 pt
    assert claims["dyn_adapter at a 70 % budget vs its full-depth model"]["met"] is True
    assert claims["DyT (r = 0.5) within 1 pt of the dense adapter"]["met"] is True
    assert claims["DTL has the fewest trainable parameters of the adapter methods"]["met"] is True
    assert claims["DTL has the lowest training memory of the adapter methods"]["met"] is False
    assert claims["ARC's merged model is exact and costs zero extra FLOPs"]["met"] is True
    rows = {r["method"]: r for r in agg["rows"]}
    assert rows["adapter"]["accuracy"]["a"]["mean"] == pytest.approx(0.705)
    assert rows["adapter"]["accuracy"]["a"]["std"] == pytest.approx(0.00707, abs=1e-4)
    assert rows["dyn_adapter @50%"]["gflops"] == pytest.approx(0.5)
    assert agg["dyt_activation_per_layer"]["a"] == [0.4, 0.6]


def test_fair_basis_picks_each_cells_lr_on_val_and_reports_it():
    """--fair: per (task, method) the sweep run with the best VAL accuracy stands for seed 0 (not the
    best test accuracy), the other seeds must be at its lr, and an unfinished cell is left out."""
    fid, report = _module("fidelity"), _module("report")
    runs = []
    for mult, val, test in ((1 / 3, 0.60, 0.90), (1.0, 0.70, 0.50), (3.0, 0.65, 0.95)):
        runs.append(_run("lora", "a", 0, test, phase="sweep", lr=1e-3 * mult, lr_multiple=mult, val_accuracy=val))
    runs += [_run("lora", "a", s, 0.52, phase="seed", lr=1e-3, lr_multiple=1.0, val_accuracy=0.7) for s in (1, 2)]
    runs += [_run("linear", "a", 0, 0.4, phase="sweep", lr=1e-2 * m, lr_multiple=m, val_accuracy=0.4)
             for m in fid.LR_GRID]  # its seeds 1 and 2 are missing: not reported yet
    chosen = fid.fair_selected(runs, [0, 1, 2])
    assert {r["method"] for r in chosen} == {"lora"} and len(chosen) == 3
    assert next(r for r in chosen if r["seed"] == 0)["accuracy"] == 0.50  # picked on val (0.70), not test
    agg = fid.aggregate(chosen)
    agg.update(seeds=[0, 1, 2], epochs=10, backbone="b", basis="lr per task on val, 10 epochs",
               chosen_lr={"lora/a": {"lr": 1e-3, "multiple": 1.0}})
    md = "\n".join(report.fidelity_md(agg))
    assert "lora/a x1" in md and "| lora | 1,000 |" in md and "51.3 +- 1.2" in md


def test_fair_basis_grows_the_lr_grid_past_an_end_that_wins():
    """A best val accuracy at an end of the lr grid is not a choice: the grid grows by x 3 that way
    (up to the limit), the cell stays out of the table until it settles, and seeds at the old edge
    lr do not stand for the new choice."""
    fid = _module("fidelity")

    def sweep(vals):
        return [_run("linear", "a", 0, 0.5, phase="sweep", lr=1e-2 * m, lr_multiple=m, val_accuracy=v)
                for m, v in vals.items()]

    assert fid.next_lr_multiple([]) == fid.LR_GRID[0]
    runs = sweep({1 / 3: 0.5, 1.0: 0.6, 3.0: 0.7})
    assert fid.next_lr_multiple(runs) == pytest.approx(9.0)
    runs += [_run("linear", "a", s, 0.6, phase="seed", lr=3e-2, lr_multiple=3.0, val_accuracy=0.7) for s in (1, 2)]
    assert fid.fair_selected(runs, [0, 1, 2]) == []  # not settled: x 9 not tried yet
    runs += sweep({9.0: 0.8})
    assert fid.fair_selected(runs, [0, 1, 2]) == []  # x 9 won at the new end: x 27 is next
    assert fid.next_lr_multiple(runs) == pytest.approx(27.0)
    runs += sweep({27.0: 0.75})
    assert fid.next_lr_multiple(runs) is None
    assert fid.fair_selected(runs, [0, 1, 2]) == []  # seeds 1, 2 ran at x 3, not at the chosen x 9
    runs += [_run("linear", "a", s, 0.7, phase="seed", lr=9e-2, lr_multiple=9.0, val_accuracy=0.8) for s in (1, 2)]
    chosen = fid.fair_selected(runs, [0, 1, 2])
    assert sorted(r["seed"] for r in chosen) == [0, 1, 2] and {r["lr_multiple"] for r in chosen} == {9.0}
    low = sweep({1 / 3: 0.9, 1.0: 0.6, 3.0: 0.5, 1 / 9: 0.8})  # x 1/3 won at the low end, then beat x 1/9
    assert fid.next_lr_multiple(low) is None
    edge = sweep({m: 0.9 if m == 27.0 else 0.1 for m in (1 / 3, 1.0, 3.0, 9.0, 27.0)})
    assert fid.next_lr_multiple(edge) is None  # the limit: x 27 stands


def test_fair_table_carries_the_default_basis_on_the_same_tasks_next_to_it(tmp_path):
    """`fidelity.py --fair --aggregate-only --baseline-dir`: the default basis's runs are re-aggregated
    on the fair table's tasks, seeds and methods only, and the report shows both accuracies and both
    verdicts on every claim."""
    fid, report = _module("fidelity"), _module("report")
    out, base = tmp_path / "fair", tmp_path / "base"
    out.mkdir(), base.mkdir()
    fair = []
    for method, lr, val_acc, test in (("linear", 1e-2, 0.6, 0.60), ("lora", 1e-3, 0.8, 0.80)):
        fair += [_run(method, "a", 0, test, phase="sweep", lr=lr * m, lr_multiple=m, val_accuracy=val_acc - abs(m - 1) / 10,
                      epochs=10) for m in fid.LR_GRID]
        fair += [_run(method, "a", s, test, phase="seed", lr=lr, lr_multiple=1.0, val_accuracy=val_acc, epochs=10)
                 for s in (1, 2)]
    fair += [_run("lora", "b", 0, 0.9, phase="sweep", lr=1e-3, lr_multiple=1.0, val_accuracy=0.9, epochs=10)]  # unsettled
    (out / "fidelity_fair_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fair))
    four = [_run(m, t, s, acc, epochs=e) for m, acc, e in (("linear", 0.65, 4), ("lora", 0.62, 4),
                                                          ("linear (40 epochs)", 0.7, 40), ("adapter", 0.5, 4))
            for t in ("a", "b") for s in (0, 1, 2)]
    (base / "fidelity_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in four))
    assert fid.main(["--out-dir", str(out), "--fair", "--aggregate-only", "--tasks", "a", "b",
                     "--baseline-dir", str(base)]) == 0
    agg = json.loads((out / "fidelity_fair.json").read_text())
    assert agg["tasks"] == ["a"] and agg["baseline"]["tasks"] == ["a"] and agg["baseline"]["epochs"] == 4
    assert [r["method"] for r in agg["baseline"]["rows"]] == ["linear", "lora", "linear (40 epochs)"]
    assert agg["plots"] == [str(out / "fidelity_fair_vs_default.png")] and Path(agg["plots"][0]).stat().st_size > 0
    fair_claim = agg["claims"][0]
    assert fair_claim["met"] is True and agg["baseline"]["claims"][0]["met"] is False
    md = "\n".join(report.fidelity_compare_md(agg))
    assert "| lora | 80.0 | 62.0 | 80.0 | 62.0 | +18.0 pt |" in md
    assert "| linear (40 epochs) | - | 70.0 | - | 70.0 | - |" in md
    assert "| every method beats the linear probe on average | **met**: pt vs probe: lora +20.0 | **missed**: " in md


def test_unknown_section_is_one_line_exit_2(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--only", "P99", "--out", str(tmp_path)])
    assert e.value.code == 2
    proc = subprocess.run([sys.executable, str(BENCH / "report.py"), "--only", "P99", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown section" in proc.stderr


@pytest.mark.slow
def test_bench_p6_and_fidelity_end_to_end(tmp_path):
    """The real orchestrator path: `petl bench --only P6 --quick`, then a small real fidelity run
    aggregated into the same report."""
    assert main(["bench", "--quick", "--only", "P6", "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert runs["P6"]["rc"] == 0 and "error" not in runs["P6"]
    p6 = json.loads((tmp_path / "p6_gflops.json").read_text())
    for r in p6["backbones"]["petl_vit_t12_p4_32"].values():
        assert 0 < r["fraction_of_peak"] and r["fraction_range"][0] <= r["fraction_of_peak"] <= r["fraction_range"][1]
        assert r["gflops_per_image"] > 0.1  # 12 blocks x 65 tokens x width 192: a measured count, not zero

    fid = _module("fidelity")
    from platform_stack import write_tiny_backbone

    # on the tests' tiny ViT (depth 4, width 64): the same runs, rows and claims in a tenth of the
    # shipped backbone's time (over 10 min on the shared 2-core machine)
    (tmp_path / "backbone").mkdir()
    tiny = write_tiny_backbone(tmp_path / "backbone")
    assert fid.main(["--out-dir", str(tmp_path), "--tasks", "digits-1k", "--methods", "linear", "arc", "dyt",
                     "dyn_adapter", "--seeds", "0", "--epochs", "1", "--backbone", tiny]) == 0
    res = json.loads((tmp_path / "fidelity.json").read_text())
    claims = {c["claim"]: c for c in res["claims"]}
    arc = claims["ARC's merged model is exact and costs zero extra FLOPs"]
    assert arc["met"] is True, arc  # merging is exact whatever the accuracy
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["dyt"]["gflops"] < rows["linear"]["gflops"] * 1.2  # the dispatcher really skips MLP work
    assert {"dyn_adapter @50%", "dyn_adapter @70%"} <= set(rows)
    assert all(Path(p).exists() for p in res["plots"]) and len(res["plots"]) == 3

    assert main(["bench", "--report", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "| P6 | petl_vit_t12_p4_32 forward, batch 32" in md
    assert "## Fidelity to the papers" in md and "| dyn_adapter @50% |" in md
    assert "fidelity_pareto.png" in md
    report = json.loads((tmp_path / "report.json").read_text())
    assert [f["id"] for f in report["figures"]].count("P6") == 2



PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16  # enough of a PNG for a file that is copied, never opened


def _p2(speedup):
    tp = {"speedup": speedup, "speedup_range": [speedup - 0.1, speedup + 0.1]}
    return {"budget": 0.5, "method": "dyn_lora", "task": "digits-1k", "repeats": 3, "accuracy_drop_pt": 0.2,
            "throughput_b1": {**tp, "batch": 1}, "throughput_b64": {**tp, "batch": 64},
            "full_depth": {"test_accuracy": 0.78}, "dynamic": {"test_accuracy": 0.776, "flops_fraction": 0.46}}


def _colocation(overhead):
    return {"batch": 32, "hop_overhead": overhead, "ratio_range": [overhead, overhead], "repeats": 7,
            "states_shipped_mb": 1.5}


def _goal_row(md: str, fid: str) -> list[str]:
    """The cells of the first row of ``fid`` in the report's "Goals vs measured" table."""
    table = md.split("## Goals vs measured")[1].split("\n## ")[0]
    return next(line for line in table.splitlines() if line.startswith(f"| {fid} |")).split(" | ")


def _links(md: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", md)


def test_report_carries_a_section_it_did_not_run_into_its_own_folder_with_its_date(tmp_path):
    """A section measured only in an older dated folder is copied (JSON and plot) into the new report's
    folder and labelled with the date it was measured; the newest older folder wins, a newer one and
    the folder's own results are never overwritten, and every link of the report is a file of its folder."""
    report = _module("report")
    results = tmp_path / "results"
    oldest, old, new, newer = (results / d for d in ("2026-11-01", "2026-11-21", "2026-12-02", "2027-01-05"))
    for d in (oldest, old, new, newer):
        d.mkdir(parents=True)
    (oldest / "p2_early_exit.json").write_text(json.dumps(_p2(1.11)))  # superseded by 2026-11-21's
    (oldest / "colocation_hop.json").write_text(json.dumps(_colocation(1.31)))
    (old / "p2_early_exit.json").write_text(json.dumps(_p2(2.05)))
    (old / "p2_accuracy_vs_flops.png").write_bytes(PNG)
    (old / "runs.json").write_text(json.dumps({"P2": {"cmd": "bench/p2_early_exit.py --quick", "wall_s": 84.5,
                                                      "quick": True, "rc": 0}}))
    (old / "colocation_hop.json").write_text(json.dumps(_colocation(1.42)))
    (new / "colocation_hop.json").write_text(json.dumps(_colocation(1.20)))  # run into this folder: its own
    (newer / "p7_asha_vs_grid.json").write_text("{}")  # measured after: never carried back
    machine = {"cpu_count": 2, "cpu": "x86_64", "python": "3", "torch": "t", "cuda": False}

    md = report.render(new, {}, quick=True, machine_facts=machine)

    assert (new / "p2_early_exit.json").read_bytes() == (old / "p2_early_exit.json").read_bytes()
    assert (new / "p2_accuracy_vs_flops.png").read_bytes() == PNG
    assert json.loads((new / "colocation_hop.json").read_text())["hop_overhead"] == 1.20
    assert not (new / "p7_asha_vs_grid.json").exists()
    manifest = json.loads((new / "carried.json").read_text())
    assert set(manifest) == {"P2"}, manifest
    assert manifest["P2"]["measured"] == "2026-11-21"
    assert manifest["P2"]["files"] == ["p2_early_exit.json", "p2_accuracy_vs_flops.png"]
    p2_row, co_row = _goal_row(md, "P2"), _goal_row(md, "co-location")
    assert "2.05x" in p2_row[2] and p2_row[6] == "2026-11-21 (carried)", p2_row
    assert "1.20x" in co_row[2] and co_row[6] == "2026-12-02", co_row
    assert "*P2, measured 2026-11-21 (carried)*" in md
    assert "| P2 | 2026-11-21 | quick | 84 s | `p2_early_exit.json`, `p2_accuracy_vs_flops.png` |" in md
    links = _links(md)
    assert "p2_accuracy_vs_flops.png" in links
    for link in links:
        target = (new / link).resolve()
        assert target.parent == new.resolve() and target.is_file(), link
    figs = {f["id"]: f for f in json.loads((new / "report.json").read_text())["figures"]}
    assert figs["P2"]["measured"] == "2026-11-21 (carried)"

    # a later report carries it on with the date it was measured, not the folder it was copied from
    later = results / "2026-12-09"
    later.mkdir()
    report.render(later, {}, quick=True, machine_facts=machine)
    assert json.loads((later / "carried.json").read_text())["P2"]["measured"] == "2026-11-21"

    # the section run into the folder afterwards replaces the carried copy and its label
    (new / "p2_early_exit.json").write_text(json.dumps(_p2(1.95)))
    md = report.render(new, {}, quick=True, machine_facts=machine)
    assert not (new / "carried.json").exists() and not (new / "p2_accuracy_vs_flops.png").exists()
    p2_row = _goal_row(md, "P2")
    assert "1.95x" in p2_row[2] and p2_row[6] == "2026-12-02"
    assert "p2_accuracy_vs_flops.png" not in _links(md)
