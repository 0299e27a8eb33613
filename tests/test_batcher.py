"""serving.Batcher: continuous batching in rows, on one event loop (no Ray)."""

import asyncio

from petl_platform.serving import Batcher


def test_requests_that_arrive_while_a_batch_runs_form_the_next_batch_whole():
    """The case @serve.batch (Ray 2.60) gets wrong: a steady stream while the engine is busy."""
    seen = []

    async def run_batch(items):
        seen.append(list(items))
        await asyncio.sleep(0.05)  # the engine
        return [i * 10 for i in items]

    async def main():
        b = Batcher(run_batch, max_rows=32, wait_s=0.001)

        async def client(i):
            await asyncio.sleep(0.002 * i)  # one arrival every 2 ms, 30 in all
            return await b.submit(i)

        return await asyncio.gather(*(client(i) for i in range(30)))

    assert asyncio.run(main()) == [i * 10 for i in range(30)]
    assert sum(map(len, seen)) == 30 and len(seen) <= 4, [len(s) for s in seen]
    assert max(map(len, seen)) >= 20  # what arrived during the first 50 ms ran together


def test_rows_bound_a_batch_a_large_request_runs_alone_and_order_is_kept():
    seen = []

    async def run_batch(items):
        seen.append([name for name, _ in items])
        return [name for name, _ in items]

    async def main():
        b = Batcher(run_batch, max_rows=8, wait_s=0.05)
        jobs = [("a", 3), ("b", 4), ("c", 2), ("big", 20), ("d", 1)]
        return await asyncio.gather(*(b.submit(j, rows) for j, rows in ((j, j[1]) for j in jobs)))

    assert asyncio.run(main()) == ["a", "b", "c", "big", "d"]
    assert seen == [["a", "b"], ["c"], ["big"], ["d"]]  # 3 + 4 <= 8 < 3 + 4 + 2; 20 alone


def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_still_runs():
    calls = []

    async def run_batch(items):
        calls.append(items)
        if "bad" in items:
            raise ValueError("engine refused")
        return items

    async def main():
        b = Batcher(run_batch, max_rows=4, wait_s=0.01)
        got = await asyncio.gather(b.submit("x"), b.submit("bad"), return_exceptions=True)
        after = await b.submit("y")
        return got, after

    got, after = asyncio.run(main())
    assert all(isinstance(g, ValueError) for g in got) and after == "y"


def test_a_lone_request_waits_at_most_wait_s():
    async def run_batch(items):
        return items

    async def main():
        b = Batcher(run_batch, max_rows=32, wait_s=0.02)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await b.submit("only")
        return loop.time() - t0

    assert asyncio.run(main()) < 0.5
