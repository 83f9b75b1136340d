"""Fingerprint of the demo pipeline's outputs, to show that a refactor changed nothing.

    mrlcache demo --quick --out DEMO && python tools/fingerprint.py DEMO > before.json
    (change the code) ... the same into after.json, then compare the two JSON files.

Records: the eer JSON (results.json), the SHA-256 of every shard file's bytes, manifest.tsv,
cache.json's settings (without the summary), history.jsonl without its timing fields, and
the SHA-256 of every tensor in model.pt. Session 3 used it for issue 10's reshape (see the
closing note): everything equal except the backbone record and checksums added on purpose.
"""
import hashlib, json, sys
from pathlib import Path
import torch

out = Path(sys.argv[1])
fp = {}
fp["results.json"] = json.loads((out / "results.json").read_text())
for cache in ("cache-train", "cache-test"):
    c = out / cache
    for p in sorted((c / "shards").rglob("*")):
        if p.is_file():
            fp[f"{cache}/{p.relative_to(c)}"] = hashlib.sha256(p.read_bytes()).hexdigest()
    fp[f"{cache}/manifest.tsv"] = hashlib.sha256((c / "manifest.tsv").read_bytes()).hexdigest()
    meta = json.loads((c / "cache.json").read_text())
    meta.pop("summary", None)
    fp[f"{cache}/cache.json-settings"] = meta
hist = []
for line in (out / "run" / "history.jsonl").read_text().splitlines():
    h = json.loads(line)
    h.pop("seconds", None); h.pop("samples_per_s", None)
    hist.append(h)
fp["history"] = hist
obj = torch.load(out / "run" / "model.pt", map_location="cpu", weights_only=True)
def walk(prefix, o):
    if isinstance(o, torch.Tensor):
        fp[prefix] = hashlib.sha256(o.contiguous().numpy().tobytes()).hexdigest()
    elif isinstance(o, dict):
        for k, v in o.items():
            walk(f"{prefix}.{k}", v)
walk("model", obj)
json.dump(fp, sys.stdout, indent=1, sort_keys=True, default=str)
