"""An interactive page: one model of any task, a patch-size slider, the prediction and its cost at that size.

    python -m tools.demo --workdir runs/fashion_mnist          # then open http://127.0.0.1:7860
    python -m tools.demo --workdir runs/seg --port 8000 --patch-sizes 16 12 8 6 4 --examples scenes/
    python -m tools.demo --workdir runs/det_scenes_flexi --examples photos/

Upload an image (or pick one of ``--examples``), move the slider: the page shows what the workdir's task predicts at
that patch size (its ``Task.predict``, the same as ``tools.predict``): the summary line, the record (JSON), and the
task's picture: a colour map laid over the image (segmentation, panoptic) with its legend, or the image with boxes
drawn on it (detection). Tasks that take text queries (detection, contrastive) get a query box. Beside it: the token
grid, the GFLOPs of the task's forward at the config's image size, and the latency of the whole prediction measured
on this machine (median of 3 calls). The model is rebuilt from the checkpoint alone: no dataset is read. A small
Flask app with one HTML page of plain JavaScript: nothing is fetched from the internet, so it starts offline.

``POST /api/predict`` takes a JSON object ``{"patch_size": P, "image": "data:image/...;base64,..."}`` or
``{"patch_size": P, "example": I}`` (P one of the slider's sizes, I an index into ``--examples``), plus
``"queries": ["a bag", ...]`` for a task that takes queries. It answers ``summary``, ``record``, ``image`` (a PNG data
URL or null), ``overlay``, ``legend``, ``latency_ms``, ``gflops``, ``patch_size`` and ``grid``. Requests are capped
at ``MAX_UPLOAD_BYTES`` (20 MiB: a large photo as a base64 data URL); every error is answered as JSON
``{"error": ...}`` with a 4xx status (413 for a request over the cap, 400 for a bad body, patch size or image).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from tasks.common.images import ImageError, open_image
from tools.arguments import int_at_least, positive_int
from tools.eval import check_patch_sizes, open_run
from tools.lib.profiling import count_gflops_fn
from tools.predict import list_images, run_predict

MAX_UPLOAD_BYTES = 20 * 2**20  # Flask's MAX_CONTENT_LENGTH: larger requests are refused with 413 before parsing
LATENCY_REPEATS = 3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a training workdir of any task that predicts")
    parser.add_argument("--config", help="a config file to use instead of the workdir's config.json")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument(
        "--patch-sizes", nargs="+", type=positive_int, help="the slider's stops (default: eval.patch_sizes)"
    )
    parser.add_argument("--examples", nargs="+", default=[], help="image files and folders the page offers")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int_at_least(0, "0 picks a free port"), default=7860)
    return parser.parse_args(argv)


def png_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class DemoModel:
    """What the page asks for, computed: the task's prediction of one image at one patch size, and its cost."""

    def __init__(self, workdir, config_path=None, overrides=(), patch_sizes=None, examples=()):
        self.run = open_run(workdir, config_path, overrides)
        task, config = self.run.task, self.run.config
        if task.predict is None:
            raise SystemExit(f"tools.demo cannot show task {task.name}: {task.predict_refusal}")
        self.task_name = task.name
        self.takes_queries = "queries" in task.predict_options
        size = config.data.image_size
        self.image_size = [size, size] if isinstance(size, int) else list(size)
        given = "--patch-sizes" if patch_sizes else "the config's eval.patch_sizes"
        sizes = patch_sizes or config.eval.patch_sizes
        self.patch_sizes = check_patch_sizes(sizes, self.image_size, given, task.token_grid)
        if not all(isinstance(p, int) for p in self.patch_sizes):
            raise SystemExit(f"the demo's slider takes square patch sizes; got {self.patch_sizes} (give --patch-sizes)")
        try:
            self.examples = [open_image(path) for path in list_images(examples)] if examples else []
        except ImageError as error:
            raise SystemExit(f"--examples: {error}") from None
        self._gflops = {}

    def image_from_upload(self, data_url: str) -> Image.Image:
        """The RGB image of a base64 data URL; ``ValueError`` naming what is wrong with it."""
        try:
            raw = base64.b64decode(data_url.split(",", 1)[-1], validate=True)
        except binascii.Error as e:
            raise ValueError(f"image: not a base64 data URL ({e})") from e
        return open_image(raw, "(upload)")

    def gflops(self, patch: int) -> float:
        """GFLOPs per image of the task's forward at ``patch`` on an image of the config's size."""
        if patch not in self._gflops:
            forward = self.run.task.image_forward(self.run.model)
            x = torch.zeros(1, 3, *self.image_size)
            self._gflops[patch] = count_gflops_fn(lambda images: forward(images, patch_size=patch), x)
        return self._gflops[patch]

    def predict(self, image: Image.Image, patch: int, options: dict | None = None) -> dict:
        """The page's answer for ``image`` at ``patch``: the task's prediction, the grid and the measured cost."""
        if patch not in self.patch_sizes:
            raise ValueError(f"patch size {patch} is not one of the slider's {self.patch_sizes}")
        options = options or {}
        p = run_predict(self.run, [image], patch, options)[0]  # also the warm-up of the timing below
        times = []
        for _ in range(LATENCY_REPEATS):
            start = time.perf_counter()
            run_predict(self.run, [image], patch, options)
            times.append(1e3 * (time.perf_counter() - start))
        grid = self.run.task.token_grid(tuple(self.image_size), (patch, patch))  # the task knows its padding
        return {
            "patch_size": patch,
            "grid": [int(grid[0]), int(grid[1])],
            "gflops": self.gflops(patch),
            "latency_ms": statistics.median(times),
            "summary": p.summary,
            "record": p.record,
            "image": png_url(p.image) if p.image is not None else None,
            "overlay": bool(p.overlay),
            "legend": png_url(p.legend) if p.legend is not None else None,
        }


PAGE = Path(__file__).with_name("demo_page.html")  # one page of HTML and plain JavaScript, no external file


def create_app(demo: DemoModel):
    from flask import Flask, jsonify, request
    from werkzeug.exceptions import HTTPException

    app = Flask("flexivit-demo")
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_BYTES
    examples = [png_url(image) for image in demo.examples]

    @app.errorhandler(HTTPException)
    def http_error(error):  # Flask answers HTML by default (413, 404, 405, ...): the page reads JSON
        if error.code == 413:
            return jsonify(error=f"the request is larger than {MAX_UPLOAD_BYTES // 2**20} MiB"), 413
        return jsonify(error=f"{error.name}: {error.description}"), error.code

    @app.get("/")
    def page():
        return PAGE.read_text()

    @app.get("/api/info")
    def info():
        return jsonify(task=demo.task_name, patch_sizes=demo.patch_sizes, image_size=demo.image_size,
                       examples=examples, queries=demo.takes_queries)  # fmt: skip

    @app.post("/api/predict")
    def predict():
        try:
            image, patch, options = read_request(demo, request.get_json(force=True, silent=True))
            return jsonify(demo.predict(image, patch, options))
        except ValueError as error:  # ImageError included: the message names the field or the image
            return jsonify(error=str(error)), 400

    return app


def read_request(demo: DemoModel, body) -> tuple[Image.Image, int, dict]:
    """``(image, patch size, options)`` of a predict request, or ``ValueError`` naming the field that is missing or
    wrong."""
    if not isinstance(body, dict):
        raise ValueError('the body must be a JSON object like {"patch_size": 8, "image": "data:image/png;base64,..."}')
    unknown = sorted(set(body) - {"patch_size", "example", "image", "queries"})
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; the fields are patch_size, image, example and queries")
    if "patch_size" not in body:
        raise ValueError(f"patch_size is missing: one of {demo.patch_sizes}")
    patch = body["patch_size"]
    # bool is an int to Python, and 8.9 must not become 8: only the slider's exact sizes are accepted.
    if type(patch) is not int or patch not in demo.patch_sizes:
        raise ValueError(f"patch size {patch!r} is not one of the slider's sizes {demo.patch_sizes}")
    options = {}
    queries = body.get("queries")
    if queries:  # an empty box: the task's default queries (its class names)
        if not demo.takes_queries:
            raise ValueError(f"task {demo.task_name} takes no queries")
        if not isinstance(queries, list) or not all(isinstance(q, str) and q.strip() for q in queries):
            raise ValueError(f"queries must be a list of non-empty strings, got {queries!r}")
        options["queries"] = [q.strip() for q in queries]
    if "image" in body and "example" in body:
        raise ValueError("give either example or image, not both")
    if "image" in body:
        if not isinstance(body["image"], str):
            raise ValueError(f"image must be a base64 data URL string, got {type(body['image']).__name__}")
        return demo.image_from_upload(body["image"]), patch, options
    if "example" not in body:
        raise ValueError("image is missing: give a base64 data URL" + (" or an example" if demo.examples else ""))
    index, count = body["example"], len(demo.examples)
    if type(index) is not int or not 0 <= index < count:
        have = f"give an index 0..{count - 1}" if count else "this demo has none (start it with --examples)"
        raise ValueError(f"example {index!r} does not exist: {have}")
    return demo.examples[index], patch, options


def main(argv=None) -> None:
    args = parse_args(argv)
    demo = DemoModel(args.workdir, args.config, args.set, args.patch_sizes, args.examples)
    print(f"FlexiViT demo: http://{args.host}:{args.port}  ({demo.task_name}, patch sizes {demo.patch_sizes})")
    create_app(demo).run(host=args.host, port=args.port, threaded=False)


if __name__ == "__main__":
    main()
