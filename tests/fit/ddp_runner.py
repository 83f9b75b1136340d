"""One fit per process of a multi-process launch, for tests/fit/test_distributed.py.

``python ddp_runner.py SPEC.json`` in every rank (torchrun, or processes given RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT): SPEC names the cache (a directory, or "streams" for
the in-memory stand-in of stream_standin.py) or the audio ("data", end to end), dims, run directory and fit options. With
"kill_rank" / "kill_at_step", that rank SIGKILLs itself at that training step (counted
over the whole run), to show that the others stop with a message instead of hanging.
"""

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

spec = json.loads(open(sys.argv[1]).read())
if spec.get("kill_rank") == int(os.environ.get("RANK", "0")):
    from mrlcache import distributed

    share, steps = distributed.loss_share, [0]

    def dying_share(n, device):
        steps[0] += 1
        if steps[0] == spec["kill_at_step"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return share(n, device)

    distributed.loss_share = dying_share  # the loop calls it once per step on N ranks

from mrlcache.fit import fit, fit_end_to_end  # noqa: E402

if "data" in spec:  # end to end on audio
    fit_end_to_end(spec["data"], spec["dims"], spec["out"], resume=spec.get("resume", False), **spec["options"])
    sys.exit(0)
cache = spec["cache"]
if cache == "streams":
    from stream_standin import stream_cache

    cache = stream_cache(**spec.get("cache_args", {}))
fit(cache, spec["dims"], spec["out"], resume=spec.get("resume", False), **spec["options"])
