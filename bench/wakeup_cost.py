"""CPU cost of one wake-up on this machine: in the kernel alone, and through trio.

A daemon's ticker wakes at every tick boundary, and used to wake again a millisecond or two
later for a near peer's batch. This measures what such a wake-up costs in thread CPU time
(user + system), doing no work, three ways:

* ``poll``: ``select.poll().poll(ms)`` on a descriptor that never turns readable (the
  ticker's wait for a near batch, ``PeerManager.wait_for_batches``);
* ``alarm``: the ticker's kernel-timer alarm awaited through trio's scheduler
  (``presenced.server.alarm``);
* ``trio.sleep``: a trio deadline (a cancel scope), what the alarm replaced.

    python bench/wakeup_cost.py --sleep-ms 12.5 --count 400

On a quiet machine the caches stay warm and every figure is small; with other processes
running in between (a benchmark), each is several times higher.
"""

from __future__ import annotations

import argparse
import os
import select
import time

import trio

from presenced.server.alarm import open_alarm


def kernel_poll(count: int, sleep: float) -> float:
    waiting = select.poll()
    read_end, write_end = os.pipe()
    waiting.register(read_end, select.POLLIN)
    try:
        started = time.thread_time()
        for _ in range(count):
            waiting.poll(sleep * 1000)
        return (time.thread_time() - started) / count
    finally:
        os.close(read_end)
        os.close(write_end)


async def trio_alarm(count: int, sleep: float) -> float:
    alarm = open_alarm(trio.current_time)
    try:
        started = time.thread_time()
        for _ in range(count):
            await alarm.sleep_until(trio.current_time() + sleep)
        return (time.thread_time() - started) / count
    finally:
        alarm.close()


async def trio_sleep(count: int, sleep: float) -> float:
    started = time.thread_time()
    for _ in range(count):
        await trio.sleep(sleep)
    return (time.thread_time() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sleep-ms", type=float, default=12.5, help="time asleep per wake-up")
    parser.add_argument("--count", type=int, default=400, help="wake-ups per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each kind")
    args = parser.parse_args()
    sleep = args.sleep_ms / 1000
    for round_ in range(1, args.rounds + 1):
        poll = kernel_poll(args.count, sleep)
        alarm = trio.run(trio_alarm, args.count, sleep)
        deadline = trio.run(trio_sleep, args.count, sleep)
        print(
            f"round {round_}: CPU per wake-up after {args.sleep_ms:g} ms asleep: "
            f"poll {poll * 1e6:.0f} us, alarm through trio {alarm * 1e6:.0f} us, "
            f"trio.sleep {deadline * 1e6:.0f} us"
        )


if __name__ == "__main__":
    main()
