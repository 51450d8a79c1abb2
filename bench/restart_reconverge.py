"""How soon every client view is right again after a listening daemon restarts.

    python bench/restart_reconverge.py --seeds 30

Real daemons on the simulated network, in virtual time (trio's MockClock), so the figures are
protocol seconds and do not depend on this machine's load. A full mesh a, b, c where ``a`` only
listens (b and c dial it: the slow case, since a restarted listener can call nobody); one client
per daemon in one room. ``a`` crashes, stays down ``--down-s`` (long enough for every redial
backoff to reach its cap), restarts, and its user reconnects at once. Reported per seed and as
best / median / worst: the virtual seconds from ``a`` being ready (listening) until every
client sees exactly the three sessions, and the most dials b and c made together per second
during the outage.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from typing import Any

import trio
import trio.testing

from presenced.testing.cluster import Cluster, FakeClient
from presenced.testing.simnet import SimNetwork


def _agree(clients: list[FakeClient], room: str) -> bool:
    expected = {(client.user, client.session) for client in clients}
    return all(set(client.sees(room)) == expected for client in clients)


async def one_seed(seed: int, down_s: float) -> dict[str, float]:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, SimNetwork(seed=seed, latency=0.03, jitter=0.01))
        await cluster.start("a")
        await cluster.start("b", peers=["a"])
        await cluster.start("c", peers=["a", "b"])
        await cluster.settle(3)
        clients = {name: cluster.client(name, f"u-{name}") for name in "abc"}
        for client in clients.values():
            client.join("r")
        await cluster.settle(1)
        dials: list[float] = []
        for name in "bc":
            peers = cluster.node(name).gossip
            assert peers is not None
            transport: Any = peers.transport
            dial = transport.dial

            async def counted(url: str, dial: Any = dial) -> Any:
                dials.append(trio.current_time())
                return await dial(url)

            transport.dial = counted
        cluster.crash("a")
        await trio.sleep(down_s)
        outage_dials = len(dials)
        await cluster.start("a")
        ready = trio.current_time()
        clients["a"] = cluster.client("a", "u-a")
        clients["a"].join("r")
        while not _agree(list(clients.values()), "r"):
            if trio.current_time() - ready > 60:
                break
            await trio.sleep(0.005)
        took = trio.current_time() - ready
        nursery.cancel_scope.cancel()
    return {"seed": seed, "reconverged_s": round(took, 3), "dials_per_s": outage_dials / down_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--down-s", type=float, default=12.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    runs = [
        trio.run(one_seed, seed, args.down_s, clock=trio.testing.MockClock(autojump_threshold=0))
        for seed in range(1, args.seeds + 1)
    ]
    took = sorted(run["reconverged_s"] for run in runs)
    print(
        json.dumps(
            {
                "seeds": args.seeds,
                "reconverged_s": {
                    "best": took[0],
                    "median": round(statistics.median(took), 3),
                    "worst": took[-1],
                },
                "dials_per_s_of_b_and_c_together_during_outage_max": round(
                    max(r["dials_per_s"] for r in runs), 2
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
