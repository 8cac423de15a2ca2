"""The `orthrus-gguf` command line: each command calls one library function."""
from __future__ import annotations

import sys

import click

from . import native
from .errors import OrthrusError, raise_signal, utf8_text


class Group(click.Group):
    def invoke(self, ctx):
        import signal
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) is not signal.SIG_IGN:
                signal.signal(getattr(signal, name), raise_signal)
        try:
            return super().invoke(ctx)
        except OrthrusError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:
            import errno
            import os
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO) or e.filename is not None:
                raise
            # stdout (or stderr) cannot take the output: say so, and let nothing flush there again
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except OSError:
                pass
            click.echo(f"error: cannot write the output: {e.strerror}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", 2)  # Ctrl-C: SIGINT
            click.echo("interrupted" if signum == 2 else f"stopped by signal {signum}", err=True)
            sys.exit(128 + signum)


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
@click.option("--imatrix", type=click.Path(dir_okay=False), default=None,
              help="importance matrix for llama-quantize types (from llama-imatrix on the f16 GGUF); "
                   "required by iq1/iq2/iq3 types")
@click.option("--force", is_flag=True, help="overwrite OUT if it exists")
def convert(model, out, outtype, revision, token, cache_dir, imatrix, force):
    """Convert an Orthrus-Qwen3 checkpoint (local directory or hub id) to GGUF."""
    from .convert import convert
    path = convert(model, out, outtype.lower(), force=force, revision=revision, token=token,
                   cache_dir=cache_dir, imatrix=imatrix)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("gguf_file", type=click.Path())
def info(gguf_file):
    """Show a GGUF's architecture, dimensions, block size, mask id and tensor types."""
    from .convert.info import format_info, gguf_info
    click.echo(format_info(gguf_info(gguf_file)))


@main.command()
@click.option("--cuda", is_flag=True, help="build with CUDA")
@click.option("--metal", is_flag=True, help="build with Metal")
@click.option("--vulkan", is_flag=True, help="build with Vulkan")
@click.option("--cpu", is_flag=True, help="CPU only (the default)")
@click.option("--jobs", "-j", type=click.IntRange(1), default=None, help="parallel compile jobs (default: all cores)")
@click.option("--force", is_flag=True, help="rebuild even if the cache has this build")
def build(cuda, metal, vulkan, cpu, jobs, force):
    """Build the patched llama.cpp (libllama, llama-server, llama-quantize, llama-cli, llama-bench,
    llama-perplexity, llama-imatrix, ggml-rpc-server) into the user cache."""
    from .build import build as run_build
    from .native import link_llama_cpp_lib
    chosen = [name for name, on in (("cuda", cuda), ("metal", metal), ("vulkan", vulkan), ("cpu", cpu)) if on]
    if len(chosen) > 1:
        raise OrthrusError(f"one backend per build: got --{' --'.join(chosen)}; run `orthrus-gguf build` once per backend")
    backend = chosen[0] if chosen else "cpu"
    path = run_build(backend, jobs=jobs, force=force)
    link_llama_cpp_lib(path)  # `import llama_cpp` alone then loads the patched build too
    click.echo(str(path))


def int_or(value, words=("auto",), param_hint=None):
    """An option that is an integer or one of `words` (None passes through)."""
    if value is None or value in words:
        return value
    if not value.isdigit():
        *head, last = ("a non-negative integer", *(f"'{w}'" for w in words))
        raise click.BadParameter(f"expected {', '.join(head)} or {last}, got {value!r}", param_hint=param_hint)
    return int(value)


class GpuLayers(click.ParamType):
    """-ngl as llama.cpp reads it: an integer, "all" or "auto"."""
    name = "N|all|auto"

    def convert(self, value, param, ctx):
        from .native import gpu_layers_spec
        try:
            return gpu_layers_spec(value)
        except OrthrusError:
            self.fail(f"expected an integer >= -1, 'all' or 'auto', got {value!r}", param, ctx)


FLASH = {"on": True, "off": False, "auto": None}
KV_TYPES = click.Choice(list(native.KV_TYPES))

# llama.cpp's spellings (common/arg.cpp) first; this project's older long forms stay as aliases
MODEL_OPTIONS = [
    click.option("-m", "--model", required=True, type=click.Path(), help="GGUF file"),
    click.option("-c", "--ctx-size", "--n-ctx", "n_ctx", type=click.IntRange(1), default=4096,
                 show_default=True, help="context length"),
    click.option("-t", "--threads", type=click.IntRange(1), default=None,
                 help="CPU threads (default: the cores, at most 8)"),
    click.option("-ngl", "--gpu-layers", "--n-gpu-layers", "n_gpu_layers", type=GpuLayers(), default="auto",
                 show_default=True, help="layers to offload: N, 'all', or 'auto' (all if the build has a GPU)"),
    click.option("-fa", "--flash-attn", type=click.Choice(list(FLASH)), default="auto", show_default=True),
    click.option("-ctk", "--cache-type-k", type=KV_TYPES, default="f16", show_default=True, help="KV cache type of K"),
    click.option("-ctv", "--cache-type-v", type=KV_TYPES, default="f16", show_default=True, help="KV cache type of V"),
    click.option("-b", "--batch-size", type=click.IntRange(1), default=512, show_default=True, help="logical batch"),
    click.option("-ub", "--ubatch-size", type=click.IntRange(1), default=512, show_default=True,
                 help="physical batch (at least the GGUF's block size)"),
    click.option("-bs", "--backend-sampling/--no-backend-sampling", "backend_sampling", default=None,
                 help="greedy picks on the device of the output layer, so that no logits come back "
                      "(default: on when layers are offloaded and the vocabulary is large)"),
]


def model_options(f):
    for opt in reversed(MODEL_OPTIONS):
        f = opt(f)
    return f


def model_kwargs(kw: dict) -> dict:
    """Orthrus(...) arguments from MODEL_OPTIONS (popped from a command's keywords)."""
    return dict(n_ctx=kw.pop("n_ctx"), n_threads=kw.pop("threads"), n_gpu_layers=kw.pop("n_gpu_layers"),
                flash_attn=FLASH[kw.pop("flash_attn")], type_k=kw.pop("cache_type_k"),
                type_v=kw.pop("cache_type_v"), n_batch=kw.pop("batch_size"), n_ubatch=kw.pop("ubatch_size"),
                backend_sampling=kw.pop("backend_sampling"))


def _check_outputs(json_out=None, plot=None) -> None:
    """The report and plot paths, checked before a long run: writable, and a plot's suffix
    one matplotlib can write."""
    for path in (json_out, plot):
        if path is not None:
            _check_writable(path)
    if plot is not None:
        from pathlib import Path

        from matplotlib.backend_bases import FigureCanvasBase
        kinds = FigureCanvasBase.get_supported_filetypes()
        suffix = Path(plot).suffix.lower().lstrip(".")
        if suffix not in kinds:
            raise OrthrusError(f"{plot}: a plot needs an image suffix matplotlib writes "
                               f"({', '.join('.' + k for k in sorted(kinds))}), e.g. {Path(plot).stem or 'plot'}.png")


def _check_writable(path) -> None:
    """Fail before long work when an output file cannot be written (nothing is left behind)."""
    import os
    from pathlib import Path
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise OrthrusError(f"{path} is a directory: name a file to write")
    if not parent.is_dir() or not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise OrthrusError(f"{path}: cannot write there (no such directory, or no permission); pick another path")


@main.command()
@model_options
@click.option("-p", "--prompt", default=None, help="prompt text (with --chat: the user message)")
@click.option("-f", "--file", "prompt_file", type=click.File("rb"), default=None,
              help="read the prompt from a file")
@click.option("--chat", "-cnv", is_flag=True, help="wrap the prompt in the GGUF's chat template")
@click.option("-sys", "--system-prompt", default=None, help="a system message (implies --chat)")
@click.option("-n", "--n-predict", "--max-tokens", "max_tokens", type=click.IntRange(1), default=256,
              show_default=True, help="tokens to generate")
@click.option("--temp", default=0.0, show_default=True, help="temperature (0: greedy, lossless)")
@click.option("--top-k", default=40, show_default=True, help="0: off")
@click.option("--top-p", default=0.95, show_default=True, help="1: off")
@click.option("--min-p", default=0.05, show_default=True, help="0: off")
@click.option("--repeat-penalty", default=1.0, show_default=True, help="1: off")
@click.option("--repeat-last-n", default=64, show_default=True, help="tokens the penalty looks back (-1: all)")
@click.option("--presence-penalty", default=0.0, show_default=True)
@click.option("--frequency-penalty", default=0.0, show_default=True)
@click.option("-s", "--seed", type=click.IntRange(0), default=None)
@click.option("--grammar", default=None, help="a GBNF grammar the output must follow")
@click.option("--grammar-file", type=click.File("rb"), default=None, help="the grammar from a file")
@click.option("--mode", type=click.Choice(["orthrus", "ar"]), default="orthrus", show_default=True)
@click.option("--block-size", default=None, help="draft block: an integer, or 'auto' (default: the GGUF's)")
@click.option("--stats", "show_stats", is_flag=True, help="print decoding statistics at the end")
def generate(model, prompt, prompt_file, chat, system_prompt, max_tokens, temp, top_k, top_p, min_p,
             repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty, seed, grammar, grammar_file,
             mode, block_size, show_stats, **kw):
    """Stream a completion to stdout (llama.cpp's sampler chain and defaults)."""
    import json

    from .api import Orthrus
    from .decode import Stats
    if (prompt is None) == (prompt_file is None):
        raise OrthrusError("give the prompt with -p TEXT or -f FILE (one of them)")
    if grammar is not None and grammar_file is not None:
        raise OrthrusError("give the grammar with --grammar or --grammar-file, not both")
    if prompt is None:
        prompt = utf8_text(prompt_file.read(), f"the prompt file {prompt_file.name}")
    if grammar_file is not None:
        grammar = utf8_text(grammar_file.read(), f"the grammar file {grammar_file.name}")
    with Orthrus(model, **model_kwargs(kw)) as m:
        if chat or system_prompt is not None:
            msgs = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
            prompt = m.apply_chat_template(msgs + [{"role": "user", "content": prompt}])
        stats = Stats(mode)
        for piece in m.steps(prompt, max_tokens, temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                             repeat_penalty=repeat_penalty, penalty_last_n=repeat_last_n,
                             presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                             seed=seed, grammar=grammar, mode=mode, block_size=int_or(block_size, param_hint="'--block-size'")):
            click.echo(piece.text, nl=False)
            stats.add(piece.step)
        click.echo()
        if show_stats:  # and where the greedy picks ran
            click.echo(json.dumps(stats.summary() | {"backend_sampling": m.native.backend_sampling}, indent=2),
                       err=True)


@main.command()
@model_options
@click.option("--prompts", type=click.Path(), default=None,
              help="JSON list of prompts, or an object of named lists")
@click.option("-n", "--n-gen", "--max-tokens", "max_tokens", type=click.IntRange(2), default=128, show_default=True,
              help="tokens to generate per prompt (at least 2: the first comes from the prefill, the speed from the rest)")
@click.option("--block-size", "block_sizes", multiple=True, default=None,
              help="block sizes to compare (repeatable; integers or 'auto'; default: the GGUF's and auto)")
@click.option("--chat", is_flag=True, help="wrap each prompt in the chat template")
@click.option("-o", "--output", type=click.Choice(["md", "json"]), default="md", show_default=True,
              help="stdout as llama-bench prints it: a markdown table, or JSON records (--json FILE: the full report)")
@click.option("--json", "json_out", type=click.Path(), default=None, help="also write the report as JSON")
@click.option("--plot", type=click.Path(), default=None,
              help="write a PNG of acceptance and speed (with --costs also PLOT-costs.png)")
@click.option("--costs", is_flag=True,
              help="also the forward cost table by width (draft, verify, alternating vs back to back) and prefill speed")
@click.option("--graph-slots", type=click.IntRange(0, 256), default=None,
              help="kinds of batch with a kept graph (default 16; 0: llama.cpp's single graph)")
@click.option("--prefix-cache", is_flag=True,
              help="instead: how often a call on a reused prefix equals a fresh call, per exact mode")
def bench(model, prompts, max_tokens, block_sizes, chat, output, json_out, plot, costs, graph_slots,
          prefix_cache, **kw):
    """AR against Orthrus on the same prompts, in one process: speed, acceptance, identity."""
    import json
    from pathlib import Path

    from .bench import (bench_records, format_costs, format_markdown, format_report, load_prompts,
                        plot_costs, plot_report, prefix_cache_parity, run_bench)
    mk = model_kwargs(kw)
    say = lambda msg: click.echo(msg, err=True)  # noqa: E731
    _check_outputs(json_out, plot)  # before the run: a bad path fails now, not after it
    if prefix_cache:
        rep = prefix_cache_parity(model, load_prompts(prompts), max_tokens, progress=say, **mk)
        for exact, same in rep["identical"].items():
            click.echo(f"exact={exact}: cached call = fresh call on {same} prompts")
        if json_out:
            with open(json_out, "w") as f:
                json.dump(rep, f, indent=2)
        return
    blocks = (list(dict.fromkeys(int_or(b, param_hint="'--block-size'") for b in block_sizes)) if block_sizes
              else [None, "auto"])
    rep = run_bench(model, load_prompts(prompts), max_tokens, blocks, chat=chat, costs=costs,
                    graph_slots=graph_slots, progress=say, **mk)
    if output == "json":
        click.echo(json.dumps(bench_records(rep), indent=2))
    else:
        click.echo(format_markdown(rep))
    if "costs" in rep and output == "md":
        click.echo(format_costs(rep["costs"]))
        pf = rep["prefill"]
        click.echo(f"prefill of {pf['tokens']} tokens: {pf['fast_tokens_per_second']:.0f} tok/s fast kernels, "
                   f"{pf['exact_tokens_per_second']:.0f} tok/s exact mode ({pf['exact_over_fast']:.3f}x), "
                   f"{pf['reference_kernels_tokens_per_second']:.0f} tok/s on the batch-invariant kernels\n")
    if output == "md":
        click.echo(format_report(rep))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rep, f, indent=2)
    if plot:
        say(f"plot: {plot_report(rep, plot)}")
        if "costs" in rep:
            p = Path(plot)
            say(f"plot: {plot_costs(rep['costs'], p.with_name(p.stem + '-costs' + p.suffix))}")


@main.command("bench-server", context_settings={"ignore_unknown_options": True})
@click.option("-m", "--model", required=True, type=click.Path(), help="GGUF file")
@click.option("--prompts", type=click.Path(), default=None,
              help="JSON list of prompts, or an object of named lists")
@click.option("--max-tokens", "-n", default=128, show_default=True)
@click.option("--temp", default=0.0, show_default=True, help="temperature of every request")
@click.option("--setting", "settings", multiple=True, default=("off", "speculative", "match"), show_default=True,
              type=click.Choice(["off", "speculative", "match", "auto", "per-slot"]),
              help="servers to compare (repeatable); 'off' is always run, as the baseline; 'per-slot' "
                   "drafts each slot with its own diffusion forward (the path before batched drafting)")
@click.option("--draft-max", default=None, help="drafts per step of the drafting servers (default: block size - 1)")
@click.option("-c", "--concurrency", "concurrency", multiple=True, type=click.IntRange(1), default=(1,),
              show_default=True, help="requests in flight at once, with as many server slots (repeatable)")
@click.option("--json", "json_out", type=click.Path(), default=None, help="also write the report as JSON")
@click.option("--plot", type=click.Path(), default=None,
              help="also plot throughput and forwards per drafting step by concurrency (PNG)")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def bench_server(model, prompts, max_tokens, temp, settings, draft_max, concurrency, json_out, plot, extra):
    """llama-server with drafting off against Orthrus drafting: speed, acceptance, identity.
    llama-server flags go after -- (e.g. -- -t 4 -ngl 99)."""
    import json
    import os

    from .bench import load_prompts
    from .serve_bench import format_server_report, plot_server_report, run_server_bench
    if not os.path.isfile(model):
        raise OrthrusError(f"{model}: no such file")
    _check_outputs(json_out, plot)  # before the run, not after it
    rep = run_server_bench(model, load_prompts(prompts), max_tokens, temp, settings,
                           int_or(draft_max, param_hint="'--draft-max'"), extra, progress=click.echo, concurrency=concurrency)
    click.echo(format_server_report(rep))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rep, f, indent=2)
    if plot:
        click.echo(f"plot: {plot_server_report(rep, plot)}")


@main.command()
@click.option("--outtype", "outtypes", multiple=True, default=("f16", "q4_k_m"), show_default=True)
@click.option("-n", "--n-predict", "--max-tokens", "max_tokens", type=click.IntRange(2), default=96, show_default=True,
              help="tokens per prompt (at least 2: the first comes from the prefill)")
@click.option("-t", "--threads", type=click.IntRange(1), default=None)
@click.option("-ngl", "--gpu-layers", "--n-gpu-layers", "n_gpu_layers", type=GpuLayers(), default="auto",
              show_default=True)
@click.option("--json", "json_out", type=click.Path(), default=None)
def demo(outtypes, max_tokens, threads, n_gpu_layers, json_out):
    """Convert the embedded orthrus-tiny and race AR against Orthrus on held-out prompts."""
    from .demo import run_demo
    _check_outputs(json_out)  # before the run, not after it
    run_demo(outtypes, max_tokens, n_threads=threads, n_gpu_layers=n_gpu_layers, json_out=json_out)


def no_draft_model(ctx, param, value):
    if value is not None:
        from .serve import NO_DRAFT_MODEL
        raise click.BadParameter(NO_DRAFT_MODEL)


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("-m", "--model", required=True, type=click.Path(), help="GGUF file")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--spec-draft-n-max", "--draft-max", "draft_max", default=None,
              help="drafts per step: an integer, 'auto' (chosen per step) or 'off' (no drafting); "
                   "default: block size - 1")
@click.option("-np", "--parallel", "n_parallel", type=click.IntRange(1), default=None,
              help="server slots (default: llama-server's, which picks the count itself)")
@click.option("--rule", type=click.Choice(["speculative", "match"]), default="speculative", show_default=True,
              help="temperature > 0: speculative sampling against the draft, or token matching")
@click.option("-md", "--model-draft", hidden=True, expose_value=False, callback=no_draft_model)
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def serve(model, host, port, draft_max, n_parallel, rule, extra):
    """Run llama-server with Orthrus drafting; llama-server flags go after --
    (--spec-draft-n-min and --spec-draft-p-min among them)."""
    from .serve import serve as run_serve
    draft_max = int_or(draft_max, ("auto", "off"), "'--draft-max'")
    sys.exit(run_serve(model, host, port, draft_max, n_parallel, extra, echo=click.echo, rule=rule))


if __name__ == "__main__":
    main()
