"""A usage writer for the exactly-once test, run as its own process and SIGKILLed at
random points. Delivery is at-least-once on purpose: the checkpoint it keeps lags one
batch behind what it committed, so every restart resends work that is already in."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

from ember_billing import BillingConfig, BillingService, Usage


def main(url: str, events_path: str, checkpoint_path: str) -> int:
    events = [json.loads(line) for line in Path(events_path).read_text().splitlines()]
    ckpt = Path(checkpoint_path)
    start = int(ckpt.read_text()) if ckpt.exists() else 0
    rng = random.Random(os.getpid())
    svc = BillingService(url, config=BillingConfig(migrate=False, pool_size=1))
    print("ready", flush=True)
    previous = start
    i = start
    while i < len(events):
        n = rng.choice([1, 1, 5, 50, 200, 400])
        batch = [
            (rid, Usage(prompt_tokens=p, completion_tokens=c, cached_tokens=k))
            for rid, p, c, k in events[i : i + n]
        ]
        if n == 1:
            svc.settle(*batch[0])
        else:
            svc.settle_many(batch)
        tmp = ckpt.with_suffix(".tmp")
        tmp.write_text(str(previous))
        os.replace(tmp, ckpt)
        print("committed", flush=True)  # lets the test kill it mid-run, not after it ended
        previous, i = i, i + n
    svc.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
