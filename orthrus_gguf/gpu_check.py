"""`make gpu-check`: everything a lent GPU machine should measure, in one call.

    python -m orthrus_gguf.gpu_check --out DIR [--quick] [--skip-tests]

1. builds the patched llama.cpp (CUDA for the local architecture when nvcc is there, else
   the CPU; only libllama and llama-quantize);
2. runs the tests that mean something on the GPU (the C API, the kept graphs) with every
   layer offloaded (ORTHRUS_TEST_GPU_LAYERS=-1);
3. measures the cost table (draft(w), verify(w), alternating pair vs back to back, w in 1..32,
   one one-token forward as the unit) with kept graphs and without (upstream's single graph),
   on orthrus-tiny f16 and on random Qwen3-1.7B- and 8B-shaped q4_k_m GGUFs;
4. runs the demo (AR against Orthrus B=32 and auto on held-out code and math prompts);
5. writes DIR/gpu_check.json (every figure, the targets and whether each was met),
   DIR/gpu_check.png and DIR/gpu_check.log.

The same script runs on a CPU (no nvcc): then it is the CPU path, tested in CI with --quick.
On the device machine, run it through `make gpu-check` with `.carry` carried (make gpu-carry).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the targets (GPU only): what a step must cost for Orthrus to pay
TARGETS = {"tiny_auto_speedup_min": 1.3, "1.7b_pair16_max": 2.5, "8b_pair16_max": 2.3}


class Log:
    def __init__(self, path: Path):
        self.f = open(path, "w")
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f} s] {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()


def detect_backend() -> str:
    return "cuda" if shutil.which("nvcc") and shutil.which("nvidia-smi") else "cpu"


def cuda_arch() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        return out[0].replace(".", "") if out else "native"
    except (OSError, subprocess.SubprocessError):
        return "native"


def build_step(backend: str, log: Log) -> Path:
    from . import build
    if backend == "cuda":
        os.environ.setdefault("ORTHRUS_GGUF_CMAKE_ARGS", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch()}")
        os.environ.setdefault("ORTHRUS_GGUF_TARGETS", "llama llama-quantize")
    src = ROOT / ".carry" / "llama.cpp-src.tar.gz"
    if src.is_file():
        os.environ.setdefault("ORTHRUS_GGUF_LLAMA_SRC", str(src))
    t0 = time.monotonic()
    d = build.build(backend, jobs=os.cpu_count() or 2, progress=True)
    log(f"build {backend}: {time.monotonic() - t0:.0f} s, {d}")
    os.environ["ORTHRUS_GGUF_LIB_DIR"] = str(d)  # the tests' subprocesses load the same build
    return d


def test_step(ngl: int, log: Log) -> dict:
    env = dict(os.environ, ORTHRUS_TEST_GPU_LAYERS=str(ngl))
    # the exact-prefill test is about the CPU kernels; the rest run as they are
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           "tests/test_native.py", "tests/test_graphs.py", "-k", "not exact_mode"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
    for line in tail:
        log("  " + line)
    log(f"tests: exit {r.returncode} in {time.monotonic() - t0:.0f} s")
    return {"returncode": r.returncode, "tail": tail}


def cost_step(models: dict[str, Path], ngl: int, widths, rounds: int, log: Log) -> dict:
    from .bench import cost_table, format_costs
    from .native import NativeModel
    out = {}
    for name, path in models.items():
        out[name] = {}
        for slots in (16, 0):
            with NativeModel(path, n_ctx=1024, n_batch=512, n_gpu_layers=ngl) as nm:
                nm.set_graph_slots(slots)
                t0 = time.monotonic()
                tab = cost_table(nm, [w for w in widths if w <= nm.block_size], rounds=rounds)
            key = "kept_graphs" if slots else "single_graph"
            out[name][key] = tab
            log(f"costs {name}, {key} ({time.monotonic() - t0:.0f} s):\n{format_costs(tab)}")
    return out


def pair(tab: dict, w: int) -> float | None:
    row = next((r for r in tab["rows"] if r["width"] == w), None)
    return row["pair_alternating"] if row else None


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    costs = report.get("costs", {})
    fig, axes = plt.subplots(1, max(1, len(costs)) + 1, figsize=(5 * (len(costs) + 1), 4))
    for ax, (name, tabs) in zip(axes, costs.items()):
        for key, style in (("kept_graphs", "-"), ("single_graph", "--")):
            rows = tabs[key]["rows"]
            w = [r["width"] for r in rows]
            ax.plot(w, [r["pair_alternating"] for r in rows], style, marker=".", label=f"draft+verify, {key}")
            ax.plot(w, [r["verify"] for r in rows], style, alpha=0.5, label=f"verify, {key}")
        ax.set(title=name, xlabel="width w", ylabel="one-token forwards", ylim=(0, None))
        ax.legend(fontsize=7)
    ax = axes[-1]
    labels, vals = [], []
    for ot, rep in report.get("demo", {}).items():
        for group, g in rep["groups"].items():
            for b, o in g["orthrus"].items():
                labels.append(f"{ot}\n{group}\nB={b}")
                vals.append(o["speedup"])
    ax.bar(range(len(vals)), vals, color="#2a7")
    ax.axhline(1.0, color="#888", linestyle=":")
    ax.set_xticks(range(len(vals)), labels, fontsize=6)
    ax.set(title=f"orthrus-tiny, {report['backend']}: speed × AR", ylabel="× AR")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "out/gpu-check")
    ap.add_argument("--backend", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--quick", action="store_true", help="small sizes: the CPU path's test")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    backend = detect_backend() if args.backend == "auto" else args.backend
    ngl = -1 if backend == "cuda" else 0
    report = {"backend": backend, "host": platform.node(), "cpus": os.cpu_count(), "quick": args.quick,
              "targets": TARGETS, "met": {}}
    if backend == "cuda":
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        report["gpu"] = smi.stdout.strip()
        log(f"gpu: {report['gpu']}")
    try:
        build_step(backend, log)
        if not args.skip_tests:
            report["tests"] = test_step(ngl, log)
        from .demo import converted, embedded_model, run_demo
        from .testing import write_random_gguf
        models = {"orthrus-tiny f16": converted(embedded_model(), "f16")}
        widths = (1, 2, 4, 8) if args.quick else tuple(range(1, 33))
        if not args.quick:
            work = Path(os.environ.get("ORTHRUS_GPU_CHECK_DIR") or Path(tempfile.gettempdir()) / "orthrus-gpu-check")
            work.mkdir(parents=True, exist_ok=True)
            for shape in ("1.7b", "8b"):
                t0 = time.monotonic()
                p = work / f"random-{shape}-q4_k_m.gguf"
                if not p.is_file():
                    write_random_gguf(p, shape)
                models[f"random {shape} q4_k_m"] = p
                log(f"wrote {p.name} in {time.monotonic() - t0:.0f} s")
        report["costs"] = cost_step(models, ngl, widths, rounds=2 if args.quick else 3, log=log)
        for name, key in (("random 1.7b q4_k_m", "1.7b_pair16_max"), ("random 8b q4_k_m", "8b_pair16_max")):
            if name in report["costs"]:
                v = pair(report["costs"][name]["kept_graphs"], 16)
                report["met"][key] = {"value": v, "met": v is not None and v <= TARGETS[key]}
        log("demo …")
        demo = run_demo(("f16",) if args.quick else ("f16", "q4_k_m"), 16 if args.quick else 96,
                        n_gpu_layers=ngl, max_prompts=2 if args.quick else None)
        report["demo"] = demo
        speed = [o["speedup"] for g in demo["f16"]["groups"].values() for b, o in g["orthrus"].items() if b == "auto"]
        report["met"]["tiny_auto_speedup_min"] = {"value": min(speed), "met": min(speed) >= TARGETS["tiny_auto_speedup_min"]}
        if backend != "cuda":
            report["met"] = {k: dict(v, note="CPU run: the targets are for the GPU") for k, v in report["met"].items()}
    finally:
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        if "costs" in report:
            plot(report, out / "gpu_check.png")
        log(f"wrote {out / 'gpu_check.json'}")
    for k, v in report["met"].items():
        log(f"target {k}: {v['value']} -> {'met' if v['met'] else 'NOT met'}")
    return 0 if report.get("tests", {}).get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
