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
@click.option("-o", "--out", type=click.Path(dir_okay=False), help="output GGUF (default: NAME-OUTTYPE.gguf)")
@click.option("--outtype", default="f16", show_default=True,
              help="f32, f16, bf16, q8_0, or a llama-quantize type (q4_k_m, q5_k_m, q6_k, q4_0, …)")
@click.option("--force", is_flag=True, help="overwrite OUT if it exists")
def convert(model, out, outtype, force):
    """Convert an Orthrus-Qwen3 checkpoint (local directory or hub id) to GGUF."""
    from .convert import convert
    path = convert(model, out, outtype.lower(), force=force)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("gguf_file", type=click.Path())
def info(gguf_file):
    """Show a GGUF's architecture, dimensions, block size, mask id and tensor types."""
    from .convert.info import format_info, gguf_info
    click.echo(format_info(gguf_info(gguf_file)))


if __name__ == "__main__":
    main()
