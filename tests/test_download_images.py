"""``megarec download-images`` against a local http.server (no internet): retries, 404s, resume."""
from __future__ import annotations

import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from megarec.cli import main
from megarec.config import ConfigError
from megarec.data.domain import DataError, Domain
from megarec.data.download_images import download_images, image_filename, with_local_images


class FlakyHandler(SimpleHTTPRequestHandler):
    """Serves files from a folder; ``/flaky/*`` answers 503 the first ``fail_times`` times."""

    fail_times = 2
    hits: dict[str, int] = {}
    lock = threading.Lock()

    def do_GET(self) -> None:
        with self.lock:
            n = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.path.startswith("/flaky/") and n <= self.fail_times:
            self.send_error(503, "try again")
            return
        if self.path.startswith("/broken/"):
            self.send_error(500, "always down")
            return
        super().do_GET()

    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    for sub in ("img", "flaky"):
        (root / sub).mkdir(parents=True)
    for k in range(5):
        (root / "img" / f"p{k}.jpg").write_bytes(bytes([k]) * (100 + k))
    (root / "flaky" / "f.png").write_bytes(b"\x89PNG flaky")
    FlakyHandler.hits = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(FlakyHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


def make_domain(base: str) -> Domain:
    ids = ["A0", "A1", "A2", "A3", "A4", "FL/1", "GONE", "NOIMG", "DOWN"]
    urls = [f"{base}/img/p{k}.jpg" for k in range(5)] + [f"{base}/flaky/f.png", f"{base}/img/missing.jpg", None,
                                                          f"{base}/broken/x.jpg"]
    return Domain("Toys", ids, ["u"], [np.arange(len(ids))], item_image=urls)


def test_download_retries_404_and_resume(server, tmp_path):
    base, root = server
    domain = make_domain(base)
    out = tmp_path / "images"
    report = download_images(domain, out, workers=3, retries=3, backoff=0.01, timeout=5, progress=False)
    assert report.as_dict() == {"downloaded": 6, "skipped": 0, "failed": 2, "no_url": 1}
    for k in range(5):
        assert (out / f"A{k}.jpg").read_bytes() == (root / "img" / f"p{k}.jpg").read_bytes()
    assert (out / "FL%2F1.png").read_bytes() == b"\x89PNG flaky"       # succeeded on the 3rd try
    assert FlakyHandler.hits["/flaky/f.png"] == 3
    assert FlakyHandler.hits["/img/missing.jpg"] == 1                   # 404: no retry
    assert FlakyHandler.hits["/broken/x.jpg"] == 4                      # 500: 1 + 3 retries
    failed = {iid: err for iid, _, err in report.failures}
    assert set(failed) == {"GONE", "DOWN"} and "404" in failed["GONE"] and "500" in failed["DOWN"]
    assert not list(out.glob("*.part"))

    # resume: a stale partial file from a killed run is replaced, finished files are not fetched again
    (out / "A3.jpg").unlink()
    (out / "A3.jpg.part").write_bytes(b"half")
    before = dict(FlakyHandler.hits)
    again = download_images(domain, out, workers=2, retries=0, backoff=0, progress=False)
    assert again.as_dict() == {"downloaded": 1, "skipped": 5, "failed": 2, "no_url": 1}
    assert (out / "A3.jpg").read_bytes() == (root / "img" / "p3.jpg").read_bytes()
    assert not (out / "A3.jpg.part").exists()
    assert FlakyHandler.hits["/img/p0.jpg"] == before["/img/p0.jpg"] == 1

    local = with_local_images(domain, out)
    assert local.item_image[0] == str(out / "A0.jpg")
    assert local.item_image[6:] == [None, None, None]


def test_download_images_cli(server, tmp_path, capsys):
    base, _ = server
    src = tmp_path / "data"
    src.mkdir()
    reviews = [{"user_id": f"U{u}", "parent_asin": f"I{j}", "timestamp": 1000 * j, "rating": 5.0}
               for u in range(5) for j in range(5)]
    metas = [{"parent_asin": f"I{j}", "title": f"T{j}", "features": [], "categories": [],
              "images": [{"thumb": None, "large": f"{base}/img/p{j}.jpg", "hi_res": None, "variant": "MAIN"}]}
             for j in range(5)]
    (src / "Toys.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews))
    (src / "meta_Toys.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metas))
    out = tmp_path / "imgs"
    assert main(["download-images", str(src), "--out", str(out), "--workers", "2"]) == 0
    assert "downloaded=5 skipped=0 failed=0 no_url=0" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [f"I{j}.jpg" for j in range(5)]
    assert main(["download-images", str(src), "--out", str(out)]) == 0
    assert "downloaded=0 skipped=5" in capsys.readouterr().out
    assert main(["download-images", str(src), "--out", str(out), "--workers", "0"]) == 2
    assert "workers >= 1" in capsys.readouterr().err


def test_download_errors_and_names(tmp_path):
    no_images = Domain("Plain", ["a"], ["u"], [np.arange(1)])
    with pytest.raises(DataError, match="'Plain'.*has no image URLs"):
        download_images(no_images, tmp_path)
    with pytest.raises(ConfigError, match="retries >= 0"):
        download_images(Domain("X", ["a"], ["u"], [np.arange(1)], item_image=[None]), tmp_path, retries=-1)
    assert image_filename("B0/x y", "https://h/p/img.PNG?size=2") == "B0%2Fx%20y.png"
    assert image_filename("B1", "https://h/p/noext") == "B1.jpg"
