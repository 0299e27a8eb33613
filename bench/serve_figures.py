"""The serving figures of ``serve_load.py``: each drives the load generator (its own process, see
``load_gen.py``) against the running app and, where a figure has an in-process side, times the
engine in this process while the server is idle, interleaved round by round. Every ratio is the
median of the rounds, with their min-max spread."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from load_gen import LoadGen, write_requests
from serve_inputs import oip_body, v1_body

BATCH = 32  # the in-process engine's batch (S1, S2)


@dataclass
class Ctx:
    gen: LoadGen
    tmp: Path
    headers: dict  # every request's (the API key)
    dur: float  # seconds measured per served window
    warm: float  # seconds run before a window, at least
    base_s: float  # seconds per in-process measurement
    repeats: int
    cpu: list = field(default_factory=list)  # the generator's CPU fraction in every measurement

    def file(self, name: str, reqs: list[dict]) -> Path:
        return write_requests(self.tmp / f"{name}.pkl", reqs)

    def req(self, path: str, body_headers: tuple[bytes, dict], images: int = 1) -> dict:
        body, headers = body_headers
        return {"path": path, "body": body, "headers": {**self.headers, **headers}, "images": images}

    def closed(self, f: Path, concurrency: int, expect_rps: float | None = None, scale: float = 1.0,
               **extra) -> dict:
        """``concurrency`` in flight; the warm-up covers 1.5 latencies and the window 4 (capped), from
        ``expect_rps`` when known, so that the window sees the steady state."""
        lat = concurrency / expect_rps if expect_rps else 0.0
        res = self.gen.run(f, concurrency=concurrency, warmup=min(max(self.warm, 1.5 * lat), 3.0),
                           duration=min(max(self.dur * scale, 4 * lat), 2.5 * self.dur * scale), **extra)
        self.cpu.append(res["client_cpu_frac"])
        if not res["ok"]:
            raise RuntimeError(f"{f.stem}: no answer of 200 at {concurrency} in flight; statuses {res['statuses']}")
        return res

    def n(self, f: Path, concurrency: int, n: int) -> dict:
        return self.gen.run(f, concurrency=concurrency, n=n)


def _summary(rounds: list[dict], key: str = "ratio") -> dict:
    vals = [r[key] for r in rounds]
    return {key: statistics.median(vals), f"{key}_range": [min(vals), max(vals)]}


def saturate(ctx: Ctx, f: Path, levels: list[int]) -> tuple[int, dict, float]:
    """The concurrency with the most img/s among ``levels`` (a short sweep), the sweep, its req/s."""
    sweep, rps = {}, None
    for c in levels:
        res = ctx.closed(f, c, rps)
        sweep[c], rps = res["img_s"], res["rps"] or rps
    best = max(sweep, key=sweep.get)
    return best, sweep, rps


def s1(ctx: Ctx, inproc, task: str, pixels, levels: list[int]) -> dict:
    """S1: 16-image OIP binary UINT8 requests at saturation vs the engine at batch 32 on the same pixels."""
    f = ctx.file("s1", [ctx.req(f"/v2/models/{task}/infer", oip_body(pixels), len(pixels))])
    ctx.n(f, 2, 8)  # warm-up
    c, sweep, rps = saturate(ctx, f, levels)
    rounds = []
    for _ in range(ctx.repeats):
        base = inproc.u8_img_s(pixels, BATCH, ctx.base_s)
        served = ctx.closed(f, c, rps)
        rounds.append({"served_img_s": served["img_s"], "in_process_img_s": base, "ratio": served["img_s"] / base,
                       "p50_ms": served["ok_p50_ms"], "statuses": served["statuses"],
                       "client_cpu_frac": served["client_cpu_frac"]})
    return {**_summary(rounds), "goal": 0.8, "concurrency": c, "sweep": sweep, "images_per_request": len(pixels),
            "in_process_batch": BATCH, "request": f"POST /v2/models/{task}/infer, binary UINT8 {list(pixels.shape)}",
            "rounds": rounds}


def s2_s3_s4(ctx: Ctx, inproc, task: str, pngs: list[bytes], levels: list[int]) -> dict:
    """One PNG per /v1/predict JSON request. Each round: the engine on PNGs at batch 32, served at the
    saturating concurrency c (S2), served at 4c (S4), the engine at batch 1 and served with one
    request in flight (S3)."""
    f = ctx.file("s2", [ctx.req("/v1/predict", v1_body([p], [task])) for p in pngs])
    ctx.n(f, 4, 16)  # warm-up
    c, sweep, rps = saturate(ctx, f, levels)
    s2, s3, s4 = [], [], []
    for _ in range(ctx.repeats):
        base = inproc.png_img_s(pngs, BATCH, ctx.base_s)
        sat = ctx.closed(f, c, rps)
        # clients that honour Retry-After (wait 1 s after a 503), as S4 counts; then clients that retry at once
        over = ctx.closed(f, 4 * c, sat["ok_rps"] or rps, scale=1.5, wait_retry_after=1.0)
        eager = ctx.closed(f, 4 * c, sat["ok_rps"] or rps, scale=1.5)
        b1 = inproc.png_b1_ms(pngs, ctx.base_s / 2)
        one = ctx.closed(f, 1)
        s2.append({"served_img_s": sat["img_s"], "in_process_img_s": base, "ratio": sat["img_s"] / base,
                   "served_rps": sat["rps"], "p50_ms": sat["ok_p50_ms"], "p99_ms": sat["ok_p99_ms"],
                   "statuses": sat["statuses"], "client_cpu_frac": sat["client_cpu_frac"]})
        s3.append({"served_p50_ms": one["ok_p50_ms"], "served_p99_ms": one["ok_p99_ms"], "in_process_ms": b1,
                   "ratio": one["ok_p50_ms"] / b1, "requests": one["requests"], "statuses": one["statuses"]})
        shed = over["statuses"].get("503", 0)
        started = sum(over["statuses"].values())
        s4.append({"saturation_img_s": sat["img_s"], "overload_img_s": over["img_s"],
                   "ratio": over["img_s"] / sat["img_s"], "p50_ms": over["ok_p50_ms"], "p99_ms": over["ok_p99_ms"],
                   "tail": over["ok_p99_ms"] / over["ok_p50_ms"] if over["ok_p50_ms"] else None,
                   "statuses": over["statuses"], "window_ok": over["ok"],
                   "shed_fraction": shed / started if started else 0.0,
                   "retry_after_fraction": over["retry_after"].get("503", 0) / shed if shed else None,
                   "client_cpu_frac": over["client_cpu_frac"],
                   "no_wait": {"ratio": eager["img_s"] / sat["img_s"], "statuses": eager["statuses"],
                               "tail": eager["ok_p99_ms"] / eager["ok_p50_ms"] if eager["ok_p50_ms"] else None}})
    ra = [r["retry_after_fraction"] for r in s4 if r["retry_after_fraction"] is not None]
    request = f"POST /v1/predict, JSON, one base64 PNG, tasks [{task}]"
    return {"s2": {**_summary(s2), "goal": 0.4, "concurrency": c, "sweep": sweep, "in_process_batch": BATCH,
                   "request": request, "rounds": s2},
            "s3": {**_summary(s3), "goal": 2.0, "request": request, "rounds": s3},
            "s4": {**_summary(s4), **_summary([r for r in s4 if r["tail"] is not None] or [{"tail": float("nan")}], "tail"),
                   "goal": 0.9, "tail_goal": 3.0, "concurrency": 4 * c,
                   "saturation_concurrency": c, "shed_fraction": statistics.median(r["shed_fraction"] for r in s4),
                   "retry_after_fraction": min(ra) if ra else None, "request": request, "rounds": s4,
                   "clients": "wait the Retry-After (1 s) after a 503",
                   "no_wait_ratio": statistics.median(r["no_wait"]["ratio"] for r in s4)}}


def _pair(ctx: Ctx, a: Path, b: Path, concurrency: int) -> list[dict]:
    """Interleaved rounds of ``a`` and ``b`` at ``concurrency``: img/s of each and b / a."""
    rounds, rps = [], None
    for _ in range(ctx.repeats):
        ra = ctx.closed(a, concurrency, rps)
        rb = ctx.closed(b, concurrency, ra["rps"] or rps)
        rps = ra["rps"] or rps
        rounds.append({"a_img_s": ra["img_s"], "b_img_s": rb["img_s"], "ratio": rb["img_s"] / ra["img_s"] if ra["img_s"] else 0.0,
                       "a_statuses": ra["statuses"], "b_statuses": rb["statuses"]})
    return rounds


def served_p2(ctx: Ctx, task: str, pngs, pixels, c_one: int, c_multi: int) -> dict:
    """Dyn-LoRA at a 50 % budget vs full depth (threshold 1.0), one PNG per /v1/predict request and
    16-image OIP requests (budget / threshold as request parameters)."""
    one = {k: ctx.file(f"p2_one_{k}", [ctx.req("/v1/predict", v1_body([p], [task], **knob)) for p in pngs])
           for k, knob in (("full", {"threshold": 1.0}), ("half", {"budget": 0.5}))}
    multi = {k: ctx.file(f"p2_multi_{k}", [ctx.req(f"/v2/models/{task}/infer", oip_body(pixels, knob), len(pixels))])
             for k, knob in (("full", {"threshold": 1.0}), ("half", {"budget": 0.5}))}
    for f in (*one.values(), *multi.values()):
        ctx.n(f, 4, 8)  # load + calibrate the task on its replica
    out, oip = {}, f"POST /v2/models/{task}/infer, binary UINT8 {list(pixels.shape)}"
    for key, files, c, what in (("served_p2", one, c_one, "one PNG per POST /v1/predict (JSON)"),
                                ("served_p2_multi", multi, c_multi, oip)):
        rounds = _pair(ctx, files["full"], files["half"], c)
        out[key] = {"speedup": statistics.median(r["ratio"] for r in rounds), "rounds": [r["ratio"] for r in rounds],
                    "detail": rounds, "goal": 1.8, "concurrency": c, "request": what, "task": task}
    return out


def served_p5(ctx: Ctx, tasks: list[str], pngs, pixels, name: str, multi: bool = True, concurrency: int = 32) -> dict:
    """``len(tasks)`` tasks in flight vs the first alone, one PNG per /v1/predict request (and 16-image
    OIP requests when ``multi``); ``concurrency`` requests in flight either way."""
    mixed = ctx.file(f"{name}_one_mixed", [ctx.req("/v1/predict", v1_body([pngs[i % len(pngs)]], [t]))
                                           for i, t in enumerate(tasks)])
    single = ctx.file(f"{name}_one_single", [ctx.req("/v1/predict", v1_body([p], [tasks[0]])) for p in pngs])
    ctx.n(mixed, 8, 2 * len(tasks))  # every replica loads every task's adapter first
    kinds = [(name, mixed, single, "one PNG per POST /v1/predict (JSON)")]
    if multi:
        body = oip_body(pixels)
        mm = ctx.file(f"{name}_multi_mixed", [ctx.req(f"/v2/models/{t}/infer", body, len(pixels)) for t in tasks])
        ms = ctx.file(f"{name}_multi_single", [ctx.req(f"/v2/models/{tasks[0]}/infer", body, len(pixels))])
        ctx.n(mm, 8, len(tasks))
        kinds.append((f"{name}_multi", mm, ms, f"POST /v2/models/{{task}}/infer, binary UINT8 {list(pixels.shape)}"))
    out = {}
    for key, m, s, what in kinds:
        rounds = [{"mixed_img_s": r["b_img_s"], "single_img_s": r["a_img_s"], "ratio": r["ratio"]}
                  for r in _pair(ctx, s, m, concurrency)]
        out[key] = {"tasks": len(tasks), "rounds": rounds, "ratio": statistics.median(r["ratio"] for r in rounds),
                    "goal": 0.85, "concurrency": concurrency, "request": what}
    return out


def p8(ctx: Ctx, task: str, pngs, sat_rps: float, batch1: dict) -> dict:
    """P8: p99/p50 at 50 % of the saturation req/s (open loop, Poisson) and with one in flight."""
    f = ctx.file("p8", [ctx.req("/v1/predict", v1_body([p], [task])) for p in pngs])
    half = ctx.gen.run(f, rate=0.5 * sat_rps, duration=2 * ctx.dur, warmup=ctx.warm)
    ctx.cpu.append(half["client_cpu_frac"])
    h = {"rate": 0.5 * sat_rps, "requests": sum(half["statuses"].values()), "p50_ms": half["p50_ms"],
         "p99_ms": half["p99_ms"], "failed": sum(v for k, v in half["statuses"].items() if k != "200")}
    return {"saturation_rps": sat_rps, "at_half_saturation": h, "batch1": batch1,
            "ratio_half": h["p99_ms"] / h["p50_ms"], "ratio_batch1": batch1["p99_ms"] / batch1["p50_ms"], "goal": 3.0,
            "task": task}


def served_p1(ctx: Ctx, trunk_tasks: list[str], png: bytes) -> dict:
    k = len(trunk_tasks)
    fan = ctx.file("p1_fan", [ctx.req("/v1/predict", v1_body([png], trunk_tasks))])
    sep = ctx.file("p1_sep", [ctx.req("/v1/predict", v1_body([png], [t])) for t in trunk_tasks])
    ctx.n(sep, 8, 2 * k)
    a, b = ctx.closed(fan, 8), ctx.closed(sep, 8)
    return {"tasks_per_request": k, "fan_out_answers_per_s": a["ok_rps"] * k, "separate_answers_per_s": b["ok_rps"],
            "speedup": a["ok_rps"] * k / b["ok_rps"] if b["ok_rps"] else 0.0}


def replica_kill(ctx: Ctx, tasks: list[str], png: bytes, kill, seconds: float, in_flight: int = 16) -> dict:
    """One replica killed 1 s into ``seconds`` of load over ``tasks``: failed requests of them all."""
    f = ctx.file("kill", [ctx.req("/v1/predict", v1_body([png], [t])) for t in tasks])
    ctx.gen.submit(f, concurrency=in_flight, duration=seconds)
    time.sleep(1.0)
    victim = kill()
    res = ctx.gen.result()["total"]
    return {"killed": victim, "requests": res["requests"], "failed": sum(v for k, v in res["statuses"].items() if k != "200"),
            "in_flight_bound": in_flight, "statuses": res["statuses"]}
