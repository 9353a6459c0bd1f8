"""API keys through the real CLI: `keys create | list | revoke`, and `serve --api-key`.

- `keys list` shows every key by id and prefix (never the key), with project, source and
  revocation; `keys revoke KEY_ID` ends a key while the server runs (within the auth cache's
  10 s); `keys create` prints exactly what it always printed.
- A key given with `--api-key` works only while it is given: restarted without it, the server
  answers 401 to it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from polling import poll

from backfill.testing import UpstreamProcess
from backfill.testing.server import BackfillProcess

CLI = [sys.executable, "-m", "backfill.cli.main"]
FLAG_KEY = "sk-flag1-given-on-the-command-line"  # shown as `sk-flag1...`
NEW_FLAG_KEY = "sk-flag2-given-on-the-command-line"


def cli(data_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [*CLI, "keys", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def status_for(server: BackfillProcess, key: str) -> int:
    request = urllib.request.Request(
        server.base_url + "/models", headers={"authorization": f"Bearer {key}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def listed(data_dir: Path) -> dict[str, list[str]]:
    """`keys list` as {prefix: [id, prefix, project, created date, time, source, revoked...]}
    (the ADMIN column left out)."""
    lines = cli(data_dir, "list").stdout.splitlines()
    header = ["ID", "PREFIX", "PROJECT", "ADMIN", "CREATED", "SOURCE", "REVOKED"]
    assert lines[0].split() == header
    rows = [row[:3] + row[4:] for row in (line.split() for line in lines[1:])]
    return {row[1]: row for row in rows}


def serve(data_dir: Path, upstream: UpstreamProcess, key: str) -> BackfillProcess:
    return BackfillProcess(data_dir, api_keys=[key], models=[f"m={upstream.url}"]).start()


def test_list_revoke_and_keys_given_only_while_given(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess]
) -> None:
    server = serve(tmp_path, upstream, FLAG_KEY)
    servers.append(server)
    created = cli(tmp_path, "create", "--project", "team").stdout
    assert re.fullmatch(r"Created an API key for project team: sk-bf-[\w-]{43}\n", created)
    team_key = created.split()[-1]
    assert status_for(server, FLAG_KEY) == 200
    assert status_for(server, team_key) == 200

    keys = listed(tmp_path)
    flag_row, team_row = keys["sk-flag1..."], keys[team_key[:8] + "..."]
    assert flag_row[0].startswith("key_") and team_row[0].startswith("key_")
    assert (flag_row[2], flag_row[5], flag_row[6]) == ("default", "flag", "-")
    assert (team_row[2], team_row[5], team_row[6]) == ("team", "cli", "-")
    assert team_key not in cli(tmp_path, "list").stdout  # never the key itself
    assert list(listed_for(tmp_path, "team")) == [team_key[:8] + "..."]

    revoked = cli(tmp_path, "revoke", team_row[0]).stdout
    assert f"Revoked API key {team_row[0]} of project team" in revoked
    poll(  # the auth cache keeps a key for up to 10 s
        lambda: status_for(server, team_key) == 401,
        what="the revoked key to be refused",
        timeout=15,
        interval=0.2,
    )
    assert listed(tmp_path)[team_key[:8] + "..."][6] != "-"
    unknown = cli(tmp_path, "revoke", "key_doesnotexist", check=False)
    assert unknown.returncode == 2 and "key_doesnotexist" in unknown.stderr

    # restarted without FLAG_KEY (with another one): FLAG_KEY is refused at once
    server.stop()
    server = serve(tmp_path, upstream, NEW_FLAG_KEY)
    servers.append(server)
    assert status_for(server, FLAG_KEY) == 401
    assert status_for(server, NEW_FLAG_KEY) == 200
    assert status_for(server, team_key) == 401
    sources = sorted((row[2], row[5], row[6] != "-") for row in listed(tmp_path).values())
    assert sources == [("default", "flag", False), ("default", "flag", True), ("team", "cli", True)]

    # given again: valid again
    server.stop()
    server = serve(tmp_path, upstream, FLAG_KEY)
    servers.append(server)
    assert status_for(server, FLAG_KEY) == 200
    assert status_for(server, NEW_FLAG_KEY) == 401


def listed_for(data_dir: Path, project: str) -> dict[str, list[str]]:
    lines = cli(data_dir, "list", "--project", project).stdout.splitlines()[1:]
    return {row.split()[1]: row.split() for row in lines}
