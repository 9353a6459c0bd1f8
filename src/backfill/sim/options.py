"""The simulator's command line: `backfill sim` and `python -m backfill.sim`, one typer command.

`app` holds the one command `sim`: the root `backfill` app merges it in (`app.add_typer(app)`),
and `python -m backfill.sim` (what `process.start_sim` spawns) runs it alone through `main`.
The command builds a `SimOptions` and hands it to `server.run`, imported inside it, so that
building the `backfill` CLI imports neither httptools nor the server.

`SimOptions` is the programmatic entry: `server.run(SimOptions(port=0, speedup=10))`. Its
field names are the options' (`no_uvloop`, `no_metrics` included), so code that still passes
the old argparse namespace to `server.run` works unchanged. Its defaults are the options'
defaults, shown by `--help`; those that the profile decides show the default profile's value.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from backfill.sim.profiles import PROFILES

__all__ = ["SimOptions", "app", "main", "sim"]

DEFAULT_PROFILE = "llama-3.1-8b-h100"

if TYPE_CHECKING:
    ProfileName = str
else:  # typer offers a Literal's values as choices; the profiles are data, hence built here
    ProfileName = Literal[tuple(sorted(PROFILES))]


@dataclass(frozen=True, slots=True)
class SimOptions:
    """What `backfill sim` was given (the field names are the options' names)."""

    profile: str = DEFAULT_PROFILE
    host: str = "127.0.0.1"
    port: int = 8001
    speedup: float = 1.0
    model_name: str | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    long_prefill_token_threshold: int | None = None
    num_gpu_blocks: int | None = None
    stream_interval_ms: float = 20.0
    no_uvloop: bool = False
    no_metrics: bool = False


_D = SimOptions()
_P = PROFILES[DEFAULT_PROFILE]


def _profiles(what: str) -> str:
    """`--help`'s default of an option the profile decides: the default profile's value."""
    return f"the profile's; {what} for {_P.name}"


app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command("sim")
def sim(
    profile: Annotated[
        ProfileName, typer.Option("--profile", help="model and GPU figures (sim/profiles.py)")
    ] = _D.profile,
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = _D.host,
    port: Annotated[int, typer.Option("--port", help="0 picks a free port")] = _D.port,
    speedup: Annotated[
        float, typer.Option("--speedup", help="simulated seconds per wall second")
    ] = _D.speedup,
    model_name: Annotated[
        str | None,
        typer.Option("--model-name", help="served model name", show_default=_P.model),
    ] = _D.model_name,
    max_num_seqs: Annotated[
        int | None,
        typer.Option(
            "--max-num-seqs",
            help="requests running at once (vLLM's option)",
            show_default=_profiles(str(_P.max_num_seqs)),
        ),
    ] = _D.max_num_seqs,
    max_num_batched_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-num-batched-tokens",
            help="tokens per engine step (vLLM's option)",
            show_default=_profiles(str(_P.max_num_batched_tokens)),
        ),
    ] = _D.max_num_batched_tokens,
    long_prefill_token_threshold: Annotated[
        int | None,
        typer.Option(
            "--long-prefill-token-threshold",
            help="prefill tokens per request per step (vLLM's option; 0: no cap)",
            show_default=_profiles(str(_P.long_prefill_token_threshold)),
        ),
    ] = _D.long_prefill_token_threshold,
    num_gpu_blocks: Annotated[
        int | None,
        typer.Option(
            "--num-gpu-blocks",
            help="override KV blocks (of 16 tokens)",
            show_default=_profiles(f"what fits, {_P.num_gpu_blocks}"),
        ),
    ] = _D.num_gpu_blocks,
    stream_interval_ms: Annotated[
        float, typer.Option("--stream-interval-ms", help="flush streams this often")
    ] = _D.stream_interval_ms,
    no_uvloop: Annotated[
        bool, typer.Option("--no-uvloop", help="use the default asyncio loop")
    ] = _D.no_uvloop,
    no_metrics: Annotated[
        bool,
        typer.Option(
            "--no-metrics",
            help="answer 404 to /metrics, as an engine without metrics (llama-cpp-python's server)",
        ),
    ] = _D.no_metrics,
) -> None:
    """Run a simulated vLLM server (no GPU needed).

    Prints `READY <port>` once it listens; serves until SIGINT or SIGTERM.
    """
    from backfill.sim.server import run  # httptools, the engine: only when it runs

    code = run(
        SimOptions(
            profile=profile,
            host=host,
            port=port,
            speedup=speedup,
            model_name=model_name,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            long_prefill_token_threshold=long_prefill_token_threshold,
            num_gpu_blocks=num_gpu_blocks,
            stream_interval_ms=stream_interval_ms,
            no_uvloop=no_uvloop,
            no_metrics=no_metrics,
        )
    )
    if code:
        raise typer.Exit(code)


def main(argv: list[str] | None = None) -> int:
    """`python -m backfill.sim [OPTIONS]`; the exit code (2 for a usage error)."""
    try:
        app(args=sys.argv[1:] if argv is None else argv, prog_name="python -m backfill.sim")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0
