"""The auto policy's probe gate, A/B in one run (docs/measurements/policy_probe_ab_cpu_2core.json).

    .venv/bin/python docs/measurements/policy_probe_ab.py [f16|q4_k_m ...] > out.json

For each held-out prompt of orthrus-tiny, in turn: plain AR; `auto` as it is
(AutoPolicy.probe_helps skips a probe that could not change the choice); and `auto` with
that gate forced open (a probe after 16, 32, ... 512 AR steps, as before the gate). Each
mode keeps one policy over all the prompts, as an Orthrus object does; 96 tokens each, the
CPU's default exact mode. Reports decode tokens/s, its ratio to AR and tokens per step.
"""
import json
import sys

from orthrus_gguf.api import Orthrus
from orthrus_gguf.demo import converted, embedded_model
from orthrus_gguf.policy import AutoPolicy

MODES = ("ar", "auto", "auto_ungated")


def main(outtypes):
    prompts = json.loads((embedded_model() / "heldout_prompts.json").read_text())
    report = {}
    for ot in outtypes:
        with Orthrus(converted(embedded_model(), ot), n_ctx=2048) as m:
            costs = m.calibrate()
            policies = {"auto": AutoPolicy(m.native.block_size, *costs),
                        "auto_ungated": AutoPolicy(m.native.block_size, *costs)}
            policies["auto_ungated"].probe_helps = lambda: True

            def run(mode, text):
                m.reset()
                if mode == "ar":
                    return m.generate(text, max_tokens=96, mode="ar").stats
                m._auto = policies[mode]  # the policy the next block_size="auto" call uses
                return m.generate(text, max_tokens=96, block_size="auto").stats

            for mode in MODES:  # warm-up
                run(mode, "def f(x):")
            rep = {"pays": policies["auto"].pays, "probe_helps": AutoPolicy.probe_helps(policies["auto"]),
                   "cost_ms": {k: {w: c * 1e3 for w, c in d.items()} for k, d in zip(("draft", "verify"), costs)},
                   "groups": {}}
            for group, texts in prompts.items():
                tot = {k: {"tokens": 0, "seconds": 0.0, "steps": 0} for k in MODES}
                for text in texts:
                    for mode in MODES:
                        s = run(mode, text)
                        tot[mode]["tokens"] += s["tokens"] - 1
                        tot[mode]["seconds"] += s["time_draft_s"] + s["time_verify_s"] + s["time_python_s"]
                        tot[mode]["steps"] += s["steps"]
                ar = tot["ar"]["tokens"] / tot["ar"]["seconds"]
                rep["groups"][group] = {k: {"tokens_per_second": v["tokens"] / v["seconds"],
                                            "x_ar": v["tokens"] / v["seconds"] / ar,
                                            "tokens_per_step": v["tokens"] / v["steps"]} for k, v in tot.items()}
            report[ot] = rep
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:] or ["f16", "q4_k_m"])
