"""bench/load_gen.py: the serving bench's load generator, in its own process, against a tiny HTTP
server of the test's own (keep-alive, chunked, Connection: close, 503 + Retry-After)."""

import asyncio
import importlib
import threading
from pathlib import Path

import pytest

from platform_stack import bench_module

BENCH = Path(__file__).resolve().parents[1] / "bench"
load_gen = bench_module("load_gen")


class Server:
    """HTTP/1.1 on 127.0.0.1: ``/ok`` 200 with a length, ``/chunked`` 200 chunked, ``/close`` 200 then
    closes, ``/busy`` 503 with Retry-After. Records each request's path, headers and body."""

    def __init__(self):
        self.seen, self.connections = [], 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _serve(self, ready):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _handle(self, reader, writer):
        self.connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                path = head[0].split(" ")[1]
                headers = dict(line.split(": ", 1) for line in head[1:] if line)
                body = await reader.readexactly(int(headers.get("Content-Length", 0)))
                self.seen.append((path, headers, body))
                await asyncio.sleep(0.002)
                if path == "/busy":
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 4\r\n\r\nbusy")
                elif path == "/chunked":
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
                elif path == "/close":
                    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
                    break
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    def stop(self):
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.stop()


def test_closed_loop_counts_every_request_once_over_keep_alive_connections(server, tmp_path):
    reqs = load_gen.write_requests(tmp_path / "r.pkl", [
        {"path": "/ok", "body": b"\x00\x01" * 100, "headers": {"Authorization": "Bearer k"}, "images": 16},
        {"path": "/chunked", "body": b"{}", "headers": {"Content-Type": "application/json"}, "images": 16},
        {"path": "/close", "body": b"", "images": 16}])
    gen = load_gen.LoadGen(f"http://127.0.0.1:{server.port}")
    try:
        res = gen.run(reqs, concurrency=3, n=30)
        timed = gen.run(reqs, concurrency=2, duration=0.3, warmup=0.1)
    finally:
        gen.close()
    assert gen.proc.returncode == 0
    assert res["requests"] == res["ok"] == 30 and res["statuses"] == {"200": 30}
    assert res["img_s"] == pytest.approx(16 * res["ok_rps"])
    assert res["client_cpu_s"] > 0 and 0 < res["client_cpu_frac"] <= 1.5
    paths = [p for p, _, _ in server.seen[:30]]
    assert paths.count("/ok") == paths.count("/chunked") == paths.count("/close") == 10
    ok = next((h, b) for p, h, b in server.seen if p == "/ok")
    assert ok == ({"Host": f"127.0.0.1:{server.port}", "Content-Length": "200", "Authorization": "Bearer k"},
                  b"\x00\x01" * 100)
    # 3 workers, each reconnects only after its /close answers: 3 + 10 connections for the first run
    assert 3 + 10 <= server.connections
    assert timed["requests"] > 0 and timed["wall_s"] == pytest.approx(0.3, abs=0.01)
    assert timed["total"]["requests"] > timed["requests"]  # the warm-up and the tail are outside the window
    assert timed["p50_ms"] <= timed["p99_ms"]


def test_open_loop_and_overload_figures(server, tmp_path):
    mixed = load_gen.write_requests(tmp_path / "m.pkl", [{"path": "/ok", "body": b"x"}, {"path": "/busy", "body": b"x"}])
    res = load_gen.measure(f"http://127.0.0.1:{server.port}", {"requests": str(mixed), "rate": 200, "duration": 0.5})
    assert res["rate"] == 200 and 50 <= res["total"]["requests"] <= 200  # Poisson: about 100 arrivals
    st, ra = res["statuses"], res["retry_after"]
    assert set(st) == {"200", "503"} and abs(st["200"] - st["503"]) <= 1
    assert ra["503"] == st["503"] and ra["200"] == 0
    assert res["ok"] <= res["requests"] and res["ok_p50_ms"] is not None


def test_a_dead_server_is_status_0_not_a_crash(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    reqs = load_gen.write_requests(tmp_path / "r.pkl", [{"path": "/ok", "body": b""}])
    res = load_gen.measure(f"http://127.0.0.1:{port}", {"requests": str(reqs), "concurrency": 2, "n": 4})
    assert res["statuses"] == {"0": 4} and res["ok"] == 0 and res["img_s"] == 0


def test_serve_bench_figures_end_to_end_against_a_stub_server(server, tmp_path, monkeypatch):
    """serve_load's measurement plan against the stub server (every request 200) and a stub in-process
    engine: every figure the report renders is there, OIP requests carry a real client's binary body."""
    pytest.importorskip("tritonclient.http")
    import argparse
    import json
    import sys

    monkeypatch.syspath_prepend(str(BENCH))
    serve_load, report = (importlib.import_module(m) for m in ("serve_load", "report"))
    import serve_figures
    from serve_inputs import images

    from petl_platform import create_backbone
    from petl_platform.backbones.factory import SHIPPED

    class Engine:  # the in-process side, stubbed: its figures are fixed
        threads = 1

        def u8_img_s(self, pixels, batch, seconds):
            return 400.0

        def png_img_s(self, pngs, batch, seconds):
            return 200.0

        def png_b1_ms(self, pngs, seconds):
            return 1.0

    monkeypatch.setattr(serve_load, "_kill_one_replica", lambda deployment: "replica-0")
    pngs, pixels = images(create_backbone(SHIPPED))
    args = argparse.Namespace(s1_levels=[1, 2], s2_levels=[1, 2], pair_repeats=1, kill_s=0.2)
    gen = load_gen.LoadGen(f"http://127.0.0.1:{server.port}")
    ctx = serve_figures.Ctx(gen, tmp_path, {"Authorization": "Bearer k"}, dur=0.05, warm=0.0, base_s=0.0, repeats=2)
    out = {"task": "lora-0", "tasks": 3}
    try:
        serve_load._measure(args, out, ctx, Engine(), "lora-0", pngs, pixels, ["lora-0", "lora-1", "lora-2"],
                            ["lin-0", "lin-1"])
    finally:
        gen.close()
    out["g1"] = {"skipped": "no GPU"}
    out["generator"] = {"max_cpu_frac": max(ctx.cpu)}
    assert out["s1"]["concurrency"] in (1, 2) and len(out["s1"]["rounds"]) == 2
    assert out["s4"]["concurrency"] == 4 * out["s2"]["concurrency"] and out["s4"]["retry_after_fraction"] is None
    assert out["p5_lora"]["tasks"] == 3 and out["p5"]["tasks"] == 2 and "p5_lora_multi" in out
    assert out["replica_kill"]["killed"] == "replica-0" and out["replica_kill"]["failed"] == 0

    oip = [(p, h, b) for p, h, b in server.seen if p == "/v2/models/lora-0/infer"]
    _, headers, body = oip[0]
    n = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:n])
    assert head["inputs"][0] == {"name": "pixels", "shape": [16, 32, 32, 3], "datatype": "UINT8",
                                 "parameters": {"binary_data_size": 16 * 32 * 32 * 3}}
    assert body[n:] == pixels.tobytes() and headers["Authorization"] == "Bearer k"
    knobs = [json.loads(b[:int(h["Inference-Header-Content-Length"])]).get("parameters") for p, h, b in server.seen
             if p == "/v2/models/digits-1k/infer"]
    assert {"threshold": 1.0} in knobs and {"budget": 0.5} in knobs
    v1 = json.loads(next(b for p, _, b in server.seen if p == "/v1/predict"))
    assert set(v1) == {"image", "tasks"}

    (tmp_path / "serve_load.json").write_text(json.dumps(out))
    ids = [f["id"] for f in report.figures(tmp_path)]
    for fid, count in (("S1", 1), ("S2", 1), ("S3", 1), ("S4", 2), ("G1", 1), ("P2 served", 2), ("P5 served", 3),
                       ("P8", 2), ("P1 served", 1), ("kill", 1)):
        assert ids.count(fid) == count, (fid, ids)
    del sys.modules["serve_load"], sys.modules["report"]
