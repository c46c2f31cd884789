"""An interactive page: one model, a patch-size slider, the prediction, its cost and where the model looks.

    python -m tools.demo --workdir runs/fashion_mnist          # then open http://127.0.0.1:7860
    python -m tools.demo --workdir runs/seg --port 8000 --patch-sizes 16 12 8 6 4

Pick a validation image or upload one, move the slider: the page shows the prediction at that patch size
(classification: top-5 classes; segmentation: the mask over the image), the latency measured on this machine for
that image (median of 5 calls) and the GFLOPs, the token grid drawn over the image, and the class token's attention
relevance (flexivit.analysis). A small Flask app with one HTML page of plain JavaScript: nothing is fetched from
the internet, so it starts offline.

``POST /api/predict`` takes a JSON object ``{"patch_size": P, "example": I}`` or ``{"patch_size": P, "image":
"data:image/...;base64,..."}`` (P one of the slider's sizes, I a validation image's index). Requests are capped at
``MAX_UPLOAD_BYTES`` (20 MiB: a large photo as a base64 data URL); every error is answered as JSON ``{"error": ...}``
with a 4xx status (413 for a request over the cap, 400 for a bad body, patch size or image).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import importlib
import io
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flexivit import analysis
from tasks.common.deployment import backbone_of
from tasks.common.images import open_image
from tasks.common.profiling import count_gflops_fn
from tools.analyze import validation_images
from tools.arguments import int_at_least, positive_int
from tools.eval import check_patch_sizes, load_task_model, task_token_grid, workdir_source

NUM_EXAMPLES = 8
MAX_UPLOAD_BYTES = 20 * 2**20  # Flask's MAX_CONTENT_LENGTH: larger requests are refused with 413 before parsing


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a classification or segmentation workdir")
    parser.add_argument("--config", help="a config file to use instead of the workdir's config.json")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument(
        "--patch-sizes", nargs="+", type=positive_int, help="the slider's stops (default: eval.patch_sizes)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int_at_least(0, "0 picks a free port"), default=7860)
    return parser.parse_args(argv)


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    x = image.permute(1, 2, 0).float()
    x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-8)
    return (x.numpy() * 255).round().astype(np.uint8)


class DemoModel:
    """What the page asks for, computed: the prediction, cost and relevance of one image at one patch size."""

    def __init__(self, workdir, config_path=None, overrides=(), patch_sizes=None):
        self.config, checkpoint = workdir_source(workdir, config_path, overrides)
        self.task_name = self.config.task
        if self.task_name not in ("classification", "segmentation"):
            raise SystemExit(f"tools.demo shows classification and segmentation workdirs, not {self.task_name}")
        task = importlib.import_module(f"tasks.{self.task_name}")
        self.image_size = self.config.data.image_size
        given = "--patch-sizes" if patch_sizes else "the config's eval.patch_sizes"
        sizes = patch_sizes or self.config.eval.patch_sizes
        self.patch_sizes = check_patch_sizes(sizes, self.image_size, given, task_token_grid(task))
        if not all(isinstance(p, int) for p in self.patch_sizes):
            raise SystemExit(f"the demo's slider takes square patch sizes; got {self.patch_sizes} (give --patch-sizes)")
        _, _, val_set, info = task.build_datasets(self.config.data)
        self.model = load_task_model(task, self.config, info, checkpoint).eval()
        self.backbone = backbone_of(self.model)
        self.classes = list(info)
        self.examples = validation_images(val_set, NUM_EXAMPLES, self.image_size)
        from tasks.common.transforms import data_eval_transform

        self.transform = data_eval_transform(self.config.data, crop_ratio=1.0)
        self.token_grid = task_token_grid(task)
        self._gflops = {}

    def image_from_upload(self, data_url: str) -> torch.Tensor:
        """The eval-transformed image of a base64 data URL; ``ValueError`` naming what is wrong with it."""
        try:
            raw = base64.b64decode(data_url.split(",", 1)[-1], validate=True)
        except binascii.Error as e:
            raise ValueError(f"image: not a base64 data URL ({e})") from e
        return self.transform(open_image(raw, "(upload)"))

    @torch.no_grad()
    def logits(self, image: torch.Tensor, patch: int) -> torch.Tensor:
        return self.model(image[None], patch_size=patch)[0].float()

    def gflops(self, patch: int) -> float:
        if patch not in self._gflops:
            example = self.examples[:1]
            self._gflops[patch] = count_gflops_fn(lambda x: self.model(x, patch_size=patch), example)
        return self._gflops[patch]

    def latency_ms(self, image: torch.Tensor, patch: int, repeats: int = 5) -> float:
        times = []
        with torch.inference_mode():
            self.model(image[None], patch_size=patch)  # warm-up
            for _ in range(repeats):
                start = time.perf_counter()
                self.model(image[None], patch_size=patch)
                times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)

    def relevance(self, image: torch.Tensor, patch: int) -> torch.Tensor:
        if self.backbone.head is not None:
            return analysis.attention_relevance(self.backbone, image[None], patch)[0]
        return analysis.attention_rollout(self.backbone, image[None], patch)[0]

    def predict(self, image: torch.Tensor, patch: int) -> dict:
        if patch not in self.patch_sizes:
            raise ValueError(f"patch size {patch} is not one of the slider's {self.patch_sizes}")
        h, w = image.shape[-2:]
        grid = self.token_grid((h, w), (patch, patch))  # no extra forward: the task knows its grid (padding or not)
        logits = self.logits(image, patch)
        result = {"patch_size": patch, "grid": [int(grid[0]), int(grid[1])], "gflops": self.gflops(patch),
                  "latency_ms": self.latency_ms(image, patch)}  # fmt: skip
        if self.task_name == "classification":
            probs = logits.softmax(-1)
            top = probs.topk(min(5, len(self.classes)))
            result["prediction"] = [
                {"label": self.classes[i], "score": round(float(p), 4)}
                for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            ]
        else:
            from tools.predict import palette

            labels = logits.argmax(0).numpy()
            colours = palette(len(self.classes))
            result["overlay"] = _png(colours[labels])
            present = np.unique(labels)
            result["prediction"] = [{"label": self.classes[c], "score": round(float((labels == c).mean()), 4)}
                                    for c in present]  # fmt: skip
        rel = self.relevance(image, patch)
        heat = F.interpolate(rel[None, None], size=(h, w), mode="nearest")[0, 0]
        heat = (heat / heat.max().clamp(min=1e-12)).numpy()
        rgba = np.zeros((h, w, 4), np.uint8)
        rgba[..., 0], rgba[..., 3] = 255, (heat * 150).astype(np.uint8)  # red, opaque where relevant
        result["relevance"] = _png(rgba)
        return result


PAGE = Path(__file__).with_name("demo_page.html")  # one page of HTML and plain JavaScript, no external file


def create_app(demo: DemoModel):
    from flask import Flask, jsonify, request
    from werkzeug.exceptions import HTTPException

    app = Flask("flexivit-demo")
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_BYTES
    examples = [_png(_to_uint8(image)) for image in demo.examples]

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
                       examples=examples)  # fmt: skip

    @app.post("/api/predict")
    def predict():
        try:
            image, patch = read_request(demo, request.get_json(force=True, silent=True))
        except ValueError as error:  # ImageError included: the message names the field or the image
            return jsonify(error=str(error)), 400
        return jsonify(demo.predict(image, patch))

    return app


def read_request(demo: DemoModel, body) -> tuple[torch.Tensor, int]:
    """``(image, patch size)`` of a predict request, or ``ValueError`` naming the field that is missing or wrong."""
    if not isinstance(body, dict):
        raise ValueError('the body must be a JSON object like {"patch_size": 8, "example": 0}')
    unknown = sorted(set(body) - {"patch_size", "example", "image"})
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; the fields are patch_size, example and image")
    if "patch_size" not in body:
        raise ValueError(f"patch_size is missing: one of {demo.patch_sizes}")
    patch = body["patch_size"]
    # bool is an int to Python, and 8.9 must not become 8: only the slider's exact sizes are accepted.
    if type(patch) is not int or patch not in demo.patch_sizes:
        raise ValueError(f"patch size {patch!r} is not one of the slider's sizes {demo.patch_sizes}")
    if "image" in body and "example" in body:
        raise ValueError("give either example or image, not both")
    if "image" in body:
        if not isinstance(body["image"], str):
            raise ValueError(f"image must be a base64 data URL string, got {type(body['image']).__name__}")
        return demo.image_from_upload(body["image"]), patch
    index = body.get("example", 0)
    if type(index) is not int or not 0 <= index < len(demo.examples):
        raise ValueError(f"example {index!r} does not exist: give an index 0..{len(demo.examples) - 1}")
    return demo.examples[index], patch


def main(argv=None) -> None:
    args = parse_args(argv)
    demo = DemoModel(args.workdir, args.config, args.set, args.patch_sizes)
    print(f"FlexiViT demo: http://{args.host}:{args.port}  ({demo.task_name}, patch sizes {demo.patch_sizes})")
    create_app(demo).run(host=args.host, port=args.port, threaded=False)


if __name__ == "__main__":
    main()
