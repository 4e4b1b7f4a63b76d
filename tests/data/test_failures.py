"""A prepare that cannot start fails at once, in one line, before any progress bar, and leaves no folder behind."""

from __future__ import annotations

import json
import re
import time

import pytest

from gpt2lab.cli.main import main
from tests.data.conftest import write_jsonl


def run_error(capsys, argv: list[str]) -> list[str]:
    """stderr lines of a command that must fail with exit code 2."""
    assert main(argv) == 2
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no answer"])
def test_fineweb_offline_fails_fast_in_one_line(tmp_path, monkeypatch, capsys, offline):
    monkeypatch.delenv("GPT2LAB_MIRROR", raising=False)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # a hub endpoint that refuses connections: what the hub client retries for half a minute
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    out = tmp_path / "data" / "fineweb-edu"
    t0 = time.perf_counter()
    lines = run_error(capsys, ["data", "prepare", "fineweb-edu", "--out", str(out)])
    assert time.perf_counter() - t0 < 10
    assert len(lines) == 1 and lines[0].startswith("error: FineWeb-Edu")  # no retry lines, no progress bar
    assert "cannot be reached" in lines[0] and "--mirror" in lines[0] and "files" in lines[0]
    assert ("HF_HUB_OFFLINE=1" if offline == "HF_HUB_OFFLINE" else "127.0.0.1:9") in lines[0]
    assert not (tmp_path / "data").exists()  # neither the output folder nor its parent was left behind


def test_hub_probe_tells_an_answering_hub_from_a_silent_one(monkeypatch):
    import http.server
    import threading

    from gpt2lab.data.sources import hub_unreachable

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # any status means the hub is there
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    try:
        assert hub_unreachable() is None
    finally:
        server.shutdown()
        server.server_close()
    assert endpoint in hub_unreachable()  # the same port, now closed
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    assert hub_unreachable() == "HF_DATASETS_OFFLINE=true is set"


def test_no_files_match_is_one_line_before_any_progress_bar(tmp_path, capsys):
    lines = run_error(capsys, ["data", "prepare", "files", str(tmp_path / "*.txt"), "--out", str(tmp_path / "o")])
    assert len(lines) == 1 and lines[0].startswith("error: no files match")
    assert not (tmp_path / "o").exists()


def test_failure_before_the_first_shard_leaves_no_folder(tmp_path, capsys, speeches):
    path = write_jsonl(tmp_path / "docs.jsonl", speeches[:50])
    with open(path, "a") as f:
        f.write("{not json\n")  # the error comes after 50 documents were read, before any shard is complete
    out = tmp_path / "new" / "ds"
    lines = run_error(capsys, ["data", "prepare", "files", str(path), "--out", str(out), "--workers", "1"])
    assert "line 51: not valid JSON" in lines[-1]
    assert not (tmp_path / "new").exists()


def test_a_folder_that_existed_is_kept(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's file")
    run_error(capsys, ["data", "prepare", "files", str(tmp_path / "nothing*.jsonl"), "--out", str(out)])
    assert (out / "notes.txt").read_text() == "the user's file"


def test_progress_bar_counts_the_documents_the_manifest_counts(tmp_path, capsys, speeches):
    path = write_jsonl(tmp_path / "docs.jsonl", speeches[:600])
    out = tmp_path / "ds"
    argv = ["data", "prepare", "files", str(path), "--out", str(out), "--max-tokens", "3000", "--val-tokens", "500"]
    assert main([*argv, "--workers", "1"]) == 0
    documents = json.loads((out / "manifest.json").read_text())["documents"]
    shown = re.findall(r"prepare files: ([\d,]+) docs", capsys.readouterr().err)
    assert 0 < documents < 600 and int(shown[-1].replace(",", "")) == documents
