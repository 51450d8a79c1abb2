"""Gossip at scale: convergence after a partition heals, a restarted node's catch-up, idle cost.

Runs real daemons (CRDT, liveness, peer links) on the simulated network under trio's
MockClock, so the *virtual* times are protocol time (link latency, ticks, digest intervals),
independent of this machine's speed; the CPU seconds this process spent are reported beside
them, because they are the real cost of encoding, sending and merging.

    python bench/gossip_convergence.py                 # 100,000 presences over 5 replicas
    python bench/gossip_convergence.py --presences 20000 --latency 0.05

Scenario:
 1. 5 daemons, full mesh, one-way link latency L; each writes P/5 presences (rooms of 100).
 2. Wait until every daemon holds every presence (initial fill).
 3. Idle: bytes per second on all links with everything in sync, at P and at P/100 presences
    (the idle cost must not grow with the number of presences).
 4. Partition {a, b} | {c, d, e} for longer than down_after; during it each side updates 10%
    of its own presences and removes 1%.
 5. Heal; measure time and bytes until every daemon's visible state is identical.
 6. Crash c, restart it (new incarnation): time and bytes until it holds everything again.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from presenced.testing.cluster import Cluster
from presenced.testing.simnet import SimNetwork

NAMES = ["a", "b", "c", "d", "e"]


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fill(cluster: Cluster, name: str, count: int) -> None:
    """Write ``count`` local presences on daemon ``name`` straight into its CRDT."""
    node = cluster.node(name)
    for i in range(count):
        room = f"room-{i // 100}"
        node.state.put(room, f"{name}-user-{i}", f"{name}-s{i}", {"x": i, "y": i, "name": f"u{i}"})
    node._local([])  # mark local changes for gossip


def mutate(cluster: Cluster, name: str, count: int) -> None:
    node = cluster.node(name)
    for i in range(0, count, 10):
        node.state.put(f"room-{i // 100}", f"{name}-user-{i}", f"{name}-s{i}", {"x": -i})
    for i in range(5, count, 100):
        node.state.remove(f"room-{i // 100}", f"{name}-user-{i}", f"{name}-s{i}")
    node._local([])


def in_sync(cluster: Cluster, names: list[str]) -> bool:
    """Cheap check, polled: equal digests everywhere and every replica seen as up."""
    digests = [
        {r: c for r, c in cluster.node(n).state.digest().items() if c} for n in names
    ]  # a replica that never wrote anything (clock 0) has nothing to send
    if any(d != digests[0] for d in digests[1:]):
        return False
    return all(cluster.node(n).liveness.is_up(replica) for n in names for replica in digests[0])


def converged(cluster: Cluster, names: list[str], expected: int | None = None) -> bool:
    """The full check (run once, after in_sync): identical visible states."""
    states = [cluster.node(n).state.visible() for n in names]
    if expected is not None and len(states[0]) != expected:
        return False
    return all(s == states[0] for s in states[1:])


def digests(cluster: Cluster) -> str:
    """Each daemon's digest and the replicas it sees up: what a convergence failure shows."""
    parts = []
    for name in cluster.daemons:
        node = cluster.node(name)
        digest = sorted((str(replica), clock) for replica, clock in node.state.digest().items())
        up = [str(replica) for replica in node.liveness.table if node.liveness.is_up(replica)]
        parts.append(f"{name}: {digest} up={up}")
    return "; ".join(parts)


async def until_in_sync(cluster: Cluster, limit: float = 60.0, step: float = 0.05) -> float:
    """Virtual seconds until every daemon shows the same presences."""
    start = trio.current_time()
    while not in_sync(cluster, NAMES):
        if trio.current_time() - start > limit:
            raise TimeoutError(f"did not converge: {digests(cluster)}")
        await trio.sleep(step)
    return trio.current_time() - start


async def scenario(presences: int, latency: float) -> dict[str, object]:
    results: dict[str, object] = {"presences": presences, "replicas": 5, "latency_s": latency}
    async with trio.open_nursery() as nursery:
        net = SimNetwork(seed=7, latency=latency)
        cluster = Cluster(nursery, net, down_after_s=3.0, purge_after_s=60.0)
        for i, name in enumerate(NAMES):
            await cluster.start(name, peers=NAMES[:i])
        await trio.sleep(2)
        per = presences // len(NAMES)

        cpu0, net_bytes0 = cpu(), net.total_stats().bytes
        for name in NAMES:
            fill(cluster, name, per)
        fill_s = await until_in_sync(cluster)
        assert converged(cluster, NAMES, per * len(NAMES))
        results["initial_fill"] = {
            "virtual_s": round(fill_s, 3),
            "cpu_s": round(cpu() - cpu0, 2),
            "bytes": net.total_stats().bytes - net_bytes0,
        }

        await trio.sleep(5)
        net.reset_stats()
        await trio.sleep(10)
        results["idle_bytes_per_s"] = net.total_stats().bytes / 10

        net.partition(NAMES[:2], NAMES[2:])
        for name in NAMES:
            mutate(cluster, name, per)
        await trio.sleep(5)  # past down_after: each side now shows only its own users
        side = {k for k in cluster.node("a").state.visible()}
        results["partition_side_a_visible"] = len(side)
        net.reset_stats()
        cpu0 = cpu()
        net.heal()
        heal_s = await until_in_sync(cluster)
        cpu_heal = cpu() - cpu0
        assert converged(cluster, NAMES)
        results["heal"] = {
            "virtual_s": round(heal_s, 3),
            "cpu_s": round(cpu_heal, 2),
            "bytes": net.total_stats().bytes,
            "visible": len(cluster.node("a").state.visible()),
        }

        expected = len(cluster.node("a").state.visible()) - cluster.node("c").state.own.live_count()
        cluster.crash("c")
        await trio.sleep(5)
        net.reset_stats()
        cpu0 = cpu()
        await cluster.start("c", peers=["a", "b"])
        catch_s = await until_in_sync(cluster)
        got = len(cluster.node("c").state.visible())
        assert got == expected, (got, expected, len(cluster.node("a").state.visible()))
        results["restart_catch_up"] = {
            "virtual_s": round(catch_s, 3),
            "cpu_s": round(cpu() - cpu0, 2),
            "bytes": net.total_stats().bytes,
            "presences_received": expected,
        }
        nursery.cancel_scope.cancel()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presences", type=int, default=100_000)
    parser.add_argument("--latency", type=float, default=0.05, help="one-way link latency, s")
    args = parser.parse_args()
    started = time.perf_counter()
    big = trio.run(
        scenario, args.presences, args.latency, clock=trio.testing.MockClock(autojump_threshold=0)
    )
    small = trio.run(
        scenario,
        max(args.presences // 100, 100),
        args.latency,
        clock=trio.testing.MockClock(autojump_threshold=0),
    )
    report = {
        "large": big,
        "small_idle_bytes_per_s": small["idle_bytes_per_s"],
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
