"""Panoptic foundations (issue 12): COCO panoptic files, UViM's canonical two-channel target, the stage I quantiser;
and the slips of issue 24: bad entries named, PQ of a validation subset, a failure under DDP, the bottleneck resize."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from markers import needs_fashion_mnist
from PIL import Image

from tasks.common import scenes
from tasks.panoptic import (
    PanopticDataError,
    PanopticDataWarning,
    VectorQuantizer,
    canonical_instances,
    code_dropout,
    read_coco_panoptic,
    write_coco_panoptic,
)

# ------------------------------------------------------------------------------------------------ canonical order


def test_canonical_order_follows_centroids_in_raster_order():
    instance = torch.zeros(6, 8, dtype=torch.long)
    instance[4:6, 0:2] = 7  # bottom left: centroid row 4.5
    instance[0:2, 5:8] = 3  # top right: row 0.5, column 6
    instance[0:2, 0:2] = 9  # top left: row 0.5, column 0.5
    instance[2:4, 3:5] = 1  # middle: row 2.5
    want = torch.zeros_like(instance)
    want[0:2, 0:2], want[0:2, 5:8], want[2:4, 3:5], want[4:6, 0:2] = 1, 2, 3, 4
    assert torch.equal(canonical_instances(instance), want)
    assert torch.equal(canonical_instances(instance, max_instances=2), torch.where(want > 2, 0, want))


def test_canonical_order_ignores_how_the_input_numbered_its_segments():
    rng = np.random.default_rng(0)
    instance = torch.from_numpy(rng.integers(0, 6, size=(12, 10)))
    reference = canonical_instances(instance)
    for seed in range(5):
        relabel = torch.from_numpy(np.random.default_rng(seed).permutation(1000)[:6] + 1)
        relabel[0] = 0  # void stays void
        assert torch.equal(canonical_instances(relabel[instance]), reference)
    # Equal centroids (a ring around a centre square): the segment whose first pixel comes first wins.
    ring = torch.full((5, 5), 4)
    ring[1:4, 1:4] = 2
    assert canonical_instances(ring).tolist()[0][0] == 1 and canonical_instances(ring)[2, 2] == 2


# ------------------------------------------------------------------------------------------------ COCO panoptic files


@pytest.fixture(scope="module")
def panoptic_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("panoptic") / "scenes"
    scenes.write_scenes(out, num_train=2, num_val=3, seed=5, spec=scenes.SceneSpec(size=48))
    return out


def split(root, name="val"):
    folder = {"val": "validation", "train": "training"}[name]
    return root / "panoptic" / f"panoptic_{name}.json", root / "panoptic" / f"panoptic_{name}", root / "images" / folder


@needs_fashion_mnist
def test_reader_labels_every_segment_with_its_class_and_one_instance(panoptic_root):
    json_path, png_dir, image_dir = split(panoptic_root)
    dataset = read_coco_panoptic(json_path, png_dir, image_dir)
    gt = json.loads(json_path.read_text())
    assert len(dataset) == 3 and dataset.category_ids == sorted(c["id"] for c in gt["categories"])
    for k, ann in enumerate(sorted(gt["annotations"], key=lambda a: a["image_id"])):
        image, semantic, instance = dataset[k]
        ids = scenes.panoptic_ids(np.asarray(Image.open(png_dir / ann["file_name"]).convert("RGB")))
        assert image.size == (48, 48) and semantic.shape == instance.shape == (48, 48)
        for number, segment in enumerate(ann["segments_info"], start=1):
            mask = torch.from_numpy(ids == segment["id"])
            assert (semantic[mask] == dataset.category_ids.index(segment["category_id"]) + 1).all()
            assert (instance[mask] == number).all()
        assert ((semantic == 0) == torch.from_numpy(ids == 0)).all() and ((instance == 0) == (semantic == 0)).all()


@needs_fashion_mnist
def test_predictions_written_as_coco_panoptic_read_back_the_same(panoptic_root, tmp_path):
    json_path, png_dir, image_dir = split(panoptic_root)
    dataset = read_coco_panoptic(json_path, png_dir, image_dir)
    predictions = []
    for k, record in enumerate(dataset.records):
        _, semantic, instance = dataset[k]
        canonical = canonical_instances(instance).numpy()
        predictions.append((record.image_id, record.image.name, semantic.numpy(), canonical))
    out = write_coco_panoptic(predictions, dataset.category_ids, tmp_path / "pred.json", tmp_path / "pred", json_path)
    again = read_coco_panoptic(out, tmp_path / "pred", image_dir)
    for k in range(len(dataset)):
        _, semantic, instance = dataset[k]
        _, semantic2, instance2 = again[k]
        assert torch.equal(semantic, semantic2)
        assert torch.equal(canonical_instances(instance), canonical_instances(instance2))
    # Segments are keyed by semantic * 1000 + instance: the same instance number in two classes is two segments.
    written = json.loads(out.read_text())["annotations"][0]["segments_info"]
    assert len(written) == len(np.unique(predictions[0][2] * 1000 + predictions[0][3])) - 1


def corrupt(root, tmp_path, change):
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    json_path, png_dir, image_dir = split(copy)
    data = json.loads(json_path.read_text())
    change(data, png_dir)
    json_path.write_text(json.dumps(data))
    return read_coco_panoptic(json_path, png_dir, image_dir)


@needs_fashion_mnist
def test_bad_panoptic_files_are_named(panoptic_root, tmp_path):
    def drop_segment(data, _):
        data["annotations"][0]["segments_info"].pop(0)

    def extra_segment(data, _):
        data["annotations"][0]["segments_info"].append(dict(data["annotations"][0]["segments_info"][0], id=424242))

    def unknown_category(data, _):
        data["annotations"][1]["segments_info"][0]["category_id"] = 999

    def resized_png(data, png_dir):
        png = png_dir / data["annotations"][0]["file_name"]
        Image.open(png).resize((40, 40), Image.NEAREST).save(png)

    annotations = json.loads(split(panoptic_root)[0].read_text())["annotations"]
    changed = sorted(a["image_id"] for a in annotations).index(annotations[0]["image_id"])  # its dataset index
    for change, pattern in [
        (drop_segment, r"segment id\(s\) \[\d+\] are in the PNG but not in the segments_info of image"),
        (extra_segment, r"lists segment id\(s\) \[424242\] that .*\.png does not contain"),
        (resized_png, r"\.png: the PNG is 40x40, its image \d+ is 48x48"),
    ]:
        dataset = corrupt(panoptic_root, tmp_path / change.__name__, change)
        with pytest.raises(PanopticDataError, match=pattern):
            dataset.labels(changed)
        dataset.labels((changed + 1) % len(dataset))  # the untouched images still read
    with pytest.raises(PanopticDataError, match=r"segment \d+ of image \d+ has category id 999, not one of"):
        corrupt(panoptic_root, tmp_path / "unknown", unknown_category)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(PanopticDataError, match=r"missing\.json: missing key 'categories'"):
        read_coco_panoptic(missing, tmp_path, tmp_path)


@needs_fashion_mnist
def test_every_bad_entry_is_named_with_its_file_and_images_without_annotations_are_counted(panoptic_root, tmp_path):
    json_path = split(panoptic_root)[0]
    gt = json.loads(json_path.read_text())
    name = gt["categories"][1]["name"]
    image_id = gt["annotations"][0]["image_id"]

    def set_field(where, key, value):  # value KeyError: remove the key
        def change(data, _):
            entry = where(data)
            if value is KeyError:
                del entry[key]
            else:
                entry[key] = value

        return change

    cases = [
        (set_field(lambda d: d["categories"][1], "id", KeyError), rf"category 1 \('{name}'\) lacks \['id'\]"),
        (set_field(lambda d: d["categories"][0], "id", "1"), r"category 0 \('.+'\) has id '1' \(expected int\)"),
        (set_field(lambda d: d["categories"][2], "id", gt["categories"][0]["id"]), r"category id\(s\) \[\d+\] appear"),
        (set_field(lambda d: d["images"][1], "height", "48"), r"image entry 1 has height '48' \(expected int\)"),
        (set_field(lambda d: d["categories"][0], "color", [1, 2]), r"category \d+ has color \[1, 2\] \(expected \[r"),
        (set_field(lambda d: d["annotations"][0]["segments_info"][0], "id", KeyError),
         rf"segment 0 of image {image_id} lacks \['id'\]"),
        (set_field(lambda d: d["annotations"][1], "segments_info", None), r"annotation 1 has segments_info None"),
        (set_field(lambda d: d, "categories", {}), r"'categories' must be a list, it is a dict"),
        (lambda d, _: d["annotations"].append(d["annotations"][0]), rf"annotations of image id\(s\) \[{image_id}\]"),
        (lambda d, _: d["annotations"].insert(0, 7), r"annotation 0 is not an object: 7"),
    ]  # fmt: skip
    for k, (change, pattern) in enumerate(cases):
        with pytest.raises(PanopticDataError, match=r"panoptic_val\.json: " + pattern):
            corrupt(panoptic_root, tmp_path / str(k), change)
    not_json_object = tmp_path / "list.json"
    not_json_object.write_text("[]")
    with pytest.raises(PanopticDataError, match=r"list\.json: a COCO panoptic JSON is an object, this one is a list"):
        read_coco_panoptic(not_json_object, tmp_path, tmp_path)
    # An image listed without an annotation entry has no ground truth: left out, and said so with its file name.
    unannotated = next(i["file_name"] for i in gt["images"] if i["id"] == image_id)
    with pytest.warns(PanopticDataWarning, match=rf"1 of 3 images have no annotation entry .*: {unannotated}$"):
        dataset = corrupt(panoptic_root, tmp_path / "dropped", lambda d, _: d["annotations"].pop(0))
    assert len(dataset) == 2 and image_id not in [r.image_id for r in dataset.records]


# ------------------------------------------------------------------------------------------------ vector quantiser


def test_quantiser_picks_the_nearest_normalised_codeword_and_passes_gradients_straight_through():
    vq = VectorQuantizer(16, 8, seed=1).eval()
    words = vq.codewords()
    torch.testing.assert_close(words.norm(dim=-1), torch.ones(16))
    torch.testing.assert_close(words, vq.sums / vq.sums.norm(dim=-1, keepdim=True))  # counts start at 1
    x = torch.randn(3, 5, 8, requires_grad=True)
    quantised, codes = vq(x)
    brute = torch.cdist(x.detach().reshape(-1, 8), words).argmin(-1).view(3, 5)
    assert torch.equal(codes, brute)
    torch.testing.assert_close(quantised.detach(), words[codes], rtol=0, atol=1e-6)  # x + (w - x): rounding only
    weight = torch.randn(3, 5, 8)
    (quantised * weight).sum().backward()
    assert torch.equal(x.grad, weight)  # straight through: d quantised / d x = identity
    assert torch.equal(vq.counts, torch.ones(16))  # eval mode: no dictionary update


def test_quantiser_lookup_stays_float32_under_bf16_autocast():
    # 512 unit codewords and 2,000 vectors: many nearest / second-nearest gaps are below bf16's rounding, so a
    # lookup whose matmul autocast ran in bf16 picks other codes for some of them.
    vq = VectorQuantizer(512, 32, seed=2).eval()
    x = torch.randn(2000, 32)
    brute = torch.cdist(x, vq.codewords()).argmin(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, codes = vq(x)
    assert torch.equal(codes, brute)


def test_one_ema_update_equals_a_hand_computation():
    vq = VectorQuantizer(4, 3, decay=0.9, min_count=0.0).train()
    sums, counts = vq.sums.clone(), vq.counts.clone()
    x = torch.randn(2, 6, 3)
    _, codes = vq(x)
    for k in range(4):
        assigned = x.reshape(-1, 3)[codes.reshape(-1) == k]
        torch.testing.assert_close(vq.counts[k], counts[k] * 0.9 + len(assigned))
        torch.testing.assert_close(vq.sums[k], sums[k] * 0.9 + assigned.sum(0))
    used = torch.bincount(codes.reshape(-1), minlength=4).float()
    assert vq.last_stats["codebook_max_ratio"] == pytest.approx(float(used.max() / 12))
    assert vq.last_stats["codebook_zeros_ratio"] == pytest.approx(float((used == 0).float().mean()))


def test_a_dead_code_is_reseeded_by_splitting_the_most_used_one():
    vq = VectorQuantizer(4, 3, min_count=0.1, seed=2)
    with torch.no_grad():
        vq.counts.copy_(torch.tensor([5.0, 0.05, 1.0, 2.0]))
        vq.sums.copy_(torch.arange(12.0).view(4, 3) + 1)
    before = vq.sums.clone()
    assert vq.reseed_dead_codes() == 1 and int(vq.num_splits) == 1
    assert vq.counts.tolist() == [2.5, 2.5, 1.0, 2.0]
    torch.testing.assert_close(vq.sums[0], before[0] / 2)
    ratio = vq.sums[1] / (before[0] / 2)  # the copy, perturbed per dimension within 0.1 %
    assert ((ratio - 1).abs() <= 1e-3).all() and not torch.equal(vq.sums[1], vq.sums[0])
    torch.testing.assert_close(vq.sums[2:], before[2:])
    # The perturbation is a function of (seed, splits so far): another quantiser in the same state splits the same.
    twin = VectorQuantizer(4, 3, min_count=0.1, seed=2)
    with torch.no_grad():
        twin.counts.copy_(torch.tensor([5.0, 0.05, 1.0, 2.0]))
        twin.sums.copy_(before)
    torch.rand(3)  # the global RNG does not matter
    twin.reseed_dead_codes()
    assert torch.equal(twin.sums, vq.sums)


def test_code_dropout_keeps_a_prefix_or_as_many_random_codes():
    codes = torch.ones(64, 10, 4)
    generator = torch.Generator().manual_seed(0)
    kept = code_dropout(codes, "prefix", generator)[..., 0]
    lengths = kept.sum(-1)
    for row, n in zip(kept, lengths.long(), strict=True):
        assert row[:n].all() and not row[n:].any()  # a prefix: the most important codes first
    assert lengths.min() < 3 and lengths.max() > 7  # thresholds ~ U(0, 1) reach both ends over 64 examples
    random = code_dropout(codes, "random", torch.Generator().manual_seed(0))[..., 0]
    assert torch.equal(random.sum(-1), lengths)  # the same counts, other positions
    assert not torch.equal(random, kept)
    assert torch.equal(code_dropout(codes, "none"), codes)
    with pytest.raises(ValueError, match="'none', 'prefix' or 'random'"):
        code_dropout(codes, "half")


# ------------------------------------------------------------------------------------------------ stage I oracle


def tiny_oracle(**kwargs):
    from tasks.panoptic.stage1 import Oracle

    args = dict(num_classes=4, max_instances=5, image_size=24, patch_size=4, code_len=4, dict_size=32, width=32,
                enc_depth=1, dec_depth=1, num_heads=2)  # fmt: skip
    return Oracle(**{**args, **kwargs})


def toy_targets(batch=4, size=24, seed=0):
    """Images whose rectangles carry their class as brightness, with class and instance maps."""
    g = torch.Generator().manual_seed(seed)
    semantic = torch.zeros(batch, size, size, dtype=torch.long)
    instance = torch.zeros_like(semantic)
    for b in range(batch):
        for number in range(1, 3):
            y, x = torch.randint(0, size - 8, (2,), generator=g).tolist()
            cls = int(torch.randint(1, 4, (1,), generator=g))
            semantic[b, y : y + 8, x : x + 8], instance[b, y : y + 8, x : x + 8] = cls, number
        instance[b] = canonical_instances(instance[b])
    images = (semantic.float() / 3)[:, None].expand(-1, 3, -1, -1).contiguous()
    return images, semantic, instance


def test_oracle_unpatchify_puts_each_patch_pixel_in_its_place():
    oracle = tiny_oracle()
    x = torch.randn(2, 36, 4 * 16)  # (B, 6x6 patches, channels 4 x 4 x 4)
    out = oracle._unpatchify(x, 4)
    for i, j, c, u, v in [(0, 0, 0, 0, 0), (2, 5, 3, 1, 2), (5, 1, 2, 3, 3)]:
        assert out[1, c, i * 4 + u, j * 4 + v] == x[1, i * 6 + j, c * 16 + u * 4 + v]


def test_oracle_codes_and_logits_have_the_configured_shapes_and_no_instance_is_an_empty_one_hot():
    from tasks.panoptic.stage1 import oracle_loss

    oracle = tiny_oracle()
    images, semantic, instance = toy_targets()
    out = oracle(images, semantic, instance)
    assert out["codes"].shape == (4, 4) and out["codes"].max() < 32
    assert out["semantic"].shape == (4, 4, 24, 24) and out["instance"].shape == (4, 5, 24, 24)
    # Zero-initialised heads: uniform predictions, so the loss is log K + log I exactly.
    loss, terms = oracle_loss(out, semantic, instance)
    assert terms["semantic"].item() == pytest.approx(np.log(4)) and terms["instance"].item() == pytest.approx(np.log(5))
    _, ins = oracle._one_hot(semantic, instance)
    assert ins.shape == (4, 5, 24, 24) and torch.equal(ins.argmax(1), instance) and (ins.sum(1) == 1).all()
    _, ignored = oracle._one_hot(semantic, torch.full_like(instance, -1))
    assert ignored.sum() == 0  # a negative id (ignored pixel) is an empty one-hot
    ignore_all = oracle_loss(out, semantic, torch.full_like(instance, -1))[1]["instance"]
    assert ignore_all == 0  # nothing to learn from ignored pixels (not 0 / 0)
    with pytest.raises(ValueError, match=r"semantic classes must lie in 0\.\.3"):
        oracle(images, semantic + 1, instance)
    with pytest.raises(ValueError, match="code_len 5 must be a square number"):
        tiny_oracle(code_len=5)


def test_oracle_bottleneck_resizes_as_jax_image_resize_antialiased_when_it_shrinks():
    # big_vision's UViM resizes the encoder's grid to the code grid and back with jax.image.resize(..., "linear"),
    # whose triangle kernel is widened by the factor when shrinking (tests/reference_resize.py, written from JAX's
    # scale_and_translate); plain bilinear would read only some of the tokens at 8 -> 4.
    from reference_resize import jax_bilinear_matrix, resize_2d

    oracle = tiny_oracle()
    for old, new in [(8, 4), (6, 4), (12, 6), (4, 8), (4, 6)]:
        x = torch.randn(2, old * old, 5, dtype=torch.float64)
        got = oracle._resize_grid(x, new).view(2, new, new, 5).permute(0, 3, 1, 2)
        grid = x.view(2, old, old, 5).permute(0, 3, 1, 2).numpy()
        matrix = jax_bilinear_matrix(old, new)  # antialias=True, as jax's default; no effect when growing
        torch.testing.assert_close(got, torch.from_numpy(resize_2d(grid, matrix, matrix)), rtol=0, atol=1e-6)
    images, semantic, instance = toy_targets(batch=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # torch's antialiased kernel has no CPU bf16: run in float32
        assert oracle(images, semantic, instance)["codes"].shape == (2, 4)


def test_to_panoptic_classes_an_instance_by_its_summed_semantic_logits():
    from tasks.panoptic.stage1 import to_panoptic

    instance_logits = torch.zeros(1, 3, 1, 5)
    semantic_logits = torch.zeros(1, 3, 1, 5)
    instance_logits[0, 1, 0, :3] = 1  # pixels 0-2: instance 1; pixel 3: instance 2; pixel 4: in no segment
    instance_logits[0, 2, 0, 3] = 1
    instance_logits[0, 0, 0, 4] = 1
    semantic_logits[0, 1, 0, 4] = 9.0  # ignored: pixel 4 is in no segment
    semantic_logits[0, 1, 0, :2] = 1.0  # two pixels vote class 1 a little ...
    semantic_logits[0, 2, 0, 2] = 5.0  # ... one pixel votes class 2 a lot: the sum says 2
    semantic_logits[0, 0, 0, 3] = 1.0  # instance 2 is void
    semantic, instance = to_panoptic({"semantic": semantic_logits, "instance": instance_logits})
    assert semantic.tolist() == [[[2, 2, 2, 0, 0]]] and instance.tolist() == [[[1, 1, 1, 0, 0]]]


def test_oracle_learns_to_reconstruct_a_fixed_batch():
    from tasks.panoptic.stage1 import oracle_loss, to_panoptic

    torch.manual_seed(0)
    oracle = tiny_oracle(code_len=9, dict_size=64).train()
    images, semantic, instance = toy_targets()
    optimizer = torch.optim.AdamW(oracle.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss, _ = oracle_loss(oracle(images, semantic, instance), semantic, instance)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    oracle.eval()
    with torch.no_grad():
        got_semantic, got_instance = to_panoptic(oracle(images, semantic, instance))
    assert loss.item() < 0.2 * first
    assert (got_semantic == semantic).float().mean() > 0.95
    assert (got_instance == instance).float().mean() > 0.9


# ------------------------------------------------------------------------------------------------ stage II


def tiny_stage2(dict_size=12, code_len=6):
    import flexivit
    from tasks.panoptic.stage2 import CodeDecoder, Stage2

    encoder = flexivit.create_model("flexivit_mu", depth=1, width=32, num_heads=2, num_classes=0)
    return Stage2(encoder, CodeDecoder(dict_size, code_len, width=24, depth=2, num_heads=2))


def test_decoding_with_the_cache_equals_decoding_without_it():
    torch.manual_seed(0)
    model = tiny_stage2().eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.decoder.head.weight, std=1.0)  # spread logits: greedy choices are not ties
    images = torch.randn(3, 3, 48, 48)
    memory = model.memory(images, patch_size=8)
    cached = model.decoder.generate(memory, use_cache=True)
    uncached = model.decoder.generate(memory, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape == (3, 6) and 0 <= cached.min() and cached.max() < 12
    # Token by token, the cached step's logits equal the full causal forward's at that position.
    decoder = model.decoder
    with torch.no_grad():
        logits = decoder(cached, memory)
        tokens = torch.cat([torch.zeros_like(cached[:, :1]), cached[:, :-1] + 1], dim=1)
        caches = [{} for _ in decoder.layers]
        for t in range(6):
            x = decoder.embed(tokens[:, t : t + 1]) + decoder.posemb[:, t : t + 1]
            for layer, cache in zip(decoder.layers, caches, strict=True):
                x = layer(x, memory, cache)
            torch.testing.assert_close(decoder.head(decoder.norm(x[:, -1])), logits[:, t], rtol=1e-5, atol=1e-5)
    assert torch.equal(logits[..., 1:].argmax(-1), cached)  # teacher forcing on the greedy codes re-picks them
    sampled = model.decoder.generate(memory, temperature=1.0, generator=torch.Generator().manual_seed(1))
    same = model.decoder.generate(memory, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled, same) and not torch.equal(sampled, cached)


def test_teacher_forcing_is_causal_and_the_memory_follows_the_patch_size():
    torch.manual_seed(0)
    model = tiny_stage2().eval()
    images = torch.randn(2, 3, 48, 48)
    codes = torch.randint(0, 12, (2, 6))
    with torch.no_grad():
        memory = model.memory(images, patch_size=8)
        logits = model.decoder(codes, memory)
        changed = codes.clone()
        changed[:, 3] = (changed[:, 3] + 1) % 12
        other = model.decoder(changed, memory)
    # Position t sees codes before t only: changing code 3 leaves the logits of positions 0..3 as they were.
    torch.testing.assert_close(other[:, :4], logits[:, :4])
    assert (other[:, 4:] - logits[:, 4:]).abs().max() > 1e-4
    assert model.memory(images, patch_size=8).shape == (2, 1 + 36, 24)
    assert model.memory(images, patch_size=16).shape == (2, 1 + 9, 24)  # one decoder for every grid
    with torch.no_grad():
        far = images.clone()
        far[:, :, -8:, -8:] += 3.0  # only the last patch at p8 changes
        assert (model(far, codes, patch_size=8) - model(images, codes, patch_size=8)).abs().max() > 1e-4


def test_stage2_learns_the_codes_of_two_images():
    from tasks.panoptic.stage2 import code_loss

    torch.manual_seed(0)
    model = tiny_stage2().train()
    images = torch.randn(2, 3, 48, 48)
    codes = torch.randint(0, 12, (2, 6), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(120):
        loss = code_loss(model(images, codes, patch_size=[16, 8][step % 2]), codes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    for patch in (16, 8):
        assert torch.equal(model.generate(images, patch_size=patch), codes), patch


# ------------------------------------------------------------------------------------------------ PQ


@needs_fashion_mnist
def test_written_predictions_score_pq_100_and_a_missed_segment_costs_exactly_its_share(panoptic_root, tmp_path):
    pytest.importorskip(
        "panopticapi.evaluation", reason="panopticapi not installed (pip install --no-deps panopticapi-lite)"
    )
    from tasks.panoptic.evaluation import panoptic_metrics, pq_compute

    json_path, png_dir, image_dir = split(panoptic_root)
    dataset = read_coco_panoptic(json_path, png_dir, image_dir)
    maps = [(r.image_id, r.image.name, *[m.numpy() for m in dataset[k][1:]]) for k, r in enumerate(dataset.records)]
    out = write_coco_panoptic(maps, dataset.category_ids, tmp_path / "p.json", tmp_path / "p", json_path)
    perfect = panoptic_metrics(pq_compute(json_path, out, png_dir, tmp_path / "p"))
    assert perfect["PQ"] == pytest.approx(100.0) and perfect["SQ"] == pytest.approx(100.0)
    # Erase one thing segment of image 0: its category gets one FN; with n_c segments of that category in all,
    # its PQ becomes n_c - 1 / (n_c - 1 + 1/2) and every other category stays at 1.
    image_id, name, semantic, instance = maps[0]
    thing = next(i for i in np.unique(instance) if i and dataset.isthing[semantic[instance == i][0] - 1])
    label = int(semantic[instance == thing][0])
    maps[0] = (image_id, name, np.where(instance == thing, 0, semantic), np.where(instance == thing, 0, instance))
    out = write_coco_panoptic(maps, dataset.category_ids, tmp_path / "q.json", tmp_path / "q", json_path)
    result = pq_compute(json_path, out, png_dir, tmp_path / "q")
    gt = json.loads(json_path.read_text())
    category = dataset.category_ids[label - 1]
    n = sum(s["category_id"] == category for a in gt["annotations"] for s in a["segments_info"])
    assert result["per_class"][category]["pq"] == pytest.approx((n - 1) / (n - 0.5))
    present = {s["category_id"] for a in gt["annotations"] for s in a["segments_info"]} - {category}
    others = [result["per_class"][c]["pq"] for c in present]
    assert others and all(v == pytest.approx(1.0) for v in others)
    assert panoptic_metrics(result)["PQ"] == pytest.approx(100 * result["All"]["pq"])


# ------------------------------------------------------------------------------------------------ both stages


@needs_fashion_mnist
def test_both_stages_train_resume_evaluate_and_rebuild_from_their_checkpoints(tmp_path):
    pytest.importorskip(
        "panopticapi.evaluation", reason="panopticapi not installed (pip install --no-deps panopticapi-lite)"
    )
    import flexivit
    from tasks import load_run
    from tasks.common.config import load_config
    from tasks.panoptic import stage1, stage2
    from tools import eval as eval_tool
    from tools import train

    config1 = "configs/panoptic/scenes.py:stage=1,runlocal"
    oracle_dir, stage2_dir = tmp_path / "oracle", tmp_path / "stage2"
    results = train.main(["--config", config1, "--workdir", str(oracle_dir)])
    assert set(results) == {8} and 0 <= results[8]["PQ"] <= 100 and {"SQ", "RQ", "PQ_st"} <= set(results[8])
    oracle = stage1.load_model(oracle_dir)
    state, _ = flexivit.read_checkpoint(stage1.resolve_checkpoint(oracle_dir))
    assert all(torch.equal(oracle.state_dict()[k], v) for k, v in state.items())
    assert not torch.equal(oracle.quantizer.counts, torch.ones_like(oracle.quantizer.counts))  # the EMA ran

    config2 = "configs/panoptic/scenes.py:stage=2,runlocal"
    common = ["--config", config2, "--set", f"model.oracle={oracle_dir}"]
    with pytest.raises(SystemExit, match="interrupted after step 2"):
        train.main([*common, "--workdir", str(stage2_dir), "--interrupt-after", "2"])
    results = train.main([*common, "--workdir", str(stage2_dir), "--resume"])
    assert set(results) == {16, 12, 8} and all(0 <= r["PQ"] <= 100 for r in results.values())
    sampler_cfg = load_config(config2).patch_sizes
    sampler = flexivit.build_sampler(**sampler_cfg, seed=0)
    drawn = [json.loads(line)["patch_size"] for line in (stage2_dir / "patch_sizes.jsonl").read_text().splitlines()]
    assert [flexivit.pi_resize.to_2tuple(p) for p in drawn] == [
        flexivit.pi_resize.to_2tuple(sampler(s)) for s in range(4)
    ]
    model = stage2.load_model(stage2_dir)
    # Stage II never changes its oracle: the dictionary and weights are the stage I checkpoint's.
    assert all(torch.equal(model.oracle.state_dict()[k], v) for k, v in oracle.state_dict().items())
    # The checkpoint carries the JSON's categories (what predict labels and colours segments with).
    run = load_run(stage2_dir)
    gt = json.loads((Path(run.config.data.root) / "panoptic" / "panoptic_train.json").read_text())
    want = [{k: c.get(k) for k in ("id", "name", "isthing", "color")} for c in gt["categories"]]
    assert run.info["categories"] == [{**c, "isthing": bool(c["isthing"])} for c in want] and want[0]["color"]
    image = Image.fromarray(np.full((30, 70, 3), 128, np.uint8))
    prediction = run.task.predict(run.model, run.config, run.info, [image], 12, {})[0]
    assert prediction.image.size == (70, 30) and prediction.summary.split(" ")[1].startswith("segment")
    rows = eval_tool.main(["--workdir", str(stage2_dir), "--no-timing"])
    assert [r["patch_size"] for r in rows] == [16, 12, 8] and [r["best"] for r in rows].count("yes") == 1
    with pytest.raises(ValueError, match=r"the oracle has code_len 4, but model.code_len is 9"):
        train.main([*common, "model.code_len=9", "--workdir", str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="model.oracle must name the stage I workdir"):
        train.main(["--config", config2, "--workdir", str(tmp_path / "none")])


def _erase_instance_one_at_patch_16(images, semantic, instance, patch):
    """A deterministic 'model': the ground truth, with the first canonical segment erased at patch 16."""
    if patch == 16:
        semantic, instance = semantic.masked_fill(instance == 1, 0), instance.masked_fill(instance == 1, 0)
    return semantic, instance


def _scenes_eval_set(root):
    """The validation scenes at ``root`` as the PQ sweep's input (48 px, 8 instances)."""
    from tasks.panoptic.data import EvalSet, EvalTransform

    json_path, png_dir, image_dir = split(root)
    dataset = read_coco_panoptic(json_path, png_dir, image_dir)
    dataset.transform = EvalTransform(48, (-1.0, 1.0), 8)
    return EvalSet(dataset, json_path, png_dir)


def _sharded_pq(rank, world, init_file, root, out_file):
    import torch.distributed as dist

    from tasks.panoptic.data import evaluate_pq

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    seen = []

    def predict(images, semantic, instance, patch):
        seen.append(len(images))
        return _erase_instance_one_at_patch_16(images, semantic, instance, patch)

    results = evaluate_pq(predict, _scenes_eval_set(root), [8, 16], torch.device("cpu"), batch_size=1)
    torch.save({"results": results, "seen": sum(seen)}, f"{out_file}.{rank}")
    dist.destroy_process_group()


@needs_fashion_mnist
@pytest.mark.skipif(sys.platform != "linux", reason="gloo process group")
def test_pq_under_data_parallel_splits_the_images_and_equals_one_process(panoptic_root, tmp_path):
    pytest.importorskip(
        "panopticapi.evaluation", reason="panopticapi not installed (pip install --no-deps panopticapi-lite)"
    )
    import torch.multiprocessing as mp

    from tasks.panoptic.data import evaluate_pq

    alone = evaluate_pq(_erase_instance_one_at_patch_16, _scenes_eval_set(panoptic_root), [8, 16], torch.device("cpu"))
    assert alone[8]["PQ"] == pytest.approx(100.0) and alone[16]["PQ"] < 100.0
    # spawn, not fork: a forked worker can hang in the OpenMP pool that the parent process has already used.
    mp.spawn(_sharded_pq, args=(2, tmp_path / "pg", panoptic_root, tmp_path / "r.pt"), nprocs=2)
    ranks = [torch.load(tmp_path / f"r.pt.{rank}", weights_only=True) for rank in range(2)]
    # Three validation scenes: rank 0 predicts two, rank 1 one, at each of the two patch sizes.
    assert [r["seen"] for r in ranks] == [2 * 2, 1 * 2]
    for r in ranks:  # every process gets the main process's numbers, which are those of one process alone
        assert r["results"] == alone


@needs_fashion_mnist
def test_pq_of_the_first_val_examples_is_the_pq_of_those_images_alone(panoptic_root, tmp_path):
    pytest.importorskip(
        "panopticapi.evaluation", reason="panopticapi not installed (pip install --no-deps panopticapi-lite)"
    )
    from tasks.panoptic.data import evaluate_pq

    subset = _scenes_eval_set(panoptic_root)
    subset.images.records = subset.images.records[:2]  # what build_datasets does with data.val_examples=2
    got = evaluate_pq(_erase_instance_one_at_patch_16, subset, [8, 16], torch.device("cpu"), results_dir=tmp_path)
    # The reference: a ground truth that lists those two images only, scored whole.
    kept = {record.image_id for record in subset.images.records}
    gt = json.loads(subset.gt_json.read_text())
    alone = tmp_path / "root"
    shutil.copytree(panoptic_root, alone)
    only = {**gt, "images": [i for i in gt["images"] if i["id"] in kept]}
    only["annotations"] = [a for a in gt["annotations"] if a["image_id"] in kept]
    split(alone)[0].write_text(json.dumps(only))
    want = evaluate_pq(_erase_instance_one_at_patch_16, _scenes_eval_set(alone), [8, 16], torch.device("cpu"))
    assert got == want and got[8]["PQ"] == pytest.approx(100.0) and got[16]["PQ"] < 100.0
    written = json.loads((tmp_path / "p16.json").read_text())  # the predictions name the scored images only
    assert {i["id"] for i in written["images"]} == {a["image_id"] for a in written["annotations"]} == kept


def _pq_failing_on_the_main_process(rank, world, init_file, root, out_file):
    import torch.distributed as dist

    from tasks.panoptic.data import evaluate_pq

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        val_set = _scenes_eval_set(root)
        val_set.gt_dir = root / "nowhere"  # only the main process reads it, when it scores
        evaluate_pq(_erase_instance_one_at_patch_16, val_set, [8], torch.device("cpu"), batch_size=1)
    except Exception as err:
        Path(f"{out_file}.{rank}").write_text(f"{type(err).__name__}: {err}")
        raise


@needs_fashion_mnist
@pytest.mark.skipif(sys.platform != "linux", reason="gloo process group")
def test_a_failure_of_the_main_process_in_pq_ends_every_process_with_its_error(panoptic_root, tmp_path):
    pytest.importorskip(
        "panopticapi.evaluation", reason="panopticapi not installed (pip install --no-deps panopticapi-lite)"
    )
    import multiprocessing

    # Two independent processes (no launcher that would kill the survivor): each must end by itself, with the error.
    context = multiprocessing.get_context("spawn")
    args = (2, tmp_path / "pg", panoptic_root, tmp_path / "err")
    processes = [context.Process(target=_pq_failing_on_the_main_process, args=(rank, *args)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
    assert not hung, f"rank(s) {hung} still waiting after 120 s"
    assert [process.exitcode for process in processes] == [1, 1]
    errors = [Path(f"{tmp_path / 'err'}.{rank}").read_text() for rank in range(2)]
    assert errors[0].startswith("FileNotFoundError: pq_compute: ") and errors[0].endswith("nowhere does not exist")
    assert errors[1] == f"PeerError: the main process failed: {errors[0]}"
