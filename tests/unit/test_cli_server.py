"""The one `backfill` typer app: help with defaults, exit codes, options reaching settings.

In process through `backfill.cli.main.main` (the console script), which returns the exit
code; `keys` runs against SQLite in a temporary data dir. `backfill sim` is checked up to the
`SimOptions` it hands to `sim.server.run` (replaced here: no socket).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from backfill import __version__
from backfill.cli.main import main
from backfill.settings import Settings
from backfill.sim import options as sim_options
from backfill.sim import server as sim_server

PORT = Settings.model_fields["port"].default  # 8000: what `serve --help` must show
COMMANDS = [
    "serve", "worker", "run", "keys", "projects", "webhooks", "usage", "sim", "submit", "retry",
    "batches", "files",
]  # fmt: skip


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(text: str) -> str:
    """Help text with its wrapping undone (click wraps at 80 columns, also after a hyphen)."""
    return re.sub(r"\s+", " ", re.sub(r"(?<=-)\n\s+", "", text))


def test_root_help_lists_every_command_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    listed = out.split("Commands:")[1].splitlines()
    rows = {line.split()[0]: line for line in listed if line.strip()}
    assert list(rows) == COMMANDS
    assert all(len(row.split()) > 2 and "..." not in row for row in rows.values()), listed


@pytest.mark.parametrize(
    ("argv", "defaults"),
    [
        (
            ["serve"],
            [
                f"--port <int> port to listen on [default: {PORT}]",
                "--host <str> address to listen on [default: 127.0.0.1]",
                "[default: backfill-data]",
                "[default: info]",
                "[default: (SQLite in the data dir)]",
                "SmolLM2-135M-Instruct",
            ],
        ),
        (["worker"], ["[default: backfill-data]", "[default: info]"]),
        (["run"], ["[default: warning]", "(the model's max_concurrency)", "-o, --output"]),
        (["keys", "create"], ["[default: backfill-data]", "--project <str>"]),
        (["keys", "revoke"], ["KEY_ID", "[default: backfill-data]"]),
        (
            ["sim"],
            [
                "--port <int> 0 picks a free port [default: 8001]",
                "[default: llama-3.1-8b-h100]",
                "--speedup <float> simulated seconds per wall second [default: 1.0]",
                "[default: 20.0]",
                "(the profile's; 8192 for llama-3.1-8b-h100)",
            ],
        ),
    ],
)
def test_help_shows_the_real_defaults(
    capsys: pytest.CaptureFixture[str], argv: list[str], defaults: list[str]
) -> None:
    code, out, _ = run_cli(capsys, *argv, "--help")
    assert code == 0
    text = one_line(out)
    assert "[default: None]" not in text
    for default in defaults:
        assert default in text, (default, out)


def test_help_loads_neither_torch_nor_the_sdk_nor_the_server() -> None:
    probe = (
        "import sys\n"
        "from backfill.cli.main import main\n"
        "assert main(['--help']) == 0\n"
        "heavy = ('torch', 'openai', 'uvicorn', 'fastapi', 'backfill.service', 'httptools')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.splitlines()[-1] == "[]"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "--version") == (0, f"backfill {__version__}\n", "")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--bogus"], "No such option: --bogus"),
        (["sim", "--profile", "nope"], "Invalid value for '--profile'"),
        (["keys", "create"], "Missing option '--project'"),
        (["run", "in.jsonl"], "Missing option '-o' / '--output'"),
        (["run", "in.jsonl", "-o", "out.jsonl", "--concurrency", "0"], "--concurrency"),
        (["nope"], "No such command 'nope'"),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err and err.startswith("Usage: backfill"), err
    assert out == ""


def test_keys_create_list_revoke(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    code, out, _ = run_cli(capsys, "keys", "create", "--project", "team", *data)
    assert code == 0
    assert re.fullmatch(r"Created an API key for project team: sk-bf-[\w-]{43}\n", out)
    key = out.split()[-1]
    assert (tmp_path / "backfill.db").is_file()

    code, out, _ = run_cli(capsys, "keys", "list", *data)
    header, row = out.splitlines()
    assert header.split() == ["ID", "PREFIX", "PROJECT", "ADMIN", "CREATED", "SOURCE", "REVOKED"]
    key_id, prefix, project, admin, *_, source, revoked = row.split()
    assert (prefix, project, admin, source, revoked) == (f"{key[:8]}...", "team", "-", "cli", "-")
    assert key not in out
    assert run_cli(capsys, "keys", "list", "--project", "other", *data)[1].count("\n") == 1

    code, out, _ = run_cli(capsys, "keys", "revoke", key_id, *data)
    assert code == 0 and out.startswith(f"Revoked API key {key_id} of project team at ")
    assert run_cli(capsys, "keys", "list", *data)[1].splitlines()[1].split()[-1] != "-"

    code, out, err = run_cli(capsys, "keys", "revoke", "key_nope", *data)
    assert (code, out) == (2, "")
    assert err == "backfill: no API key 'key_nope' (see `backfill keys list`)\n"


def test_options_left_at_their_default_leave_the_config_file_in_charge(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--data-dir`'s shown default is the Settings default; not typed, it must not override
    the config file (nor the environment); typed, it wins over both."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "backfill.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path / "from-config"}"\n')
    assert run_cli(capsys, "keys", "list", "--config", str(config))[0] == 0
    assert (tmp_path / "from-config" / "backfill.db").is_file()

    monkeypatch.setenv("BACKFILL_DATA_DIR", str(tmp_path / "from-env"))
    assert run_cli(capsys, "keys", "list")[0] == 0
    assert (tmp_path / "from-env" / "backfill.db").is_file()

    typed = ["--data-dir", str(tmp_path / "typed"), "--config", str(config)]
    assert run_cli(capsys, "keys", "list", *typed)[0] == 0
    assert (tmp_path / "typed" / "backfill.db").is_file()
    assert not (tmp_path / "backfill-data").exists()


def test_run_reports_a_missing_input_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.jsonl"
    model = "m=http://127.0.0.1:9/v1"  # never contacted: the file is checked first
    code, _, err = run_cli(
        capsys, "run", str(missing), "-o", str(tmp_path / "out.jsonl"), "--model", model
    )
    assert code == 2 and err == f"backfill: no such file: {missing}\n"


def test_sim_hands_its_options_to_the_server(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[sim_options.SimOptions] = []
    monkeypatch.setattr(sim_server, "run", lambda options: seen.append(options) or 0)
    assert run_cli(capsys, "sim")[0] == 0
    assert seen.pop() == sim_options.SimOptions()  # the dataclass's defaults are the options'
    argv = ["--profile", "llama-3.1-70b-4xh100", "--port", "0", "--speedup", "10"]
    argv += ["--max-num-seqs", "4", "--num-gpu-blocks", "64", "--no-metrics", "--no-uvloop"]
    assert run_cli(capsys, "sim", *argv)[0] == 0
    assert seen.pop() == sim_options.SimOptions(
        profile="llama-3.1-70b-4xh100",
        port=0,
        speedup=10.0,
        max_num_seqs=4,
        num_gpu_blocks=64,
        no_metrics=True,
        no_uvloop=True,
    )
    # `python -m backfill.sim` runs the same command on its own
    assert sim_server.main(["--port", "0", "--model-name", "x"]) == 0
    assert seen.pop() == sim_options.SimOptions(port=0, model_name="x")
    assert sim_server.main(["--bogus"]) == 2
