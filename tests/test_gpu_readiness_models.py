"""The task models on a GPU they have never seen, guarded on the CPU (issue 26): torch.compile makes one graph per patch
size for detection and LiT steps (not one per number of prompts or text length), Hungarian matching copies the
costs to the host once per batch, the VQ training forward reads nothing off the device, and the UViM evaluations run
under the training precision's autocast."""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import generalized_box_iou

import flexivit
from tasks.contrastive.model import HFTextTower, ImageTextModel, build_text_tower, minilm_path
from tasks.detection import losses, make_loss
from tasks.detection.losses import detection_loss, match_batch
from tasks.detection.model import OwlViT
from tasks.panoptic.vq import VectorQuantizer

# What waits for the GPU when the tensor is on it: reading a value, or truth-testing one in an `if`.
READS = ("item", "__bool__", "__float__", "__int__", "__index__", "cpu", "tolist", "numpy")


@contextlib.contextmanager
def count_reads(monkeypatch):
    """Counts every read of a tensor value inside the block (on the CPU every tensor counts: a GPU run would wait)."""
    reads = []
    with monkeypatch.context() as patch:
        for name in READS:
            real = getattr(torch.Tensor, name)

            def wrapped(self, *args, _real=real, _name=name, **kwargs):
                reads.append(_name)
                return _real(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, wrapped)
        yield reads


class GraphCounter:
    """A torch.compile backend that runs each graph eagerly and counts the graphs dynamo hands it."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ detection: compile


NAMES = [f"class{i}" for i in range(12)]


def tiny_owl() -> OwlViT:
    torch.manual_seed(0)
    image = flexivit.create_model("flexivit_mu", depth=1, width=32, num_heads=2, num_classes=0)
    text = build_text_tower("openclip", width=32, layers=1, heads=2, context_length=16)
    model = OwlViT(
        image, text, torch.nn.Linear(32, 16, bias=False), 16, query_names=NAMES, train_templates=["{}", "a {}."]
    )
    torch.nn.init.normal_(model.class_head.proj.weight, std=0.3)
    return model


def detection_batch(seed: int, classes_per_image: int, B=2, Q=5, M=3, S=48):
    """A batch whose images are queried with ``classes_per_image`` classes each (so the number of prompts varies)."""
    g = torch.Generator().manual_seed(seed)
    boxes = torch.cat([torch.rand(B, M, 2, generator=g) * 0.6 + 0.2, torch.rand(B, M, 2, generator=g) * 0.3 + 0.05], -1)
    box_valid = torch.arange(M)[None] < torch.tensor([1, M])[:, None]
    queries = torch.full((B, Q), -1)
    for b in range(B):
        queries[b, :classes_per_image] = torch.randperm(len(NAMES), generator=g)[:classes_per_image]
    labels = ((torch.rand(B, M, Q, generator=g) < 0.5) & (queries >= 0)[:, None] & box_valid[..., None]).float()
    return torch.randn(B, 3, S, S, generator=g), boxes, box_valid, labels, queries, queries >= 0


def test_compiled_detection_steps_make_one_graph_per_patch_size(fresh_dynamo):
    # Before issue 26 every new number of prompts (one per class of the batch) was a new graph, until dynamo's
    # recompile limit; the engine compiles with dynamic=False, so only the dims marked dynamic may vary.
    model, counter = tiny_owl().train(), GraphCounter()
    net = torch.compile(model, backend=counter, dynamic=False)
    loss_fn, prompts = make_loss(None, None), set()
    for step in range(10):
        patch = (24, 16)[step % 2]
        batch = detection_batch(step, classes_per_image=2 + step % 4)
        prompts.add(len(torch.unique(batch[4][batch[5]])))
        torch.manual_seed(step)
        loss, _ = loss_fn(net, batch, patch, step)
        loss.backward()
    assert len(prompts) >= 3  # the number of prompts really varied
    assert counter.graphs == 2  # one per patch size


def test_detection_tokens_mark_the_number_of_prompts_dynamic_and_change_no_value():
    model = tiny_owl()
    tokens = model.tokenize(["class1", "a class2."], "cpu")
    assert torch.equal(tokens, model.text.tokenize(["class1", "a class2."]))
    assert 0 in getattr(tokens, "_dynamo_weak_dynamic_indices", set()) | getattr(
        tokens, "_dynamo_dynamic_indices", set()
    )


# ------------------------------------------------------------------------------------------ LiT: compile


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory):
    """A one-layer BERT with MiniLM's tokenizer: an HF tower whose padded length follows the longest caption."""
    transformers = pytest.importorskip("transformers")
    try:
        source = minilm_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    folder = tmp_path_factory.mktemp("tiny_bert")
    for path in source.iterdir():
        if path.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(path, folder / path.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def test_compiled_lit_steps_with_an_hf_tower_make_one_graph_per_patch_size(tiny_hf_folder, fresh_dynamo):
    # The HF tokenizer pads to the longest caption, so the token length changes from step to step.
    torch.manual_seed(0)
    image = flexivit.create_model("flexivit_mu", depth=1, width=32, num_heads=2, num_classes=0)
    text = HFTextTower(path=str(tiny_hf_folder), context_length=24)
    model = ImageTextModel(image=image, text=text, embed_dim=32, lock_image=True).train()
    counter = GraphCounter()
    net = torch.compile(model, backend=counter, dynamic=False)
    words = "a dog cat the photo of on sun mat big small red".split()
    lengths = set()
    for step in range(8):
        captions = [" ".join(words[: 1 + (step * 3 + k) % 11]) for k in range(3)]
        tokens = model.tokenize(captions, "cpu")  # the engine's device; marked after the copy
        lengths.add(tokens.shape[1])
        out = net(torch.randn(3, 3, 32, 32), tokens, patch_size=(16, 8)[step % 2])
        out["text_features"].sum().backward()
    assert len(lengths) >= 3
    assert counter.graphs == 2


# ------------------------------------------------------------------------------------------ Hungarian matching


def random_batch(seed: int, B=4, N=30, Q=6, M=7):
    g = torch.Generator().manual_seed(seed)
    query_valid = torch.rand(B, Q, generator=g) < 0.7
    logits = torch.randn(B, N, Q, generator=g) * 3
    logits = torch.where(query_valid[:, None], logits, torch.tensor([1e6, -1e6, float("inf")])[seed % 3])
    pred = torch.cat([torch.rand(B, N, 2, generator=g) * 0.6 + 0.2, torch.rand(B, N, 2, generator=g) * 0.3 + 0.05], -1)
    tgt = torch.cat([torch.rand(B, M, 2, generator=g) * 0.6 + 0.2, torch.rand(B, M, 2, generator=g) * 0.3 + 0.05], -1)
    box_valid = torch.rand(B, M, generator=g) < 0.6
    box_valid[0] = False  # an image without boxes
    tgt = torch.where(box_valid[..., None], tgt, 0.0)  # padding rows: zero boxes, as the collate writes them
    labels = (torch.rand(B, M, Q, generator=g) < 0.4).float()
    return logits, pred, tgt, box_valid, labels, query_valid


def per_image_match(logits, pred, tgt, box_valid, labels, query_valid, alpha=0.3, gamma=2.0, weights=None):
    """The matching as it ran before issue 26, kept here as the reference: each image's logits to the host, its
    invalid query slots indexed away (not masked), one image at a time."""
    w = {**losses.DEFAULT_WEIGHTS, **(weights or {})}
    out = []
    for b in range(len(logits)):
        valid = box_valid[b].nonzero().squeeze(1)
        q = query_valid[b]
        x, lab = logits[b].detach().double()[:, q], labels[b, valid].double()[:, q]
        cost = losses._cost(x, lab, pred[b].detach().double(), tgt[b, valid].double(), alpha, gamma, w)
        rows, cols = linear_sum_assignment(cost.numpy())
        rows, cols = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
        out.append(torch.stack([torch.full_like(rows, b), rows, valid[cols]]))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("seed", range(12))
def test_batched_matching_equals_the_per_image_matching(seed):
    case = random_batch(seed)
    got = torch.stack(match_batch(*case))
    assert torch.equal(got, per_image_match(*case))
    weights = {"class": 2.0, "l1": 0.5, "giou": 3.0}
    assert torch.equal(torch.stack(match_batch(*case, weights=weights)), per_image_match(*case, weights=weights))


def test_batched_matching_reads_the_device_once_per_batch(monkeypatch):
    case = random_batch(0, B=6)
    with count_reads(monkeypatch) as reads:
        match_batch(*case)
    assert reads.count("cpu") == 1  # the per-image path read each image's logits, validity and boxes (B times)
    assert not {"item", "__bool__", "__float__", "__int__", "tolist"} & set(reads)


def test_batched_giou_is_torchvisions():
    a, b = random_batch(1)[1:3]
    a, b = losses.cxcywh_to_xyxy(a.double()), losses.cxcywh_to_xyxy(b.double())
    want = torch.stack([generalized_box_iou(x, y) for x, y in zip(a, b, strict=True)])
    assert torch.equal(losses._pairwise_giou(a, b), want)


def test_detection_loss_and_gradients_are_those_of_the_per_image_matching(monkeypatch):
    logits, pred, tgt, box_valid, labels, query_valid = random_batch(3)
    logits = torch.where(query_valid[:, None], logits, -1e6)  # what the class head gives invalid slots
    results = []
    for path in ("batched", "per image"):
        if path == "per image":
            monkeypatch.setattr(losses, "match_batch", lambda *a, **k: tuple(per_image_match(*a, **k)))
        x, p = logits.clone().requires_grad_(), pred.clone().requires_grad_()
        loss, terms = detection_loss(x, p, tgt, box_valid, labels, query_valid)
        loss.backward()
        results.append((loss.detach(), terms, x.grad, p.grad))
    (loss_a, terms_a, gx_a, gp_a), (loss_b, terms_b, gx_b, gp_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(gx_a, gx_b) and torch.equal(gp_a, gp_b)
    assert all(torch.equal(terms_a[k], terms_b[k]) for k in terms_a)


# ------------------------------------------------------------------------------------------ VQ


class ExactVQ(VectorQuantizer):
    """The quantiser as before issue 26: the exact dead-code check (a device read) at every update."""

    def _may_have_dead_codes(self) -> bool:
        return True


def dying_inputs(steps: int, seed: int = 0):
    """Vectors concentrated on a few directions, so that most codes go unused and die (and get re-seeded)."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(2, 5, 8, generator=g) * 0.3
        x[..., step % 2] += 3.0
        yield x


def test_vq_training_forward_reads_nothing_off_the_device(monkeypatch):
    vq = VectorQuantizer(64, 8, seed=0).train()
    inputs = list(dying_inputs(6))
    vq(inputs[0])  # the first update cannot know the counts' floor yet: it runs the exact check
    with count_reads(monkeypatch) as reads:
        for x in inputs[1:]:
            vq(x)
    assert reads == []  # before issue 26: float() twice and bool() once per update
    assert set(vq.last_stats) == {"codebook_max_ratio", "codebook_zeros_ratio"}  # read when logged


def test_vq_skips_the_exact_check_only_where_no_code_can_die_and_matches_it_exactly():
    # decay 0.8 and min_count 0.3: an unused code dies after 6 steps, so codes die and are split all along.
    fast, exact = (cls(16, 8, decay=0.8, min_count=0.3, seed=3).train() for cls in (VectorQuantizer, ExactVQ))
    checks = []
    real = fast._may_have_dead_codes
    fast._may_have_dead_codes = lambda: checks.append(real()) or checks[-1]
    for x in dying_inputs(40):
        q_fast, codes_fast = fast(x)
        q_exact, codes_exact = exact(x)
        assert torch.equal(q_fast, q_exact) and torch.equal(codes_fast, codes_exact)
        assert torch.equal(fast.counts, exact.counts) and torch.equal(fast.sums, exact.sums)
        assert fast.last_stats == exact.last_stats
    assert int(exact.num_splits) > 0 and torch.equal(fast.num_splits, exact.num_splits)
    assert 0 < sum(checks) < len(checks) / 2  # the exact check ran on a minority of the steps


def test_vq_runs_the_exact_check_after_its_counts_are_written():
    vq = VectorQuantizer(8, 4, min_count=0.1, seed=1).train()
    vq(torch.randn(6, 4))
    vq(torch.randn(6, 4))
    assert not vq._may_have_dead_codes()
    with torch.no_grad():
        vq.counts[3] = 0.01  # as a checkpoint load would write it: a stale floor would miss this dead code
    vq.load_state_dict(vq.state_dict())
    splits = int(vq.num_splits)
    vq(vq.codewords()[0].expand(6, 4))  # every vector on code 0: code 3 gets nothing and stays dead
    assert int(vq.num_splits) > splits and bool((vq.counts >= vq.min_count).all())


def test_oracle_training_forward_and_loss_read_nothing_off_the_device(monkeypatch):
    from tasks.panoptic.stage1 import Oracle, oracle_loss

    torch.manual_seed(0)
    oracle = Oracle(
        num_classes=4, max_instances=5, image_size=24, patch_size=4, code_len=4, dict_size=32, width=32,
        enc_depth=1, dec_depth=1, num_heads=2, code_dropout="prefix",
    ).train()  # fmt: skip
    images = torch.randn(2, 3, 24, 24)
    semantic, instance = torch.randint(0, 4, (2, 24, 24)), torch.randint(-1, 5, (2, 24, 24))
    oracle_loss(oracle(images, semantic, instance), semantic, instance)[0].backward()  # the first update
    with count_reads(monkeypatch) as reads:
        loss, _ = oracle_loss(oracle(images, semantic, instance), semantic, instance)
        loss.backward()
    # Before issue 26: four range checks of the maps, the VQ's three and the loss's `if not (instance >= 0).any()`.
    assert reads == []
    # Every pixel ignored: the instance term is 0 (not 0 / 0) and keeps the graph.
    ignored = torch.full_like(instance, -1)
    loss, terms = oracle_loss(oracle(images, semantic, ignored), semantic, ignored)
    assert terms["instance"] == 0 and loss.requires_grad


# ------------------------------------------------------------------------------------------ UViM evaluation


@pytest.mark.parametrize("stage", [1, 2])
def test_uvim_evaluation_runs_under_the_training_autocast(stage, monkeypatch):
    from tasks.panoptic import stage1, stage2

    module = stage1 if stage == 1 else stage2
    seen = []

    def evaluate_pq(predict, val_set, patch_sizes, device, batch_size=8):
        images = torch.randn(1, 3, 24, 24)
        semantic = torch.zeros(1, 24, 24, dtype=torch.long)
        seen.append(predict(images, semantic, semantic, patch_sizes[0]))
        return {}

    class Model(torch.nn.Module):
        patch_size = 4

        def encode(self, *args, **kwargs):
            return {"quantised": self.state()}

        def decode(self, *args):
            return {"semantic": torch.zeros(1, 2, 4, 4), "instance": torch.zeros(1, 2, 4, 4)}

        def predict(self, images, patch):
            self.state()
            return torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)

        def state(self):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.is_grad_enabled()))

    monkeypatch.setattr(module, "evaluate_pq", evaluate_pq)
    module.evaluate(Model(), None, [4], torch.device("cpu"), torch.bfloat16)
    assert seen[0] == (True, torch.bfloat16, False)
    seen.clear()
    module.evaluate(Model(), None, [4], torch.device("cpu"), None)
    assert seen[0][0] is False
