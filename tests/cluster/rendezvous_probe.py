"""A torchrun worker of tests/cluster/test_cluster_dns.py: it joins the gloo group that the
c10d rendezvous at index 0's DNS name formed, all-reduces its rank and prints what it saw (its
pod's log: a path of the test's would be rewritten under the pod's /tmp mount)."""

from __future__ import annotations

import json
import os
import socket
import sys

import torch
import torch.distributed as dist

PREFIX = "rendezvous-probe: "


def main() -> None:
    names = sys.argv[1:]
    dist.init_process_group("gloo")
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    record = {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "sum": total.item(),
        "host": socket.gethostname(),
        "index": os.environ["JOB_COMPLETION_INDEX"],
        "resolved": {name: socket.gethostbyname(name) for name in names},
    }
    print(PREFIX + json.dumps(record), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
