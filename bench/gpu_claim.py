"""``--device cuda:claim`` on a real GPU host: every engine process gets a GPU of its own, and no more
engines than GPUs start.

Starts one process per visible GPU plus one. Each claims a GPU the way ``hotlora engine --device
cuda:claim`` does (``engine.kafka.device_claim.claim_visible_gpu``), then puts a tensor on ``cuda`` and reports
the physical GPU it landed on (PCI bus id) while it holds the claim. Expected: the first N processes
report N different GPUs, and the last fails with "every visible GPU ... is claimed". After they exit,
a new claim succeeds again (the kernel dropped the locks).

On a machine without CUDA it says so and exits 0 (the lock logic itself is tested on CPU in
``tests/test_scale_out.py``).

    python bench/gpu_claim.py --out out/gpu_claim.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD = """
import json, sys, time
from pathlib import Path
from hotlora.engine.kafka.device_claim import claim_visible_gpu
try:
    claim = claim_visible_gpu(Path(sys.argv[1]))
except RuntimeError as err:
    print(json.dumps({"claimed": None, "error": str(err)}), flush=True)
    sys.exit(0)
import torch
x = torch.ones(1, device="cuda")
bus = getattr(torch.cuda.get_device_properties(0), "pci_bus_id", None)
report = {"claimed": claim.gpu_id, "visible": torch.cuda.device_count(), "bus": bus, "sum": x.sum().item()}
print(json.dumps(report), flush=True)
time.sleep(float(sys.argv[2]))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/gpu_claim.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        reason = f"no CUDA (torch {torch.__version__} sees no GPU); the claim logic is tested on CPU"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"skipped": reason}))
        print(f"skipped: {reason}")
        return 0
    gpus = torch.cuda.device_count()
    with tempfile.TemporaryDirectory(prefix="hotlora-claim-") as locks:
        children: list[subprocess.Popen[str]] = []
        reports = []
        try:
            for _ in range(gpus + 1):
                # Each claimant reports only once it holds its GPU, and holds it until killed below, so
                # the claims happen in a known order and all overlap: the last one finds every GPU taken.
                child = subprocess.Popen([sys.executable, "-c", CHILD, locks, "600"], stdout=subprocess.PIPE, text=True)
                children.append(child)
                assert child.stdout is not None
                reports.append(json.loads(child.stdout.readline()))
        finally:
            for child in children:
                child.kill()
                child.wait()
        again = subprocess.run([sys.executable, "-c", CHILD, locks, "0"], capture_output=True, text=True, timeout=300)
    claimed = [r["claimed"] for r in reports[:gpus]]
    result = {
        "gpus": gpus,
        "reports": reports,
        "distinct_gpus": len(set(claimed)) == gpus and None not in claimed,
        "extra_refused": reports[-1]["claimed"] is None,
        "reclaimed_after_exit": json.loads(again.stdout.splitlines()[0])["claimed"] is not None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if result["distinct_gpus"] and result["extra_refused"] and result["reclaimed_after_exit"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
