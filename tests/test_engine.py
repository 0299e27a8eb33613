"""The mixed-task engine: rows of many tasks, every method family, one pass over the frozen weights.
Every answer equals the task run alone within 1e-5 (fp32), whatever else shares its batch."""

import random
from collections import Counter

import pytest
import torch

from petl_platform import PetlError, build_model, get_method, list_methods
from petl_platform.inference import Engine, Row
from petl_platform.methods import AdapterModule
from petl_platform.methods.registry import RUNTIMES
from test_inference import _randomize  # trained-looking random adapter weights, eval mode

PER_ROW = [m for m in list_methods() if get_method(m).runtime == "per_row_adapter"]
EARLY_EXIT = [m for m in list_methods() if get_method(m).runtime == "early_exit"]
ATOL = 1e-5


def _make(method, backbone, seed, classes=3, **hp):
    return _randomize(build_model(method, backbone, classes + seed % 3, **hp), seed)


def _alone(model, x, knobs):
    """The task run by itself, the reference for every engine answer."""
    with torch.no_grad():
        runtime = get_method(model.method).runtime
        if runtime == "early_exit":
            r = model.predict_dynamic(x, knobs.get("thresholds"))
            return r["logits"], r["exit_stage"].tolist()
        if runtime == "token_dispatch":
            return model(x, ratio=knobs.get("ratio")), None
        return model(x), None


def _check(engine, models, images, rows):
    results = engine.run(images, rows, models)
    assert len(results) == len(rows)
    for r, got in zip(rows, results):
        want, stages = _alone(models[r.task], images[r.image:r.image + 1], dict(r.knobs))
        assert got.task == r.task
        torch.testing.assert_close(got.logits, want[0].float(), rtol=0, atol=ATOL, msg=f"{r}")
        if stages is not None:
            assert got.exit_stage == stages[0], r
        assert got.compute["gflops"] > 0
    return results


def test_every_method_declares_a_runtime_and_a_space():
    for m in list_methods():
        spec = get_method(m)
        assert spec.runtime in RUNTIMES, m
        assert isinstance(spec.default_space(12), dict)
    assert get_method("dyn_lora").default_space(12) == {**get_method("dyn_adapter").default_space(12), "rank": "choice(4,8,16)"}
    assert get_method("dtl").default_space(12)["m"] == "choice(4,6,8)"


@pytest.mark.parametrize("method", PER_ROW + EARLY_EXIT)
def test_adapter_modules_honour_the_mixed_contract(method, tiny_backbone8):
    """forward(x) == frozen_forward(x + input_delta(x)) + output_delta(x) at every site."""
    model = _make(method, tiny_backbone8, 1)
    sites = model.adapter_sites()
    assert sites or method == "dyn_linear", method  # dyn_linear: exits over the frozen trunk only
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        for name, m in sites.items():
            assert isinstance(m, AdapterModule)
            d_in, d_out = m.input_delta(x), m.output_delta(x)
            ref = m.frozen_forward(x if d_in is None else x + d_in)
            if d_out is not None:
                ref = ref + d_out
            torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", PER_ROW)
@pytest.mark.parametrize("n_tasks", [1, 2, 5])
def test_per_row_adapter_mixed_batches(method, n_tasks, tiny_backbone8):
    """1..N tasks of one method, uneven rows per task, rows interleaved: each equals its task alone."""
    models = {f"t{i}": _make(method, tiny_backbone8, 10 + i) for i in range(n_tasks)}
    torch.manual_seed(2)
    images = torch.randn(7, 3, 32, 32)
    rnd = random.Random(n_tasks)
    rows = [Row(i % 7, f"t{rnd.randrange(n_tasks)}") for i in range(11)]
    _check(Engine(tiny_backbone8, merge_cache=0), models, images, rows)


def test_every_per_row_method_in_one_batch(tiny_backbone8):
    """LoRA, Adapter, RepAdapter, ARC, ARC_att rows mixed in one batch, one frozen op per site."""
    models = {m: _make(m, tiny_backbone8, 20 + i) for i, m in enumerate(PER_ROW)}
    assert {"lora", "adapter", "repadapter", "arc", "arc_att"} <= set(models)
    torch.manual_seed(3)
    images = torch.randn(6, 3, 32, 32)
    rows = [Row(i % 6, t) for i, t in enumerate(list(models) * 3)][:13]
    engine = Engine(tiny_backbone8, merge_cache=0)
    _check(engine, models, images, rows)
    # the frozen qkv of every block ran once for the whole batch, with every task's rows in it
    calls = Counter()
    hooks = [site.register_forward_hook(lambda mod, inp, out: calls.update([(mod.name, inp[0].shape[0])]))
             for site in engine._mixed.modules() if type(site).__name__ == "RowSite"]
    engine.run(images, rows, models)
    for h in hooks:
        h.remove()
    qkv = {k: v for k, v in calls.items() if k[0].endswith("attn.qkv")}
    assert len(qkv) == 8 and set(qkv.values()) == {1} and {n for _, n in qkv} == {len(rows)}


@pytest.mark.parametrize("method", EARLY_EXIT)
def test_early_exit_rows_leave_at_their_exit(method, tiny_backbone8):
    """Dyn-* over every base: per-row thresholds, rows of several tasks leave at different exits."""
    models = {"a": _make(method, tiny_backbone8, 30), "b": _make(method, tiny_backbone8, 31),
              "c": _make("lora", tiny_backbone8, 32, rank=2)}
    torch.manual_seed(4)
    images = torch.randn(6, 3, 32, 32)
    rows = [Row(0, "a", {"thresholds": [0.0, 0.0, 0.0]}), Row(1, "a", {"thresholds": [2.0, 0.0, 0.0]}),
            Row(2, "a"), Row(3, "b", {"thresholds": [2.0, 2.0, 0.0]}), Row(4, "b", {"thresholds": [0.5, 0.5, 0.5]}),
            Row(5, "c"), Row(0, "b")]
    results = _check(Engine(tiny_backbone8, merge_cache=0), models, images, rows)
    stages = [r.exit_stage for r in results]
    assert stages[:4] == [1, 2, 4, 3] and stages[5] is None  # threshold 0 leaves at once; NEVER runs to the end
    assert results[0].compute["flops_fraction"] < results[1].compute["flops_fraction"] < 1.0
    assert results[2].compute["flops_fraction"] == pytest.approx(1.0, abs=0.01)  # + the early heads it ran


def test_all_four_runtimes_in_one_batch(tiny_backbone8):
    models = {"lin": _make("linear", tiny_backbone8, 40), "dtl": _make("dtl", tiny_backbone8, 41, m=3),
              "plus": _make("dtl_plus", tiny_backbone8, 42, m=5), "lora": _make("lora", tiny_backbone8, 43, rank=2),
              "ad": _make("adapter", tiny_backbone8, 44), "rep": _make("repadapter", tiny_backbone8, 45),
              "arc": _make("arc", tiny_backbone8, 46, rank=8), "dyn": _make("dyn_lora", tiny_backbone8, 47, rank=2),
              "dyn_ad": _make("dyn_adapter", tiny_backbone8, 48), "dyt": _make("dyt", tiny_backbone8, 49),
              "dyt2": _make("dyt", tiny_backbone8, 50)}
    torch.manual_seed(5)
    images = torch.randn(5, 3, 32, 32)
    rnd = random.Random(0)
    knobs = {"dyn": {"thresholds": [0.4, 0.5, 0.6]}, "dyt": {"ratio": 0.3}, "dyn_ad": {}, "dyt2": {}}
    rows = [Row(rnd.randrange(5), t, knobs.get(t, {})) for t in rnd.choices(list(models), k=40)]
    rows += [Row(i, t) for i in range(5) for t in ("lin", "dtl")]  # one image, many tasks
    engine = Engine(tiny_backbone8, merge_cache=0)
    _check(engine, models, images, rows)
    st = engine.last_stats
    assert st["embeds"] <= 5 and st["trunk_blocks"] == 8  # the frozen embedding once per distinct image
    assert set(st["runtimes"]) == {"shared_trunk", "blockwise", "token_dispatch"}


def test_single_mergeable_task_uses_merged_weights(tiny_backbone8, images):
    model = _make("lora", tiny_backbone8, 60, rank=2)
    engine = Engine(tiny_backbone8, merge_cache=1)
    rows = [Row(i, "t") for i in range(4)]
    for _ in range(4):  # merged after a few single-task batches
        _check(engine, {"t": model}, images, rows)
    assert len(engine._merged) == 1
    other = _make("lora", tiny_backbone8, 61, rank=2)
    _check(engine, {"t": model, "u": other}, images, rows + [Row(0, "u")])  # mixed again: exact still


def test_bad_rows_and_knobs_are_refused(tiny_backbone, tiny_backbone8, images):
    models = {"lin": _make("linear", tiny_backbone8, 70), "dyn": _make("dyn_lora", tiny_backbone8, 71, rank=2)}
    engine = Engine(tiny_backbone8)
    with pytest.raises(PetlError, match="unknown task 'x'"):
        engine.run(images, [Row(0, "x")], models)
    with pytest.raises(PetlError, match="points at image 9"):
        engine.run(images, [Row(9, "lin")], models)
    with pytest.raises(PetlError, match="takes no knobs; got ratio"):
        engine.run(images, [Row(0, "lin", {"ratio": 0.5})], models)
    with pytest.raises(PetlError, match="takes knobs thresholds; got ratio"):
        engine.run(images, [Row(0, "dyn", {"ratio": 0.5})], models)
    with pytest.raises(PetlError, match="expected 3 thresholds"):
        engine.run(images, [Row(0, "dyn", {"thresholds": [0.1]})], models)
    with pytest.raises(PetlError, match="fingerprint"):
        engine.run(images, [Row(0, "alien")], {"alien": build_model("lora", tiny_backbone, 2)})


def test_bf16_inference_runs_and_stays_close(tiny_backbone8, images):
    """Half precision is an option (CPU bf16 here; CUDA in bench/gpu_check.py)."""
    from petl_platform import create_backbone

    torch.manual_seed(0)
    bb = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=8, embed_dim=64, num_heads=2)
    model = _make("lora", bb, 80, rank=2)
    with torch.no_grad():
        ref = model(images)
    engine = Engine(bb, dtype=torch.bfloat16)
    out = engine.run(images, [Row(i, "t") for i in range(4)], {"t": model})
    assert next(bb.parameters()).dtype == torch.bfloat16 and out[0].logits.dtype == torch.float32
    torch.testing.assert_close(torch.stack([r.logits for r in out]), ref, rtol=0.1, atol=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_runs_on_cuda(tiny_backbone8, images):
    from petl_platform import create_backbone

    torch.manual_seed(0)
    bb = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=8, embed_dim=64, num_heads=2)
    model = _make("lora", bb, 90, rank=2)
    with torch.no_grad():
        ref = model(images)
    out = Engine(bb, device="cuda").run(images, [Row(i, "t") for i in range(4)], {"t": model})
    torch.testing.assert_close(torch.stack([r.logits for r in out]), ref, rtol=0, atol=1e-4)


def test_gathered_deltas_equal_the_reference_loop(tiny_backbone8):
    """Each method's batched_deltas (gathered bmm) == the per-segment reference loop; tasks of
    another rank / width in the same run fall back to the loop and stay exact."""
    for method, hps in {"lora": [{"rank": 2}, {"rank": 2}, {"rank": 4}], "adapter": [{}, {}, {"bottleneck": 4}],
                        "arc": [{"rank": 8}, {"rank": 8}, {"rank": 4}]}.items():
        ms = [_make(method, tiny_backbone8, 100 + i, **hp) for i, hp in enumerate(hps)]
        site = next(iter(ms[0].adapter_sites()))
        mods = [m.adapter_sites()[site] for m in ms]
        x, lengths = torch.randn(6, 17, 64), [1, 3, 2]
        cls = type(mods[0])
        with torch.no_grad():
            for group, lens in ((mods[:1], lengths[:1]), (mods[:2], lengths[:2]), (mods, lengths)):
                rows = sum(lens)
                got = cls.batched_input_delta(group, x[:rows], lens)
                ref = AdapterModule.batched_input_delta.__func__(cls, group, x[:rows], lens)
                assert (got is None) == (ref is None), method
                if got is not None:
                    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6, msg=method)
                out, ref_out = torch.zeros(rows, 17, 3 * 64), torch.zeros(rows, 17, 3 * 64)
                if method == "adapter":
                    out, ref_out = torch.zeros(rows, 17, 64), torch.zeros(rows, 17, 64)
                cls.add_batched_output_delta(out, group, x[:rows], lens)
                AdapterModule.add_batched_output_delta.__func__(cls, ref_out, group, x[:rows], lens)
                torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6, msg=method)
