"""The `orthrus-gguf` command line: each command calls one library function."""
from __future__ import annotations

import sys

import click

from .errors import OrthrusError


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OrthrusError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=Group)
@click.version_option(package_name="orthrus-gguf")
def main():
    """Lossless Orthrus self-speculative decoding for Qwen3 GGUFs on llama.cpp."""


@main.command()
@click.argument("model")
@click.option("-o", "--outfile", "--out", "out", type=click.Path(dir_okay=False),
              help="output GGUF (default: NAME-OUTTYPE.gguf, NAME the hub repo's or directory's name)")
@click.option("--outtype", default="f16", show_default=True,
              help="f32, f16, bf16, q8_0, auto (the checkpoint's float type), or a llama-quantize "
                   "type (q4_k_m, q5_k_m, q6_k, q4_0, …)")
@click.option("--revision", default=None, help="hub ids: a branch, tag or commit (default: main)")
@click.option("--token", default=None, help="hub ids: a Hugging Face token (default: the logged-in one / HF_TOKEN)")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="hub ids: the download cache (default: huggingface_hub's)")
@click.option("--force", is_flag=True, help="overwrite OUT if it exists")
def convert(model, out, outtype, revision, token, cache_dir, force):
    """Convert an Orthrus-Qwen3 checkpoint (local directory or hub id) to GGUF."""
    from .convert import convert
    path = convert(model, out, outtype.lower(), force=force, revision=revision, token=token,
                   cache_dir=cache_dir)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("gguf_file", type=click.Path())
def info(gguf_file):
    """Show a GGUF's architecture, dimensions, block size, mask id and tensor types."""
    from .convert.info import format_info, gguf_info
    click.echo(format_info(gguf_info(gguf_file)))


@main.command()
@click.option("--cuda", "backend", flag_value="cuda", help="build with CUDA")
@click.option("--metal", "backend", flag_value="metal", help="build with Metal")
@click.option("--vulkan", "backend", flag_value="vulkan", help="build with Vulkan")
@click.option("--cpu", "backend", flag_value="cpu", default=True, help="CPU only (default)")
@click.option("--jobs", "-j", type=int, default=None, help="parallel compile jobs (default: all cores)")
@click.option("--force", is_flag=True, help="rebuild even if the cache has this build")
def build(backend, jobs, force):
    """Build the patched llama.cpp (libllama, llama-server, llama-quantize) into the user cache."""
    from .build import build as run_build
    from .native import link_llama_cpp_lib
    path = run_build(backend or "cpu", jobs=jobs, force=force)
    link_llama_cpp_lib(path)  # `import llama_cpp` alone then loads the patched build too
    click.echo(str(path))


def block_option(value):
    if value is None or value == "auto":
        return value
    if not value.isdigit():
        raise click.BadParameter(f"expected an integer or 'auto', got {value!r}")
    return int(value)


MODEL_OPTIONS = [
    click.option("-m", "--model", required=True, type=click.Path(), help="GGUF file"),
    click.option("--n-ctx", default=4096, show_default=True, help="context length"),
    click.option("--threads", type=int, default=None, help="CPU threads (default: all cores, up to 8)"),
    click.option("--n-gpu-layers", "-ngl", default=0, show_default=True, help="layers to offload (-1: all)"),
]


def model_options(f):
    for opt in reversed(MODEL_OPTIONS):
        f = opt(f)
    return f


@main.command()
@model_options
@click.option("-p", "--prompt", required=True, help="prompt text (with --chat: the user message)")
@click.option("--chat", is_flag=True, help="wrap the prompt in the GGUF's chat template")
@click.option("--max-tokens", "-n", default=256, show_default=True)
@click.option("--temp", default=0.0, show_default=True, help="temperature (0: greedy, lossless)")
@click.option("--top-k", default=40, show_default=True, help="0: off")
@click.option("--top-p", default=0.95, show_default=True, help="1: off")
@click.option("--min-p", default=0.05, show_default=True, help="0: off")
@click.option("--repeat-penalty", default=1.0, show_default=True, help="1: off")
@click.option("--repeat-last-n", default=64, show_default=True, help="tokens the penalty looks back (-1: all)")
@click.option("--seed", type=int, default=None)
@click.option("--mode", type=click.Choice(["orthrus", "ar"]), default="orthrus", show_default=True)
@click.option("--block-size", default=None, help="draft block: an integer, or 'auto' (default: the GGUF's)")
@click.option("--stats", "show_stats", is_flag=True, help="print decoding statistics at the end")
def generate(model, n_ctx, threads, n_gpu_layers, prompt, chat, max_tokens, temp, top_k, top_p, min_p,
             repeat_penalty, repeat_last_n, seed, mode, block_size, show_stats):
    """Stream a completion to stdout (llama.cpp's sampler chain and defaults)."""
    import json

    from .api import Orthrus
    from .decode import Stats
    with Orthrus(model, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=n_gpu_layers) as m:
        if chat:
            prompt = m.apply_chat_template([{"role": "user", "content": prompt}])
        stats = Stats(mode)
        for piece in m.steps(prompt, max_tokens, temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                             repeat_penalty=repeat_penalty, penalty_last_n=repeat_last_n, seed=seed,
                             mode=mode, block_size=block_option(block_size)):
            click.echo(piece.text, nl=False)
            stats.add(piece.step)
        click.echo()
        if show_stats:
            click.echo(json.dumps(stats.summary(), indent=2), err=True)


@main.command()
@model_options
@click.option("--prompts", type=click.Path(), default=None,
              help="JSON list of prompts, or an object of named lists")
@click.option("--max-tokens", "-n", default=128, show_default=True)
@click.option("--block-size", "block_sizes", multiple=True, default=None,
              help="block sizes to compare (repeatable; integers or 'auto'; default: the GGUF's and auto)")
@click.option("--chat", is_flag=True, help="wrap each prompt in the chat template")
@click.option("--json", "json_out", type=click.Path(), default=None, help="also write the report as JSON")
@click.option("--plot", type=click.Path(), default=None,
              help="write a PNG of acceptance and speed (with --costs also PLOT-costs.png)")
@click.option("--costs", is_flag=True,
              help="also the forward cost table by width (draft, verify, alternating vs back to back) and prefill speed")
@click.option("--graph-slots", type=click.IntRange(0, 256), default=None,
              help="kinds of batch with a kept graph (default 16; 0: llama.cpp's single graph)")
@click.option("--prefix-cache", is_flag=True,
              help="instead: how often a call on a reused prefix equals a fresh call, per exact mode")
def bench(model, n_ctx, threads, n_gpu_layers, prompts, max_tokens, block_sizes, chat, json_out, plot, costs,
          graph_slots, prefix_cache):
    """AR against Orthrus on the same prompts, in one process: speed, acceptance, identity."""
    import json
    from pathlib import Path

    from .bench import (format_costs, format_report, load_prompts, plot_costs, plot_report,
                        prefix_cache_parity, run_bench)
    if prefix_cache:
        rep = prefix_cache_parity(model, load_prompts(prompts), max_tokens, n_ctx, threads, n_gpu_layers,
                                  progress=lambda msg: click.echo(msg, err=True))
        for exact, same in rep["identical"].items():
            click.echo(f"exact={exact}: cached call = fresh call on {same} prompts")
        if json_out:
            with open(json_out, "w") as f:
                json.dump(rep, f, indent=2)
        return
    blocks = [block_option(b) for b in block_sizes] if block_sizes else [None, "auto"]
    rep = run_bench(model, load_prompts(prompts), max_tokens, blocks, n_ctx, threads, n_gpu_layers, chat,
                    costs=costs, graph_slots=graph_slots, progress=lambda msg: click.echo(msg, err=True))
    if "costs" in rep:
        click.echo(format_costs(rep["costs"]))
        pf = rep["prefill"]
        click.echo(f"prefill of {pf['tokens']} tokens: {pf['fast_tokens_per_second']:.0f} tok/s fast kernels, "
                   f"{pf['exact_tokens_per_second']:.0f} tok/s exact mode ({pf['exact_over_fast']:.3f}x), "
                   f"{pf['reference_kernels_tokens_per_second']:.0f} tok/s on the batch-invariant kernels\n")
    click.echo(format_report(rep))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rep, f, indent=2)
    if plot:
        click.echo(f"plot: {plot_report(rep, plot)}")
        if "costs" in rep:
            p = Path(plot)
            click.echo(f"plot: {plot_costs(rep['costs'], p.with_name(p.stem + '-costs' + p.suffix))}")


@main.command("bench-server", context_settings={"ignore_unknown_options": True})
@click.option("-m", "--model", required=True, type=click.Path(), help="GGUF file")
@click.option("--prompts", type=click.Path(), default=None,
              help="JSON list of prompts, or an object of named lists")
@click.option("--max-tokens", "-n", default=128, show_default=True)
@click.option("--temp", default=0.0, show_default=True, help="temperature of every request")
@click.option("--setting", "settings", multiple=True, default=("off", "speculative", "match"), show_default=True,
              type=click.Choice(["off", "speculative", "match", "auto"]),
              help="servers to compare (repeatable); 'off' is always run, as the baseline")
@click.option("--draft-max", default=None, help="drafts per step of the drafting servers (default: block size - 1)")
@click.option("--json", "json_out", type=click.Path(), default=None, help="also write the report as JSON")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def bench_server(model, prompts, max_tokens, temp, settings, draft_max, json_out, extra):
    """llama-server with drafting off against Orthrus drafting: speed, acceptance, identity.
    llama-server flags go after -- (e.g. -- -t 4 -ngl 99)."""
    import json
    import os

    from .bench import load_prompts
    from .serve_bench import format_server_report, run_server_bench
    if not os.path.isfile(model):
        raise OrthrusError(f"{model}: no such file")
    rep = run_server_bench(model, load_prompts(prompts), max_tokens, temp, settings,
                           block_option(draft_max), extra, progress=click.echo)
    click.echo(format_server_report(rep))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rep, f, indent=2)


@main.command()
@click.option("--outtype", "outtypes", multiple=True, default=("f16", "q4_k_m"), show_default=True)
@click.option("--max-tokens", "-n", default=96, show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--n-gpu-layers", "-ngl", default=0, show_default=True)
@click.option("--json", "json_out", type=click.Path(), default=None)
def demo(outtypes, max_tokens, threads, n_gpu_layers, json_out):
    """Convert the embedded orthrus-tiny and race AR against Orthrus on held-out prompts."""
    from .demo import run_demo
    run_demo(outtypes, max_tokens, n_threads=threads, n_gpu_layers=n_gpu_layers, json_out=json_out)


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("-m", "--model", required=True, type=click.Path(), help="GGUF file")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True)
@click.option("--draft-max", default=None, help="drafts per step: an integer, or 'auto' (default: block size - 1)")
@click.option("-np", "--parallel", "n_parallel", default=1, show_default=True, help="server slots")
@click.option("--rule", type=click.Choice(["speculative", "match"]), default="speculative", show_default=True,
              help="temperature > 0: speculative sampling against the draft, or token matching")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def serve(model, host, port, draft_max, n_parallel, rule, extra):
    """Run llama-server with Orthrus drafting; llama-server flags go after --."""
    from .serve import serve as run_serve
    sys.exit(run_serve(model, host, port, block_option(draft_max), n_parallel, extra, echo=click.echo,
                       rule=rule))


if __name__ == "__main__":
    main()
