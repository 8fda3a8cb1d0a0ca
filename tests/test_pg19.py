"""tools/pg19.py against a local HTTP server laid out like the PG19 release (<split>/<id>.txt), and the
committed list of books. Nothing here talks to any address but 127.0.0.1."""
import hashlib
import http.server
import json
import re
import socket
import threading
import urllib.request
from pathlib import Path

import pytest

from tools import pg19

BOOKS = {  # id: (set, split in the list, what the server does)
    "11": ("pg19-templora40", None, "good, under train/ only"),  # no split listed: test/, validation/, train/
    "22": ("pg19-test", "test", "good"),
    "33": ("pg19-test", "test", "good, and a wrong copy is already there"),
    "44": ("pg19-test", "test", "cut off: promises every byte, sends half"),
    "55": ("pg19-test", "test", "wrong content: same size, other bytes"),
    "66": ("pg19-templora40", None, "nowhere: in no folder of the server"),
}


def text(book_id: str) -> bytes:
    return f"Book {book_id}. It was the best of times, it was the worst of times.\n".encode() * 50


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # urllib would send even 127.0.0.1 through one


@pytest.fixture
def release(tmp_path):
    """(base URL, list of request paths, list file): a server holding the books of BOOKS as the release would
    lay them out, or not quite."""
    site = tmp_path / "site"
    for book_id, (_, split, how) in BOOKS.items():
        if how.startswith("nowhere"):
            continue
        folder = site / (split or "train")
        folder.mkdir(parents=True, exist_ok=True)
        body = text(book_id)
        if how.startswith("wrong content"):
            body = body.replace(b"best", b"BEST")
        (folder / f"{book_id}.txt").write_bytes(body)
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(site), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            if self.path == "/test/44.txt":  # the connection drops halfway through the body
                body = text("44")
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    listing = {"books": [{"id": i, "split": split, "set": s, "bytes": len(text(i)),
                          "sha256": hashlib.sha256(text(i)).hexdigest()} for i, (s, split, _) in BOOKS.items()]}
    list_file = tmp_path / "books.json"
    list_file.write_text(json.dumps(listing))
    yield f"http://127.0.0.1:{server.server_address[1]}", requests, list_file
    server.shutdown()
    server.server_close()
    thread.join()


def run(capsys, *args) -> tuple[int, str, str]:
    code = pg19.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_good_books_land_bad_ones_are_named_and_not_kept_and_a_rerun_skips_the_good(tmp_path, capsys, release):
    base, requests, list_file = release
    books = tmp_path / "books"
    (books / "pg19-test").mkdir(parents=True)
    (books / "pg19-test" / "33.txt").write_bytes(b"an older, different copy")

    code, out, err = run(capsys, books, "--base-url", base, "--list", list_file)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: 3 of 6 books failed")
    assert "pg19-test/44.txt" in err and "pg19-test/55.txt" in err and "pg19-templora40/66.txt" in err
    lines = out.splitlines()
    assert lines[0] == f"[1/6] pg19-templora40/11.txt {len(text('11')):,} bytes  fetched from train/"
    assert all("FAILED" in line for line in lines[3:6])
    assert "HTTP 404" in lines[5] and "/train/66.txt (nor in test/, validation/)" in lines[5]
    for book_id in ("11", "22", "33"):
        folder = "pg19-templora40" if book_id == "11" else "pg19-test"
        assert (books / folder / f"{book_id}.txt").read_bytes() == text(book_id)
    # the bad ones are not kept, and no temporary file is left behind
    assert sorted(p.name for p in (books / "pg19-test").iterdir()) == ["22.txt", "33.txt"]
    assert sorted(p.name for p in (books / "pg19-templora40").iterdir()) == ["11.txt"]
    assert requests[:3] == ["/test/11.txt", "/validation/11.txt", "/train/11.txt"]  # test, validation, train

    requests.clear()
    code, out, err = run(capsys, books, "--base-url", base, "--list", list_file)
    assert code == 1
    assert sorted(requests) == ["/test/44.txt", "/test/55.txt", "/test/66.txt", "/train/66.txt",
                                "/validation/66.txt"]  # nothing asked for the books already there
    assert out.count("already there") == 3


def test_only_and_ids_choose_the_books(tmp_path, capsys, release):
    base, requests, list_file = release
    code, out, _ = run(capsys, tmp_path / "a", "--base-url", base, "--list", list_file, "--only", "eval")
    assert code == 1 and sorted(p.name for p in (tmp_path / "a").rglob("*.txt")) == ["11.txt"]  # and 66 failed
    requests.clear()
    code, out, _ = run(capsys, tmp_path / "b", "--base-url", base, "--list", list_file, "--ids", "22")
    assert code == 0 and requests == ["/test/22.txt"]
    assert out.splitlines()[-1].startswith(f"1 book in {tmp_path / 'b'} (1 fetched")


def test_default_folder_is_the_benchmarks_folder(tmp_path, capsys, release, monkeypatch):
    base, _, list_file = release
    monkeypatch.setenv("TEMPLORA_BOOKS_DIR", str(tmp_path / "env"))
    assert run(capsys, "--base-url", base, "--list", list_file, "--ids", "22")[0] == 0
    assert (tmp_path / "env" / "pg19-test" / "22.txt").read_bytes() == text("22")
    monkeypatch.delenv("TEMPLORA_BOOKS_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert pg19.default_books_dir() == tmp_path / "home" / ".cache/templora/pg19"


def test_an_unreachable_server_is_one_line_and_exit_2(tmp_path, capsys, release):
    _, _, list_file = release
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = run(capsys, tmp_path / "books", "--base-url", f"http://127.0.0.1:{port}", "--list", list_file)
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"error: cannot reach http://127.0.0.1:{port}/") and "--base-url" in err
    assert not list((tmp_path / "books").rglob("*.txt"))


def test_the_committed_list_names_the_40_eval_books_and_91_test_books():
    books = pg19.read_list(pg19.LIST)  # raises on a malformed entry or an id listed twice
    sets = [b["set"] for b in books]
    assert len(books) == 131 and sets.count("pg19-templora40") == 40 and sets.count("pg19-test") == 91
    assert len({b["id"] for b in books}) == 131
    assert all(re.fullmatch("[0-9a-f]{64}", b["sha256"]) and b["bytes"] > 0 for b in books)
    assert all(b["split"] == "test" for b in books if b["set"] == "pg19-test")
    assert "349" in {b["id"] for b in books if b["set"] == "pg19-templora40"}  # bench/common.py's BOOK
    assert Path(pg19.LIST).read_text().count('"id"') == 131  # ids, sizes and hashes only: no text


def test_ctrl_c_midway_leaves_no_partial_file(tmp_path, capsys, release, monkeypatch):
    base, _, list_file = release
    real_urlopen = urllib.request.urlopen

    class Interrupted:  # the response of a download that Ctrl-C stops after its first 100 bytes
        def __init__(self, response):
            self.response, self.reads = response, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.response.close()

        def read(self, n):
            self.reads += 1
            if self.reads > 1:
                raise KeyboardInterrupt
            return self.response.read(100)

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Interrupted(real_urlopen(url, timeout=timeout)))
    code, out, err = run(capsys, tmp_path / "books", "--base-url", base, "--list", list_file, "--ids", "22")
    assert code == 130 and "interrupted" in err
    assert list((tmp_path / "books" / "pg19-test").iterdir()) == []  # neither 22.txt nor its temporary file
