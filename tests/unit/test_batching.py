"""The micro-batcher's adaptive wait, on a stub predictor (the batching logic needs no model)."""
from __future__ import annotations

import asyncio

from lavis_ext.serve.batching import MicroBatcher


class EchoPredictor:
    """Answers each image with its own text; records the size of every batched call."""

    caption_prompt = "a photo of"

    def __init__(self):
        self.calls: list[int] = []

    def caption(self, images, prompt=None, decoding=None):
        self.calls.append(len(images))
        return [f"caption {image}" for image in images]


def test_a_lone_client_is_never_held_back_and_concurrent_clients_are_batched():
    predictor = EchoPredictor()

    async def drive():
        # a wait of a minute: were a lone client's request held for company, this test would take minutes
        batcher = MicroBatcher(predictor, max_batch=16, max_wait_ms=60_000)
        await batcher.start()
        try:
            alone = [await batcher.submit("caption", i, None, None) for i in range(5)]
            waited_alone = batcher.wait_for_company()
            batcher.max_wait = 0.2  # the burst below waits this long for company
            burst = await asyncio.gather(*(batcher.submit("caption", 100 + i, None, None) for i in range(12)))
            waits = [batcher.stats.waited]
            busy = batcher.wait_for_company()
            for i in range(3):  # the burst is over: the first lone request waits once, the next ones do not
                await batcher.submit("caption", 200 + i, None, None)
                waits.append(batcher.stats.waited)
            return alone, waited_alone, burst, busy, waits
        finally:
            await batcher.stop()

    alone, waited_alone, burst, waited_busy, waits = asyncio.run(drive())
    assert waits == [1, 2, 2, 2]
    assert alone == [f"caption {i}" for i in range(5)] and burst == [f"caption {100 + i}" for i in range(12)]
    assert waited_alone == 0.0  # each request found nobody else in flight
    assert predictor.calls[:5] == [1, 1, 1, 1, 1]
    assert predictor.calls[5:] == [12, 1, 1, 1]  # the concurrent requests shared one forward pass
    assert waited_busy == 0.2


def test_in_flight_count_returns_to_zero_after_failures_and_cancellations():
    class Fails(EchoPredictor):
        def caption(self, images, prompt=None, decoding=None):
            raise RuntimeError("injected")

    async def drive():
        batcher = MicroBatcher(Fails(), max_batch=4, max_wait_ms=10)
        await batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit("caption", i, None, None) for i in range(3)),
                                           return_exceptions=True)
            return results, batcher._in_flight
        finally:
            await batcher.stop()

    results, in_flight = asyncio.run(drive())
    assert all(isinstance(r, RuntimeError) for r in results)
    assert in_flight == 0


def test_wait_policy_waits_only_with_company_now_or_in_the_previous_batch():
    batcher = MicroBatcher(EchoPredictor(), max_wait_ms=5)
    assert batcher.wait_for_company(in_batch=1) == 0.0  # idle server: nothing else was ever in flight
    batcher._in_flight = 1
    assert batcher.wait_for_company(in_batch=1) == 0.0  # the batch's own job is the only one
    batcher._in_flight = 3
    assert batcher.wait_for_company(in_batch=1) == 0.005  # two more queued or running
    batcher._in_flight, batcher._last_batch = 1, 8
    assert batcher.wait_for_company(in_batch=1) == 0.005  # 8 clients answered together come back together
    batcher._last_batch = 1
    assert batcher.wait_for_company(in_batch=1) == 0.0


def test_a_batch_waits_for_requests_still_arriving_and_not_for_ones_that_failed():
    """Requests whose bodies are still being read (inside ``arriving``) join the batch even when they reach the queue
    after ``max_wait_ms``; one that fails before queueing its job stops counting at once."""
    predictor = EchoPredictor()

    async def request(batcher, i, reading_s, fail=False):
        with batcher.arriving():  # what the server's middleware does from a request's headers on
            await asyncio.sleep(reading_s)  # the body being read and checked
            if fail:
                raise ValueError("bad upload")
            return await batcher.submit("caption", i, None, None)

    async def wave(arrival_wait_ms, fail_last=False):
        predictor.calls.clear()
        batcher = MicroBatcher(predictor, max_batch=16, max_wait_ms=5, arrival_wait_ms=arrival_wait_ms)
        await batcher.start()
        try:
            # queued 40 ms apart, far beyond max_wait; a failing request that "reads" for a minute would hold the
            # batch for the whole arrival wait (a minute) were it still counted after failing
            tasks = [request(batcher, i, 0.04 * i) for i in range(4)]
            if fail_last:
                tasks.append(request(batcher, 99, 0.01, fail=True))
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)
            return results, list(predictor.calls), batcher._arriving
        finally:
            await batcher.stop()

    results, calls, arriving = asyncio.run(wave(arrival_wait_ms=60_000))
    assert results == [f"caption {i}" for i in range(4)] and calls == [4] and arriving == 0
    results, calls, arriving = asyncio.run(wave(arrival_wait_ms=60_000, fail_last=True))
    assert results[:4] == [f"caption {i}" for i in range(4)] and isinstance(results[4], ValueError)
    assert calls == [4] and arriving == 0
    _, calls, _ = asyncio.run(wave(arrival_wait_ms=0))  # no arrival wait: max_wait_ms alone cuts the wave
    assert sum(calls) == 4 and len(calls) > 1
