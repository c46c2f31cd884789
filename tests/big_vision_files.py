"""Write big_vision-format checkpoints with random weights, in the layout of docs/reference.md §4 (flax shapes)."""

import numpy as np


def random_big_vision_params(
    width=32, depth=2, heads=2, mlp=64, num_classes=5, kernel=32, grid=7, channels=3, seed=0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    r = lambda *shape, scale=0.2: (rng.standard_normal(shape) * scale).astype(np.float32)  # noqa: E731
    hd = width // heads
    p = {
        "embedding/kernel": r(kernel, kernel, channels, width, scale=0.05),  # HWIO
        "embedding/bias": r(width),
        "pos_embedding": r(1, grid * grid, width, scale=0.5),
        "cls": r(1, 1, width),
        "Transformer/encoder_norm/scale": 1 + r(width),
        "Transformer/encoder_norm/bias": r(width),
        "head/kernel": r(width, num_classes),
        "head/bias": r(num_classes),
    }
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_1"):
            p[b + f"{ln}/scale"], p[b + f"{ln}/bias"] = 1 + r(width), r(width)
        for n in ("query", "key", "value"):
            p[b + f"MultiHeadDotProductAttention_0/{n}/kernel"] = r(width, heads, hd)
            p[b + f"MultiHeadDotProductAttention_0/{n}/bias"] = r(heads, hd)
        p[b + "MultiHeadDotProductAttention_0/out/kernel"] = r(heads, hd, width)
        p[b + "MultiHeadDotProductAttention_0/out/bias"] = r(width)
        p[b + "MlpBlock_0/Dense_0/kernel"], p[b + "MlpBlock_0/Dense_0/bias"] = r(width, mlp), r(mlp)
        p[b + "MlpBlock_0/Dense_1/kernel"], p[b + "MlpBlock_0/Dense_1/bias"] = r(mlp, width), r(width)
    return p


def scan(params: dict[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    """The scanned layout: one ``Transformer/encoderblock/...`` array per parameter with a leading depth axis."""
    out = {k: v for k, v in params.items() if not k.startswith("Transformer/encoderblock_")}
    for k in params:
        if k.startswith("Transformer/encoderblock_0/"):
            name = k.removeprefix("Transformer/encoderblock_0/")
            out["Transformer/encoderblock/" + name] = np.stack(
                [params[f"Transformer/encoderblock_{i}/{name}"] for i in range(depth)]
            )
    return out


def as_raw_bf16(a: np.ndarray) -> np.ndarray:
    """bfloat16 the way numpy saves it: 2-byte void holding the top half of each float32 (truncated)."""
    return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view("V2")
