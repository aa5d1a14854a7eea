"""One rank of a distributed fine-tuning run: `python -m torch.distributed.run ... -m secvec.launch_worker JOB_JSON`
(started by `secvec.launch.launch_finetune`)."""

from __future__ import annotations

import sys

from secvec.launch import worker_main

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m secvec.launch_worker JOB_JSON")
    worker_main(sys.argv[1])
