"""The demo: a synthetic speaker corpus (:mod:`.synth`) and the whole pipeline on it (:mod:`.run`).

Nothing here imports the command line: ``mrlcache demo`` passes its command runner in.
"""

from mrlcache.demo.run import FULL, QUICK, DemoSize, demo_commands, run_demo

__all__ = ["FULL", "QUICK", "DemoSize", "demo_commands", "run_demo"]
