"""The serving bench's HTTP load generator, in a process of its own (its CPU is then its own, and
measured: the report shows it was not the bottleneck).

Every request is prebuilt once as raw HTTP/1.1 bytes (request line, headers, body), so a request
costs one socket write and one response parse on one asyncio loop: no JSON, base64 or client
library work per request. Keep-alive connections, one per request in flight.

- closed loop: ``concurrency`` requests always in flight, for ``duration`` seconds after a
  ``warmup`` (or ``n`` requests in all, no warm-up);
- open loop: Poisson arrivals at ``rate`` requests/s for ``warmup + duration`` seconds.

Throughput counts the requests that complete inside the window; latencies are those of the
requests started inside it. ``ok_*`` figures count only the answers with status 200 (the admitted
requests under overload). ``retry_after`` counts, per status, the answers carrying ``Retry-After``.
``total`` covers every request of the run, warm-up and tail included. Status 0: the connection failed.

    python bench/load_gen.py --url http://127.0.0.1:8000 --requests reqs.pkl --concurrency 8 --duration 3
    python bench/load_gen.py --url http://127.0.0.1:8000 --serve   # a JSON spec a line in, a JSON result a line out

The requests file (``write_requests``): a pickle of a list of dicts ``{"path", "body": bytes,
"headers": {...}, "images": N}`` (``method`` defaults to POST), cycled in order.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import pickle
import random
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit


def write_requests(path: Path, requests: list[dict]) -> Path:
    path.write_bytes(pickle.dumps(requests))
    return path


def build(url: str, requests: list[dict]) -> list[tuple[bytes, int]]:
    """Each request as raw HTTP/1.1 bytes, with the number of images it carries."""
    host = urlsplit(url).netloc
    out = []
    for r in requests:
        body = r.get("body", b"")
        head = [f"{r.get('method', 'POST')} {r['path']} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}",
                *(f"{k}: {v}" for k, v in r.get("headers", {}).items())]
        out.append((("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body, int(r.get("images", 1))))
    return out


class Conn:
    """One keep-alive connection; reopened after the server closes it or an error."""

    def __init__(self, host: str, port: int):
        self.host, self.port, self.reader, self.writer = host, port, None, None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, raw: bytes) -> tuple[int, bool]:
        """(status, has Retry-After); (0, False) when the connection failed."""
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.write(raw)
            await self.writer.drain()
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(head[0].split(" ", 2)[1])
            headers = {}
            for line in head[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            if "content-length" in headers:
                await self.reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    await self.reader.readexactly(size + 2)
                await self.reader.readuntil(b"\r\n")  # the empty trailer
            else:  # no length: the body runs to the end of the connection
                await self.reader.read()
                self.close()
            if headers.get("connection", "").lower() == "close":
                self.close()
            return status, "retry-after" in headers
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
            self.close()
            return 0, False


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return 1e3 * values[min(len(values) - 1, max(0, round(q * len(values)) - 1))]


def summarize(records: list[tuple], w0: float, w1: float) -> dict:
    """Figures of the window [w0, w1] from (start, end, status, images, retry_after) records."""
    wall = max(w1 - w0, 1e-9)
    done = [r for r in records if w0 <= r[1] <= w1]
    started = [r for r in records if w0 <= r[0] < w1]
    ok_done = [r for r in done if r[2] == 200]
    lat = [r[1] - r[0] for r in started]
    ok_lat = [r[1] - r[0] for r in started if r[2] == 200]
    statuses = [r[2] for r in started]
    return {"requests": len(done), "ok": len(ok_done), "wall_s": round(wall, 4),
            "rps": len(done) / wall, "ok_rps": len(ok_done) / wall, "img_s": sum(r[3] for r in ok_done) / wall,
            "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99), "ok_p50_ms": _pct(ok_lat, 0.5),
            "ok_p99_ms": _pct(ok_lat, 0.99),
            "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "retry_after": {str(s): sum(1 for r in started if r[2] == s and r[4]) for s in sorted(set(statuses))}}


async def _closed(reqs, host, port, concurrency: int, duration: float | None, warmup: float, n: int | None,
                  wait_retry_after: float = 0.0):
    """``concurrency`` clients, each sending its next request when its last is answered; with
    ``wait_retry_after`` > 0, a client told 503 + Retry-After waits that long first (a client that
    honours the header; the server's value is 1 s), else it retries at once."""
    records, order = [], itertools.count()
    t0 = time.perf_counter()
    w0 = t0 + (warmup if n is None else 0.0)
    deadline = None if n is None and duration is None else (w0 + duration if n is None else None)

    async def worker():
        conn = Conn(host, port)
        while True:
            i = next(order)
            start = time.perf_counter()
            if (n is not None and i >= n) or (deadline is not None and start >= deadline):
                break
            raw, k = reqs[i % len(reqs)]
            status, ra = await conn.request(raw)
            records.append((start, time.perf_counter(), status, k, ra))
            if wait_retry_after and status == 503 and ra:
                await asyncio.sleep(wait_retry_after)
        conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records, w0, (deadline if deadline is not None else time.perf_counter())


async def _open(reqs, host, port, rate: float, duration: float, warmup: float, seed: int, max_conns: int = 512):
    """Poisson arrivals; latency from the scheduled arrival (no coordinated omission)."""
    rng, idle, records, tasks = random.Random(seed), [], [], []
    gate = asyncio.Semaphore(max_conns)

    async def one(i, scheduled):
        async with gate:
            conn = idle.pop() if idle else Conn(host, port)
            raw, k = reqs[i % len(reqs)]
            status, ra = await conn.request(raw)
            records.append((scheduled, time.perf_counter(), status, k, ra))
            idle.append(conn)

    t = t0 = time.perf_counter()
    deadline = t0 + warmup + duration
    for i in itertools.count():
        t += rng.expovariate(rate)
        if t >= deadline:
            break
        await asyncio.sleep(max(0.0, t - time.perf_counter()))
        tasks.append(asyncio.create_task(one(i, t)))
    await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    return records, t0 + warmup, deadline


_BUILT: dict = {}


def measure(url: str, spec: dict) -> dict:
    """One measurement: ``spec`` holds ``requests`` (a file of write_requests) and ``concurrency``
    with ``duration`` (+ ``warmup``) or ``n``, or ``rate`` with ``duration`` (+ ``warmup``, ``seed``)."""
    key = (spec["requests"], Path(spec["requests"]).stat().st_mtime_ns)
    if key not in _BUILT:
        _BUILT[key] = build(url, pickle.loads(Path(spec["requests"]).read_bytes()))
    reqs, u = _BUILT[key], urlsplit(url)
    host, port = u.hostname, u.port or 80
    warmup = float(spec.get("warmup", 0.0))
    if spec.get("rate"):
        coro = _open(reqs, host, port, float(spec["rate"]), float(spec["duration"]), warmup, int(spec.get("seed", 0)))
    else:
        coro = _closed(reqs, host, port, int(spec.get("concurrency", 1)), spec.get("duration"), warmup, spec.get("n"),
                       float(spec.get("wait_retry_after", 0.0)))
    cpu0, t0 = time.process_time(), time.perf_counter()
    records, w0, w1 = _run(coro)
    cpu, elapsed = time.process_time() - cpu0, time.perf_counter() - t0
    out = summarize(records, w0, w1)
    every = [r[2] for r in records]
    out["total"] = {"requests": len(records), "statuses": {str(s): every.count(s) for s in sorted(set(every))}}
    out.update({k: spec[k] for k in ("concurrency", "rate") if spec.get(k)})
    out.update(client_cpu_s=round(cpu, 3), elapsed_s=round(elapsed, 3), client_cpu_frac=round(cpu / elapsed, 3))
    return out


def _run(coro):
    try:
        import uvloop  # Ray Serve's own dependency: a cheaper event loop, when present
        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


class LoadGen:
    """The generator's process for a whole bench, driven from the bench process: ``run(file, **spec)``
    waits for the result; ``submit`` + ``result`` let the bench act while the load runs."""

    def __init__(self, url: str):
        self.proc = subprocess.Popen([sys.executable, __file__, "--url", url, "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def submit(self, requests: Path, **spec) -> None:
        self.proc.stdin.write(json.dumps({"requests": str(requests), **spec}) + "\n")
        self.proc.stdin.flush()

    def result(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the load generator exited (code {self.proc.poll()}); see its stderr above")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"load generator: {out['error']}")
        return out

    def run(self, requests: Path, **spec) -> dict:
        self.submit(requests, **spec)
        return self.result()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000")
    ap.add_argument("--serve", action="store_true", help="read JSON specs from stdin, one a line")
    ap.add_argument("--requests", help="a file of write_requests")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--n", type=int, help="requests in all (closed loop, no warm-up)")
    ap.add_argument("--duration", type=float, help="seconds measured")
    ap.add_argument("--warmup", type=float, default=0.0, help="seconds run before the window")
    ap.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    ap.add_argument("--out", help="write the JSON result here too")
    args = ap.parse_args(argv)
    if args.serve:
        for line in sys.stdin:
            try:
                res = measure(args.url, json.loads(line))
            except Exception as e:  # noqa: BLE001 - reported to the bench, which raises it
                res = {"error": f"{type(e).__name__}: {e}"}
            print(json.dumps(res), flush=True)
        return 0
    if not args.requests or (args.n is None and args.duration is None):
        print("load_gen: give --requests and --n or --duration (or --serve)", file=sys.stderr)
        return 2
    spec = {k: v for k, v in vars(args).items() if k in ("requests", "concurrency", "n", "duration", "warmup", "rate")
            and v is not None}
    res = measure(args.url, spec)
    text = json.dumps(res, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
