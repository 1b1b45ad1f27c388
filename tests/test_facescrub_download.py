"""FaceScrub metadata parsing and crop download, against a real HTTP server on 127.0.0.1 (no internet).

The server serves generated images from a temp folder; special paths give 404, 500-then-200 (``/flaky/<n>/...``
fails its first n requests), a slow answer (``/slow/<seconds>/...``) and truncated bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np
import pytest
from PIL import Image

from uedist.data.facescrub_download import FAILED_TSV, SUMMARY_JSON, download_facescrub
from uedist.data.facescrub_meta import (
    FaceRow,
    FacescrubMetadataError,
    parse_bbox,
    read_facescrub_meta,
    safe_identity_dirname,
)

REPO = Path(__file__).resolve().parents[1]
HEADER = "name\timage_id\tface_id\turl\tbbox\tsha256"
FAST = dict(workers=8, timeout=0.5, retries=1, backoff=0.02, progress=False)


# ----------------------------------------------------------------------------------------------- test server


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _make_images() -> Dict[str, bytes]:
    """Small images in every mode the downloader must handle."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)  # (H, W, C)
    yy, xx = np.mgrid[0:60, 0:80]
    smooth = np.stack([xx * 3, yy * 4, (xx + yy) * 2], -1).astype(np.uint8)
    gray = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    rgba = np.concatenate([rng.integers(0, 256, (30, 30, 3)), np.tile(np.arange(30) * 8, (30, 1))[..., None]], -1)
    gray16 = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)
    pal = Image.fromarray(gray[:20, :20] // 64 * 64, "L").convert("P")
    jpeg = _encode(Image.fromarray(smooth, "RGB"), "JPEG", quality=90)
    return {
        "rgb.png": _encode(Image.fromarray(rgb, "RGB"), "PNG"),
        "smooth.jpg": jpeg,
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "gray.png": _encode(Image.fromarray(gray, "L"), "PNG"),
        "rgba.png": _encode(Image.fromarray(rgba.astype(np.uint8), "RGBA"), "PNG"),
        "gray16.png": _encode(Image.fromarray(gray16), "PNG"),
        "cmyk.jpg": _encode(Image.fromarray(smooth, "RGB").convert("CMYK"), "JPEG", quality=95),
        "palette.png": _encode(pal, "PNG", transparency=0),
    }


class _Handler(BaseHTTPRequestHandler):
    root: Path  # set on the subclass made by the fixture
    hits: Counter
    lock: threading.Lock

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, code: int, body: bytes) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout test)
            pass

    def _file(self, name: str) -> bytes:
        path = self.root / name
        return path.read_bytes() if re.fullmatch(r"[\w.]+", name) and path.is_file() else b""

    def do_GET(self) -> None:
        with self.lock:
            self.hits[self.path] += 1
            n_hits = self.hits[self.path]
        parts = self.path.strip("/").split("/")
        kind, name = parts[0], parts[-1]
        if kind == "img" and self._file(name):
            self._send(200, self._file(name))
        elif kind == "flaky" and n_hits <= int(parts[1]):
            self._send(500, b"try again")
        elif kind == "flaky":
            self._send(200, self._file(name))
        elif kind == "redirect":
            target = "file:///etc/passwd" if parts[1] == "file" else f"/img/{name}"
            try:
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except OSError:
                pass
        elif kind == "slow":
            time.sleep(float(parts[1]))
            self._send(200, self._file(name))
        else:
            self._send(404, b"not found")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """``(base_url, {name: bytes})`` of a ThreadingHTTPServer on 127.0.0.1, random port."""
    root = tmp_path_factory.mktemp("served")
    images = _make_images()
    for name, data in images.items():
        (root / name).write_bytes(data)
    handler = type("Handler", (_Handler,), {"root": root, "hits": Counter(), "lock": threading.Lock()})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", images
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch) -> None:
    """Requests must go straight to 127.0.0.1 even where a proxy is configured."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _row(name: str, face_id: int, url: str, bbox, data: bytes = b"", sha: str = "") -> FaceRow:
    return FaceRow(
        name, 1000 + face_id, face_id, url, tuple(bbox), sha or hashlib.sha256(data).hexdigest(), f"test:{face_id}"
    )


def _expected_rgb(data: bytes) -> np.ndarray:
    """Reference decode: (H, W, 3) uint8 of a served image, alpha over white, 16-bit grey scaled by /257."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode == "I;16":
            grey = np.rint(np.asarray(img, dtype=np.float64) / 257.0).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=-1)
        if img.mode in ("RGBA", "P"):
            rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
            alpha = rgba[..., 3:] / 255.0
            return np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        return np.asarray(img.convert("RGB"))


def _crop(arr: np.ndarray, bbox) -> np.ndarray:
    x1, y1, x2, y2 = bbox
    return arr[max(y1, 0) : y2, max(x1, 0) : x2]  # numpy slicing clips at the far edges


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "RGB"
        return np.asarray(img)


def _tsv(path: Path) -> List[Dict[str, str]]:
    header, *lines = path.read_text(encoding="utf-8").splitlines()
    return [dict(zip(header.split("\t"), line.split("\t"), strict=True)) for line in lines]


# ----------------------------------------------------------------------------------------------- metadata


def _write(path: Path, lines: List[str], newline: str = "\n") -> Path:
    path.write_text(newline.join(lines) + newline, encoding="utf-8")
    return path


def _meta_line(
    name="Alec Baldwin", image_id="1", face_id="2", url="http://x.org/a.jpg", bbox="1,2,30,40", sha="a" * 64
) -> str:
    return "\t".join([name, image_id, face_id, url, bbox, sha])


def test_parse_with_and_without_header(tmp_path):
    plain = _write(tmp_path / "plain.txt", [_meta_line(), _meta_line(face_id="3", sha="B" * 64)])
    headed = _write(tmp_path / "headed.txt", [HEADER, "", _meta_line(name="Peri Gilpin", face_id="4")], "\r\n")
    rows, bad = read_facescrub_meta([plain, headed])
    assert bad == []
    assert [r.face_id for r in rows] == [2, 3, 4]
    assert rows[0] == FaceRow("Alec Baldwin", 1, 2, "http://x.org/a.jpg", (1, 2, 30, 40), "a" * 64, f"{plain}:1")
    assert rows[1].sha256 == "b" * 64
    assert rows[2].source == f"{headed}:3" and rows[2].name == "Peri Gilpin"


@pytest.mark.parametrize(
    "line, kind",
    [
        ("Alec Baldwin\t1\t2\thttp://x.org/a.jpg\t1,2,30,40", "malformed"),
        (_meta_line(image_id="x1"), "malformed"),
        (_meta_line(face_id="-2"), "malformed"),
        (_meta_line(sha="abc"), "malformed"),
        (_meta_line(url="file:///etc/passwd"), "malformed"),
        (_meta_line(bbox="30,2,10,40"), "bad bbox"),
        (_meta_line(bbox="1,40,30,40"), "bad bbox"),
        (_meta_line(bbox="-1,2,30,40"), "bad bbox"),
        (_meta_line(bbox="1,2,30"), "bad bbox"),
        (_meta_line(bbox="1,2,3x,40"), "bad bbox"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, kind):
    meta = _write(tmp_path / "meta.txt", [_meta_line(), line, _meta_line(face_id="9")])
    with pytest.raises(FacescrubMetadataError, match=re.escape(f"{meta}:2: {kind}")) as info:
        read_facescrub_meta(meta)
    assert isinstance(info.value, ValueError) and info.value.source == f"{meta}:2"
    rows, bad = read_facescrub_meta(meta, skip_bad=True)
    assert [r.face_id for r in rows] == [2, 9]
    assert len(bad) == 1 and bad[0].source == f"{meta}:2" and bad[0].kind == kind and bad[0].text == line


def test_parse_bbox():
    assert parse_bbox(" 463,450, 1785,1772 ") == (463, 450, 1785, 1772)
    for text in ("", "1,2,3", "1.5,2,3,4", "5,5,5,9", "0,0,-1,4"):
        with pytest.raises(ValueError):
            parse_bbox(text)


def test_safe_identity_dirname():
    assert safe_identity_dirname("Alec Baldwin") == "Alec_Baldwin"
    assert safe_identity_dirname("  Jean-Claude Van Damme ") == "Jean-Claude_Van_Damme"
    assert safe_identity_dirname("Lupita Nyong'o") == "Lupita_Nyong_o"
    assert safe_identity_dirname("Zoë Saldaña") == "Zo__Salda_a"
    for name in ("../../etc", "a/../../b", "/etc/passwd", "..x", "C:\\Windows"):
        safe = safe_identity_dirname(name)
        assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", safe) and os.sep not in safe, safe
    for name in ("", ".", "..", "   ", "/", "../..", "???"):
        with pytest.raises(ValueError):
            safe_identity_dirname(name)


def _shared_data() -> Path:
    env = os.environ.get("UEDIST_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def test_real_subset12_counts():
    folder = _shared_data() / "facescrub_meta_subset12"
    if not folder.is_dir():
        pytest.skip(f"real FaceScrub metadata not present at {folder}")
    rows, bad = read_facescrub_meta([folder / "facescrub_actors.txt", folder / "facescrub_actresses.txt"])
    expected = {  # from its SOURCE.txt
        "Alec Baldwin": 271,
        "Bill Hader": 269,
        "Daniel Radcliffe": 256,
        "Gerard Butler": 238,
        "Michael Vartan": 225,
        "Steve Carell": 290,
        "America Ferrera": 286,
        "Angie Harmon": 256,
        "Fran Drescher": 289,
        "Kristin Chenoweth": 318,
        "Lorraine Bracco": 211,
        "Peri Gilpin": 195,
    }
    assert bad == [] and dict(Counter(r.name for r in rows)) == expected
    assert len({(safe_identity_dirname(r.name), r.face_id) for r in rows}) == len(rows)  # no two crops collide
    crops = _shared_data() / "facescrub_crops6" / "images"
    if crops.is_dir():  # the same folder naming as the published crops
        assert {p.name for p in crops.iterdir()} <= {safe_identity_dirname(n) for n in expected}


# ----------------------------------------------------------------------------------------------- download


def _main_rows(base: str, images: Dict[str, bytes], token: str) -> Dict[str, FaceRow]:
    """One row per case; ``token`` keeps the flaky counters of different tests apart."""
    img = images
    return {
        "rgb": _row("Alpha Person", 1, f"{base}/img/rgb.png", (10, 5, 40, 35), img["rgb.png"]),
        "clipped": _row("Alpha Person", 2, f"{base}/img/rgb.png", (50, 40, 100, 100), img["rgb.png"]),
        "jpeg": _row("Alpha Person", 3, f"{base}/img/smooth.jpg", (0, 0, 80, 60), img["smooth.jpg"]),
        "cmyk": _row("Beta", 4, f"{base}/img/cmyk.jpg", (5, 5, 30, 30), img["cmyk.jpg"]),
        "gray": _row("Beta", 5, f"{base}/img/gray.png", (3, 4, 33, 24), img["gray.png"]),
        "rgba": _row("Beta", 6, f"{base}/img/rgba.png", (0, 0, 20, 25), img["rgba.png"]),
        "gray16": _row("Beta", 7, f"{base}/img/gray16.png", (2, 2, 30, 30), img["gray16.png"]),
        "palette": _row("Beta", 8, f"{base}/img/palette.png", (0, 0, 20, 20), img["palette.png"]),
        "retry": _row("Beta", 9, f"{base}/flaky/1/{token}/rgb.png", (0, 0, 8, 8), img["rgb.png"]),
        "resume": _row("Beta", 10, f"{base}/flaky/2/{token}/rgb.png", (0, 0, 8, 8), img["rgb.png"]),
        "evil": _row("../../etc", 11, f"{base}/img/rgb.png", (0, 0, 16, 16), img["rgb.png"]),
        "404": _row("Gamma", 20, f"{base}/missing/rgb.png", (0, 0, 8, 8), img["rgb.png"]),
        "slow": _row("Gamma", 21, f"{base}/slow/1.0/rgb.png", (0, 0, 8, 8), img["rgb.png"]),
        "sha": _row("Gamma", 22, f"{base}/img/rgb.png", (0, 0, 8, 8), img["gray.png"]),
        "corrupt": _row("Gamma", 23, f"{base}/img/truncated.jpg", (0, 0, 8, 8), img["truncated.jpg"]),
        "outside": _row("Gamma", 24, f"{base}/img/rgb.png", (100, 100, 120, 120), img["rgb.png"]),
        "scheme": _row("Gamma", 25, "file:///etc/passwd", (0, 0, 8, 8), b""),
    }


FIRST_RUN_FAILURES = {
    "404": "http 404",
    "slow": "timeout",
    "sha": "sha256 mismatch",
    "corrupt": "decode error",
    "outside": "bbox outside image",
    "scheme": "unsupported url scheme",
    "resume": "http 500",
}


def test_download_crops_failures_and_resume(server, tmp_path):
    base, images = server
    cases = _main_rows(base, images, uuid.uuid4().hex)
    out = tmp_path / "deep" / "out"
    stale = out / "Beta" / ".4.png.abc.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a killed run")

    s1 = download_facescrub(list(cases.values()), out, image_format="png", **FAST)

    ok = [k for k in cases if k not in FIRST_RUN_FAILURES]
    assert (s1.total, s1.downloaded, s1.skipped_existing, s1.failed) == (len(cases), len(ok), 0, 7)
    assert {f.source: f.reason for f in s1.failures} == {cases[k].source: r for k, r in FIRST_RUN_FAILURES.items()}
    assert not stale.exists()
    for key in ok:
        row = cases[key]
        got = _read(out / safe_identity_dirname(row.name) / f"{row.face_id}.png")
        want = _crop(_expected_rgb(images[Path(row.url).name]), row.bbox)
        assert got.shape == want.shape, key
        assert np.abs(got.astype(int) - want).max() <= 1, key  # alpha compositing may round differently
    assert _read(out / "Alpha_Person" / "2.png").shape == (8, 14, 3)  # bbox clipped to the 64x48 image
    assert _read(out / "Alpha_Person" / "1.png").shape == (30, 30, 3)
    exact = _crop(_expected_rgb(images["rgb.png"]), (10, 5, 40, 35))
    assert np.array_equal(_read(out / "Alpha_Person" / "1.png"), exact)  # lossless in, lossless out
    failed = {r["source"]: r for r in _tsv(out / FAILED_TSV)}
    assert failed[cases["404"].source]["reason"] == "http 404" and failed[cases["404"].source]["face_id"] == "20"
    assert failed[cases["slow"].source]["url"] == cases["slow"].url
    report = json.loads((out / SUMMARY_JSON).read_text())
    assert report["failed_by_reason"]["timeout"] == 1 and report["downloaded"] == len(ok)
    assert report["per_identity"]["Gamma"] == 0

    s2 = download_facescrub(list(cases.values()), out, image_format="png", **FAST)

    assert (s2.downloaded, s2.skipped_existing, s2.failed) == (1, len(ok), 6)  # the flaky row now succeeds
    assert (out / "Beta" / "10.png").is_file()
    assert cases["resume"].source not in {r["source"] for r in _tsv(out / FAILED_TSV)}
    assert json.loads((out / SUMMARY_JSON).read_text())["skipped_existing"] == len(ok)


def test_nothing_written_outside_out_dir(server, tmp_path):
    base, images = server
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "a" / "b" / "out"
    out.mkdir(parents=True)
    (out / "Evil").symlink_to(outside, target_is_directory=True)
    url, data = f"{base}/img/rgb.png", images["rgb.png"]
    names = ["../../etc", "a/../../b", "/tmp/x", "..", "Evil", "../outside"]
    rows = [_row(name, i, url, (0, 0, 8, 8), data) for i, name in enumerate(names)]
    summary = download_facescrub(rows, out, **FAST)
    reasons = {f.name: f.reason for f in summary.failures}
    assert reasons == {"..": "bad identity name", "Evil": "unsafe path"}
    assert list(outside.iterdir()) == []
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(os.path.commonpath([p.resolve(), out.resolve()]) == str(out.resolve()) for p in written)
    assert (out / "___.._etc" / "0.jpg").is_file()


def test_duplicates_redirects_and_size_limit(server, tmp_path):
    base, images = server
    url, data = f"{base}/img/rgb.png", images["rgb.png"]
    rows = [
        _row("Delta", 1, url, (0, 0, 8, 8), data),
        _row("Delta", 1, url, (0, 0, 9, 9), data),
        _row("Delta", 2, f"{base}/redirect/ok/rgb.png", (0, 0, 8, 8), data),
        _row("Delta", 3, f"{base}/redirect/file/rgb.png", (0, 0, 8, 8), data),
    ]
    summary = download_facescrub(rows, tmp_path / "out", **FAST)
    assert summary.downloaded == 2 and (tmp_path / "out" / "Delta" / "2.jpg").is_file()
    assert [f.reason for f in summary.failures] == ["duplicate target", "http 302"]  # file: redirect refused
    small = download_facescrub(rows[:1], tmp_path / "small", max_bytes=100, **FAST)
    assert [f.reason for f in small.failures] == ["too large"]


def test_jpeg_output_close_to_pil_crop(server, tmp_path):
    base, images = server
    bbox = (4, 6, 70, 50)
    row = _row("Eps", 1, f"{base}/img/smooth.jpg", bbox, images["smooth.jpg"])
    summary = download_facescrub([row], tmp_path / "out", jpeg_quality=95, **FAST)
    assert summary.downloaded == 1
    got = _read(tmp_path / "out" / "Eps" / "1.jpg")
    want = _crop(_expected_rgb(images["smooth.jpg"]), bbox)
    assert got.shape == want.shape == (44, 66, 3)
    assert np.abs(got.astype(int) - want).mean() < 3


@pytest.mark.slow
def test_launch_script_subprocess(server, tmp_path):
    base, images = server
    rows = [
        _row("Zeta One", 1, f"{base}/img/rgb.png", (0, 0, 10, 12), images["rgb.png"]),
        _row("Zeta One", 2, f"{base}/missing/x.png", (0, 0, 10, 12), images["rgb.png"]),
        _row("Zeta Two", 3, f"{base}/img/gray.png", (1, 1, 11, 11), images["gray.png"]),
    ]
    lines = [
        "\t".join([r.name, str(r.image_id), str(r.face_id), r.url, ",".join(map(str, r.bbox)), r.sha256]) for r in rows
    ]
    meta = _write(tmp_path / "facescrub_actors.txt", [HEADER] + lines + [_meta_line(bbox="9,9,1,1")])
    out = tmp_path / "crops"
    env = {**os.environ, "PYTHONPATH": str(REPO), "no_proxy": "127.0.0.1,localhost"}
    env = {k: v for k, v in env.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    cmd = [
        sys.executable,
        str(REPO / "launch" / "facescrub_download.py"),
        "--meta",
        str(meta),
        "--out",
        str(out),
        "--workers",
        "4",
        "--timeout",
        "2",
        "--retries",
        "0",
        "--no-progress",
    ]

    strict = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert strict.returncode == 2 and f"{meta}:5: bad bbox" in strict.stderr

    done = subprocess.run(
        cmd + ["--skip-bad-rows", "--min-images", "1"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert (out / "Zeta_One" / "1.jpg").is_file() and (out / "Zeta_Two" / "3.jpg").is_file()
    assert str(out.resolve()) in done.stdout and "1 of 3 rows failed" in done.stdout
    assert [r["reason"] for r in _tsv(out / FAILED_TSV)] == ["http 404"]
    assert [r["source"] for r in _tsv(out / "bad_metadata_rows.tsv")] == [f"{meta}:5"]

    again = subprocess.run(
        cmd + ["--skip-bad-rows", "--min-images", "2"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert again.returncode == 1 and "Zeta_Two" in again.stderr
    assert json.loads((out / SUMMARY_JSON).read_text())["skipped_existing"] == 2
