"""Fetch the PG19 books the benchmarks read, from DeepMind's public release of PG19 (Rae et al. 2019).

The release (github.com/google-deepmind/pg19 links it) is the public Google Cloud Storage bucket
`deepmind-gutenberg`, one plain-text file per book, read over https with no account:

    https://storage.googleapis.com/deepmind-gutenberg/<split>/<id>.txt      <split>: train, validation, test

tools/pg19_books.json lists the 131 books we use (id, split, set, size, sha256); they land in

    DIR/pg19-templora40/<id>.txt    the 40 books the Temp-LoRA paper evaluates on: evaluation only
    DIR/pg19-test/<id>.txt          91 books of PG19's test split: training text for the methods that train

A book already there with the listed size and sha256 is not fetched again, so a rerun resumes; a file that
differs from the list is removed and fetched again. Each download goes to a hidden temporary file beside its
final name and is renamed to it only once its size and sha256 match: no half book ever has the final name,
Ctrl-C included. Where the list gives no split (the 40: none is in the test split, and whether each is in
validation or train is not recorded) the folders are tried in the order test, validation, train.

Usage:  python -m tools.pg19 [DIR] [--only eval|train] [--ids 349,718] [--base-url URL] [--list JSON]
        DIR defaults to $TEMPLORA_BOOKS_DIR, else ~/.cache/templora/pg19 (where the benchmarks look)
Exit status: 0 every book is there and checked; 1 some books could not be had intact (wrong size or sha256,
an HTTP error): they are named and not kept, the others are; 2 the server cannot be reached, or a bad list
or argument; 130 interrupted.
"""
import argparse
import hashlib
import http.client
import json
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

BASE_URL = "https://storage.googleapis.com/deepmind-gutenberg"
LIST = Path(__file__).with_name("pg19_books.json")
SETS = {"eval": "pg19-templora40", "train": "pg19-test"}  # --only's names for the two folders
SPLITS = ("test", "validation", "train")  # tried in this order for a book whose split the list leaves open
CHUNK = 1 << 16


def default_books_dir() -> Path:
    """$TEMPLORA_BOOKS_DIR if set, else ~/.cache/templora/pg19."""
    env = os.environ.get("TEMPLORA_BOOKS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache/templora/pg19"


class Unreachable(Exception):
    """No answer from the server at all (refused, no route, no DNS, timeout): every other book would fail too."""


class BadBook(Exception):
    """This book could not be had intact: an HTTP error, a download cut short, a wrong size or sha256."""


def read_list(path: Path) -> list[dict]:
    """The list's books, each checked for what this tool relies on (so a bad list fails here, not midway)."""
    try:
        books = json.loads(Path(path).read_text(encoding="utf-8"))["books"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: no list of books ({e!r})") from None
    seen = set()
    for b in books:
        if not (isinstance(b, dict) and isinstance(b.get("id"), str) and b["id"].isdigit()  # ids name files
                and b.get("set") in SETS.values() and b.get("split") in (*SPLITS, None)
                and isinstance(b.get("bytes"), int) and b["bytes"] >= 0
                and isinstance(b.get("sha256"), str) and re.fullmatch("[0-9a-f]{64}", b["sha256"])):
            raise ValueError(f"{path}: malformed entry {b!r}")
        if b["id"] in seen:
            raise ValueError(f"{path}: book {b['id']} is listed twice")
        seen.add(b["id"])
    return books


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_intact(path: Path, book: dict) -> bool:
    return path.is_file() and path.stat().st_size == book["bytes"] and sha256_of(path) == book["sha256"]


def umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def open_url(url: str, timeout: float):
    """The response to a GET of url. Raises urllib's HTTPError (the caller decides whether a 404 means "try
    the next split"), Unreachable when there is no connection at all, BadBook when the answer is garbled."""
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError:
        raise
    except urllib.error.URLError as e:  # the connection itself failed
        raise Unreachable(f"cannot reach {url} ({e.reason})") from None
    except (OSError, http.client.HTTPException) as e:  # connected, but no proper answer
        raise BadBook(f"no proper answer from {url} ({e!r})") from None


def download(url: str, dest: Path, book: dict, timeout: float) -> None:
    """url -> dest, checked against the book's size and sha256 on the way; raises what open_url raises or
    BadBook. Whatever happens, nothing is left behind but an intact dest."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.part-")  # hidden, and not *.txt
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as f, open_url(url, timeout) as response:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as e:  # reset or timed out midway
                    raise BadBook(f"the download broke off after {size:,} bytes ({e!r})") from None
                if not chunk:
                    break
                size += len(chunk)
                if size > book["bytes"]:  # never store more than the list says the book holds
                    raise BadBook(f"more than the listed {book['bytes']:,} bytes from {url}")
                digest.update(chunk)
                f.write(chunk)
        if size != book["bytes"]:
            raise BadBook(f"got {size:,} of the listed {book['bytes']:,} bytes from {url}")
        if digest.hexdigest() != book["sha256"]:
            raise BadBook(f"the sha256 of {url} is not the listed one")
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private (0600); give it a plain file's mode
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone already when it was renamed


def fetch(book: dict, dest: Path, base_url: str, timeout: float) -> str:
    """Download one book into dest; returns the split folder it came from."""
    splits = [book["split"]] if book["split"] else list(SPLITS)
    for k, split in enumerate(splits):
        url = f"{base_url}/{split}/{book['id']}.txt"
        try:
            download(url, dest, book, timeout)
            return split
        except urllib.error.HTTPError as e:
            e.close()
            # not in this folder: Cloud Storage answers 404, or 403 to a reader who may not list the bucket
            if e.code in (403, 404) and k + 1 < len(splits):
                continue
            before = f" (nor in {', '.join(s + '/' for s in splits[:k])})" if k else ""
            raise BadBook(f"HTTP {e.code} {e.reason} from {url}{before}") from None
    raise AssertionError("not reached: the loop returns or raises")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.pg19", description=__doc__.split("\n")[0],
                                epilog="Exit status: 0 all books there; 1 some failed the check (named, not kept); "
                                       "2 server unreachable or bad arguments; 130 interrupted.")
    p.add_argument("dir", nargs="?", type=Path,
                   help="where the books go (default: $TEMPLORA_BOOKS_DIR, else ~/.cache/templora/pg19)")
    p.add_argument("--only", choices=list(SETS), help="one set only: eval (pg19-templora40) or train (pg19-test)")
    p.add_argument("--ids", help="only these book ids, comma-separated (349 is the single-book benchmarks' book)")
    p.add_argument("--base-url", default=BASE_URL,
                   help=f"where the release's <split>/<id>.txt files are (default {BASE_URL}); e.g. a mirror")
    p.add_argument("--list", type=Path, default=LIST,
                   help="the books, with their sizes and sha256 (default: tools/pg19_books.json)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server (default 60)")
    a = p.parse_args(argv)
    root = (a.dir or default_books_dir()).expanduser()
    try:
        books = read_list(a.list)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.only:
        books = [b for b in books if b["set"] == SETS[a.only]]
    if a.ids:
        wanted = {i.strip() for i in a.ids.split(",") if i.strip()}
        unknown = sorted(wanted - {b["id"] for b in books}, key=lambda i: (len(i), i))
        if unknown:
            p.error(f"--ids: not in {a.list}{' (--only ' + a.only + ')' if a.only else ''}: {', '.join(unknown)}")
        books = [b for b in books if b["id"] in wanted]

    base_url, failed, fetched, found = a.base_url.rstrip("/"), [], 0, {}
    try:
        for n, book in enumerate(books, 1):
            name = f"{book['set']}/{book['id']}.txt"
            dest = root / name
            line = f"[{n}/{len(books)}] {name} {book['bytes']:,} bytes"
            if is_intact(dest, book):
                print(f"{line}  already there", flush=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():  # there, but not the listed book: it must not stay under that name
                dest.unlink()
            try:
                split = fetch(book, dest, base_url, a.timeout)
            except BadBook as e:
                failed.append(name)
                print(f"{line}  FAILED: {e}; not kept", flush=True)
                continue
            fetched += 1
            if book["split"] is None:
                found[book["id"]] = split
            print(f"{line}  fetched from {split}/", flush=True)
    except Unreachable as e:
        print(f"error: {e}; check the network or pass --base-url", file=sys.stderr)
        return 2
    except OSError as e:  # this machine's side: a folder that cannot be made, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: no partial book was left behind; run again to go on", file=sys.stderr)
        return 130
    if found:  # worth recording in the list: the next run goes straight to them
        print("split folders of books the list leaves open: " + ", ".join(f"{i} {s}" for i, s in found.items()))
    if failed:
        print(f"error: {len(failed)} of {len(books)} books failed the check and were not kept: {', '.join(failed)}; "
              "run again to retry them", file=sys.stderr)
        return 1
    print(f"{len(books)} book{'s' * (len(books) != 1)} in {root} ({fetched} fetched, "
          f"{len(books) - fetched} already there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
