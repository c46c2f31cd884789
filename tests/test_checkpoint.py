"""Checkpoint loading: big_vision .npz parity with timm's own loader, timm state dicts, own round trips, safety."""

import io
import os
import pickle
import re
import sys
import urllib.error
import warnings

import numpy as np
import pytest
import timm
import torch
from big_vision_files import as_raw_bf16, random_big_vision_params, scan
from reference_resize import jax_bilinear_matrix, resize_2d
from timm.models.vision_transformer import VisionTransformer, _load_weights

import flexivit
from flexivit import checkpoint as ckpt
from flexivit import convert, releases
from flexivit.files import CheckpointError

SHAPE = dict(width=32, depth=2, num_heads=2, mlp_ratio=2.0)  # mlp 64, matching random_big_vision_params()
PAPER_SIZES = flexivit.PAPER_PATCH_SIZES


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bv") / "flexi.npz"
    np.savez(path, **{"params/" + k: v for k, v in random_big_vision_params().items()})
    return path


def ours(path, **kw):
    # The exact (erf) GELU for parity with timm, which uses it also for these files (docs/reference.md §4).
    return flexivit.create_model("flexivit_base", pretrained=path, **SHAPE, gelu_approximate="none", **kw).eval()


def timm_model(path, patch):
    model = VisionTransformer(
        img_size=240, patch_size=patch, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5,
        no_embed_class=True, class_token=True, global_pool="token",
    ).eval()  # fmt: skip
    _load_weights(model, str(path))
    return model


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(0))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("patch", [p for p in PAPER_SIZES if 240 // p >= 7])
def test_npz_logits_equal_timm_loader(npz_path, images, patch):
    model = ours(npz_path)
    with torch.no_grad():
        got, want = model(images, patch_size=patch), timm_model(npz_path, patch)(images)
    assert got.shape == (2, 5)
    assert rel_err(got, want) < 1e-4, f"patch {patch}: relative error {rel_err(got, want):.2e}"


@pytest.mark.parametrize("patch", [48, 40])
def test_npz_small_grids_use_antialiased_posemb(npz_path, images, patch):
    # timm resizes the position grid without antialias; the reference (jax.image.resize) antialiases when
    # shrinking 7 -> 5 / 6. Independent check: timm's model with the posemb replaced by the JAX-formula resize.
    grid = 240 // patch
    reference = timm_model(npz_path, patch)
    stored = random_big_vision_params()["pos_embedding"].reshape(7, 7, -1).transpose(2, 0, 1)
    m = jax_bilinear_matrix(7, grid)
    pe = resize_2d(stored, m, m).transpose(1, 2, 0).reshape(1, grid * grid, -1)
    with torch.no_grad():
        plain_timm = reference(images)
        reference.pos_embed.copy_(torch.from_numpy(pe))
        want, got = reference(images), ours(npz_path)(images, patch_size=patch)
    assert rel_err(got, want) < 1e-4
    assert rel_err(got, plain_timm) > 1e-3  # the antialias makes a visible difference at these grids


def test_npz_layout_variants_load_identically(tmp_path):
    params = random_big_vision_params()
    reference = convert.convert_big_vision(params)
    variants = {
        "plain.npz": params,
        "opt.npz": {"opt/target/" + k: v for k, v in params.items()},
        "scanned.npz": {"params/" + k: v for k, v in scan(params, depth=2).items()},
    }
    for name, arrays in variants.items():
        np.savez(tmp_path / name, **arrays)
        sd, _ = ckpt.read_checkpoint(tmp_path / name)
        assert sd.keys() == reference.keys(), name
        for k in sd:
            torch.testing.assert_close(sd[k], reference[k], rtol=0, atol=0, msg=f"{name}: {k}")


def test_npz_bf16_raw_bytes(tmp_path):
    params = random_big_vision_params()
    np.savez(tmp_path / "bf16.npz", **{k: as_raw_bf16(v) for k, v in params.items()})
    sd, _ = ckpt.read_checkpoint(tmp_path / "bf16.npz")
    kernel = torch.from_numpy(params["embedding/kernel"].transpose(3, 2, 0, 1).copy())
    # The file holds truncated bits; decoding must give exactly those values back as float32.
    truncated = (kernel.numpy().view(np.uint32) & 0xFFFF0000).view(np.float32)
    np.testing.assert_array_equal(sd["patch_embed.proj.weight"].numpy(), truncated)
    assert sd["patch_embed.proj.weight"].dtype == torch.float32


def test_npz_errors_name_the_key(tmp_path):
    params = random_big_vision_params()
    del params["Transformer/encoderblock_1/MlpBlock_0/Dense_0/bias"]
    np.savez(tmp_path / "missing.npz", **params)
    with pytest.raises(CheckpointError, match="Dense_0/bias"):
        flexivit.create_model("flexivit_base", pretrained=tmp_path / "missing.npz", **SHAPE)
    params = random_big_vision_params()
    params["pre_logits/kernel"] = np.zeros((32, 32), np.float32)
    np.savez(tmp_path / "extra.npz", **params)
    with pytest.raises(CheckpointError, match="no place for.*pre_logits/kernel"):
        flexivit.create_model("flexivit_base", pretrained=tmp_path / "extra.npz", **SHAPE)
    np.savez(tmp_path / "deep.npz", **random_big_vision_params(depth=3))
    with pytest.raises(CheckpointError, match="blocks.2"):
        flexivit.create_model("flexivit_base", pretrained=tmp_path / "deep.npz", **SHAPE)


@pytest.mark.parametrize("patch", [16, 30])
def test_npz_with_gap_pooling_loads_without_being_told(tmp_path, images, patch):
    # big_vision FlexiViT's default pool_type "gap": no class token in the file, logits = head(mean of the tokens
    # after the final norm). Oracle: timm's own loader into its ViT without a class token, average pooling after the
    # final norm (fc_norm=False).
    params = random_big_vision_params()
    del params["cls"]
    np.savez(tmp_path / "gap.npz", **{"params/" + k: v for k, v in params.items()})
    model = ours(tmp_path / "gap.npz")  # no pool / class_token arguments
    assert model.pool == "gap" and model.cls_token is None
    reference = VisionTransformer(
        img_size=240, patch_size=patch, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5,
        no_embed_class=True, class_token=False, global_pool="avg", fc_norm=False,
    ).eval()  # fmt: skip
    _load_weights(reference, str(tmp_path / "gap.npz"))
    with torch.no_grad():
        got, want = model(images, patch_size=patch), reference(images)
    assert rel_err(got, want) < 1e-4, f"patch {patch}: relative error {rel_err(got, want):.2e}"


def test_npz_with_map_pooling_is_named_not_listed(tmp_path):
    params = random_big_vision_params()
    del params["cls"]
    params["MAPHead_0/probe"] = np.zeros((1, 1, 32), np.float32)
    params["MAPHead_0/LayerNorm_0/scale"] = np.ones(32, np.float32)
    np.savez(tmp_path / "map.npz", **params)
    with pytest.raises(CheckpointError, match=r"map\.npz: .*pool_type='map'.*MAPHead_0/") as error:
        flexivit.create_model("flexivit_base", pretrained=tmp_path / "map.npz", **SHAPE)
    assert "missing" not in str(error.value)


def test_a_class_token_that_the_file_lacks_is_explained(tmp_path):
    params = random_big_vision_params()
    del params["cls"]
    np.savez(tmp_path / "gap.npz", **params)
    model = flexivit.create_model("flexivit_base", **SHAPE, num_classes=5)  # pool "tok": needs a class token
    with pytest.raises(CheckpointError, match="no class token.*pool='gap', class_token=False"):
        ckpt.load_pretrained(model, tmp_path / "gap.npz")


def test_npz_object_arrays_are_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", **{"embedding/kernel": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(CheckpointError, match="pickled"):
        ckpt.read_checkpoint(tmp_path / "obj.npz")


def test_num_classes_from_checkpoint_or_overridden(npz_path):
    assert ours(npz_path).head.out_features == 5
    transfer = ours(npz_path, num_classes=3)  # a new head: skipped from the file, zero-initialised
    assert transfer.head.out_features == 3 and transfer.head.weight.abs().sum() == 0
    assert ours(npz_path, num_classes=0).head is None


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_own_checkpoint_round_trip(tmp_path, suffix, images):
    model = flexivit.create_model("flexivit_mu", depth=2, num_classes=7, pool="gap", posemb_grid=(6, 8)).eval()
    torch.nn.init.normal_(model.head.weight)
    flexivit.save_model(model, tmp_path / f"m{suffix}")
    loaded = flexivit.load_model(tmp_path / f"m{suffix}").eval()
    assert tuple(loaded.posemb_grid) == (6, 8) and loaded.pool == "gap" and loaded.num_classes == 7
    with torch.no_grad():
        for p in (48, 24, (20, 30)):
            torch.testing.assert_close(
                loaded(images[:1], patch_size=p), model(images[:1], patch_size=p), rtol=0, atol=0
            )


def timm_vit(patch, **kw):
    return VisionTransformer(
        img_size=240, patch_size=patch, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=4, **kw
    ).eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_state_dict_with_class_posemb_loads_exactly(tmp_path, suffix, images):
    # A standard timm ViT adds a position embedding to the class token; folding it into the class token is exact.
    reference = timm_vit(16)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(std=0.2)
    path = tmp_path / f"timm{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(reference.state_dict(), path)
    else:
        torch.save({"state_dict": reference.state_dict()}, path)
    model = flexivit.create_model("vit_base_patch16", pretrained=path, **SHAPE, gelu_approximate="none").eval()
    assert model.head.out_features == 4
    with torch.no_grad():
        assert rel_err(model(images, patch_size=16), reference(images)) < 1e-5


def randomised(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model.eval()


# timm's own layouts: its flexivit_* hub files (kernel 16x16, posemb 15x15 without a class entry, 240 px) and plain
# ViTs at 224 px (14x14), with and without a class-token entry in the position embedding.
TIMM_LAYOUTS = {
    "flexivit_small@240": dict(name="flexivit_small", img_size=240, no_embed_class=True),
    "vit_base_patch16_224": dict(name="vit_base_patch16_224", img_size=224),
    "vit_base_patch16_224 no class posemb": dict(name="vit_base_patch16_224", img_size=224, no_embed_class=True),
}


@pytest.mark.parametrize("layout", TIMM_LAYOUTS)
def test_timm_layout_loads_losslessly_at_its_own_patch_size(tmp_path, layout):
    # The stored 16x16 kernel and 15x15 / 14x14 grid become the model's underlying sizes: at patch 16 on the stored
    # image size nothing is resized, so the logits are timm's (before: resized to 32x32 / 7x7 and back, 7e-2 off).
    spec = dict(TIMM_LAYOUTS[layout])
    name, size = spec.pop("name"), spec["img_size"]
    reference = randomised(timm.create_model(name, pretrained=False, num_classes=4, **SHAPE_TIMM, **spec))
    path = tmp_path / "timm.safetensors"
    from safetensors.torch import save_file

    save_file(reference.state_dict(), path)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    ours_name = "flexivit_small" if name.startswith("flexivit") else "vit_base_patch16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing lossy happens, so nothing may warn
        model = flexivit.create_model(ours_name, pretrained=path, **SHAPE, gelu_approximate="none").eval()
    grid = size // 16
    assert model.patch_embed.base_patch_size == (16, 16) and model.posemb_grid == (grid, grid)
    with torch.no_grad():
        got, want = model(images, patch_size=16), reference(images)
        assert rel_err(got, want) < 1e-5, f"{layout}: relative error {rel_err(got, want):.2e}"
        assert model(images, patch_size=8).shape == (2, 4)  # still flexible: any patch size runs


SHAPE_TIMM = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def test_resize_to_model_is_explicit_and_warns(tmp_path):
    # A fixed B/16-style file into a FlexiViT (32x32 kernel, 7x7 grid). PI-resize 16 -> 32 is an upsampling, so the
    # stored kernel applied to a patch upsampled to 32 px gives exactly the tokens of the original 16x16 kernel.
    reference = timm_vit(16, no_embed_class=True)
    path = tmp_path / "t.pth"
    torch.save(reference.state_dict(), path)
    kernel_warning = r"t\.pth: patch-embedding kernel \(PI-resize\) resized 16x16 -> 32x32 to fit"
    with pytest.warns(UserWarning, match=kernel_warning) as rec:
        model = flexivit.create_model(
            "flexivit_base", pretrained=path, resize_to_model=True, **SHAPE, gelu_approximate="none"
        )
    assert any("position embedding grid resized 15x15 -> 7x7" in str(w.message) for w in rec)
    kernel = model.patch_embed.proj.weight.detach()
    assert kernel.shape[-2:] == (32, 32) and model.pos_embed.shape == (1, 49, 32)
    patches = torch.randn(8, 3, 16, 16)
    upsampled = torch.nn.functional.interpolate(patches, size=32, mode="bilinear", align_corners=False)
    want = torch.einsum("bchw,dchw->bd", patches, reference.patch_embed.proj.weight.detach())
    torch.testing.assert_close(torch.einsum("bchw,dchw->bd", upsampled, kernel), want, rtol=1e-4, atol=1e-4)
    # The 15x15 grid went to the 7x7 underlying grid with the antialiased bilinear resize.
    stored = reference.pos_embed.detach().reshape(15, 15, 32).permute(2, 0, 1).double().numpy()
    m = jax_bilinear_matrix(15, 7)
    want_pe = torch.from_numpy(resize_2d(stored, m, m)).permute(1, 2, 0).reshape(1, 49, 32).float()
    torch.testing.assert_close(model.pos_embed.detach(), want_pe, rtol=1e-5, atol=1e-5)


def test_wrong_shapes_are_listed(tmp_path):
    path = tmp_path / "t.pth"
    torch.save(timm_vit(16).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.norm1\.weight: checkpoint \(32,\) vs model \(64,\)"):
        flexivit.create_model("vit_base_patch16", pretrained=path, width=64, depth=2, num_heads=2)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _RunsCode()
    evil.marker = marker
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"patch_embed.proj.weight": evil}, f)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        flexivit.create_model("flexivit_mu", pretrained=path)
    assert not marker.exists()


def test_release_table_and_offline_message(tmp_path, monkeypatch):
    assert releases.RELEASES["flexivit_b_i1k"]["url"].endswith("/big_vision/flexivit/flexivit_b_i1k.npz")
    assert releases.RELEASES["vit_b30_i21k_300ep"]["model"] == "vit_base_patch30"
    monkeypatch.setenv("FLEXIVIT_CACHE", str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(releases.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError) as err:
        flexivit.create_model("flexivit_small", pretrained="flexivit_s_i1k")
    message = str(err.value)
    assert "flexivit_s_i1k.npz" in message and str(tmp_path) in message and "https://" in message
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(KeyError, match="flexivit_b_i1k"):
        releases.release_path("flexivit_x_i1k")


def test_release_found_in_cache_without_network(tmp_path, monkeypatch, npz_path):
    monkeypatch.setenv("FLEXIVIT_CACHE", str(tmp_path))
    monkeypatch.setattr(releases.urllib.request, "urlopen", lambda *a, **k: pytest.fail("must not download"))
    (tmp_path / "flexivit_s_i1k.npz").write_bytes(npz_path.read_bytes())
    model = flexivit.create_model("flexivit_small", pretrained="flexivit_s_i1k", **SHAPE)
    assert model.head.out_features == 5


def test_release_download_is_written_whole_or_not_at_all(tmp_path, monkeypatch, npz_path):
    monkeypatch.setenv("FLEXIVIT_CACHE", str(tmp_path))
    data = npz_path.read_bytes()

    class CutOff(io.BytesIO):  # the connection drops after half the file
        def read(self, size=-1):
            chunk = super().read(size)
            if self.tell() > len(data) // 2:
                raise ConnectionResetError("connection reset by peer")
            return chunk

    monkeypatch.setattr(releases.urllib.request, "urlopen", lambda url, timeout: CutOff(data))
    with pytest.raises(FileNotFoundError, match=r"the download failed \(connection reset by peer\)"):
        releases.release_path("flexivit_s_i1k")
    assert not list(tmp_path.iterdir())  # no partial file, under its name or a temporary one
    monkeypatch.setattr(releases.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(data))
    path = releases.release_path("flexivit_s_i1k")
    assert path.read_bytes() == data and list(tmp_path.iterdir()) == [tmp_path / "flexivit_s_i1k.npz"]


def test_loading_timm_files_needs_no_timm(tmp_path, monkeypatch, images):
    # Our loader depends on file formats only: with timm made unimportable the same file gives the same logits.
    path = tmp_path / "timm.safetensors"
    from safetensors.torch import save_file

    save_file(randomised(timm_vit(16)).state_dict(), path)
    with torch.no_grad():
        want = flexivit.create_model("vit_base_patch16", pretrained=path, **SHAPE).eval()(images)
        monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
        got = flexivit.create_model("vit_base_patch16", pretrained=path, **SHAPE).eval()(images)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_head_fallbacks_warn(tmp_path):
    headless = tmp_path / "headless.safetensors"
    flexivit.save_model(flexivit.create_model("flexivit_mu", depth=1), headless)
    with pytest.warns(UserWarning, match=r"headless\.safetensors has no classification head: the model.s 10-class"):
        model = flexivit.create_model("flexivit_mu", pretrained=headless, depth=1, num_classes=10)
    assert model.head.weight.abs().sum() == 0  # the fresh zero head it warned about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert flexivit.create_model("flexivit_mu", pretrained=headless, depth=1).head is None  # nothing to warn


def test_pretrained_true_loads_the_default_release_or_names_them(tmp_path, monkeypatch, npz_path):
    monkeypatch.setenv("FLEXIVIT_CACHE", str(tmp_path))
    monkeypatch.setattr(releases.urllib.request, "urlopen", lambda *a, **k: pytest.fail("must not download"))
    (tmp_path / "flexivit_b_i1k.npz").write_bytes(npz_path.read_bytes())
    assert releases.default_release("flexivit_base") == "flexivit_b_i1k"
    model = flexivit.create_model("flexivit_base", pretrained=True, **SHAPE)
    torch.testing.assert_close(
        model.pos_embed, flexivit.create_model("flexivit_base", pretrained=npz_path, **SHAPE).pos_embed
    )
    with pytest.raises(CheckpointError, match=r"no official release for 'flexivit_mu'.*flexivit_s_i1k"):
        flexivit.create_model("flexivit_mu", pretrained=True)


def _truncated(tmp_path, suffix):
    path = tmp_path / f"good{suffix}"
    flexivit.save_model(flexivit.create_model("flexivit_mu", depth=1), path)
    data = path.read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    return tmp_path / f"cut{suffix}"


@pytest.mark.parametrize("kind", ["text.pt", "text.npz", "text.safetensors", "cut.pt", "cut.safetensors"])
def test_damaged_or_foreign_files_are_named(tmp_path, kind):
    if kind.startswith("text"):
        path = tmp_path / kind
        path.write_text("this is not a checkpoint\n" * 20)
    else:
        path = _truncated(tmp_path, kind[3:])
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + r".*(expected|not a big_vision)"):
        ckpt.read_checkpoint(path)


def test_layer_scale_checkpoint_is_folded_exactly(tmp_path, images):
    # DeiT-III style blocks (LayerScale) load into plain blocks with the scale folded into attn.proj / mlp.fc2.
    reference = timm_vit(16, init_values=0.1)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.normal_(std=0.2) if "gamma" not in name else p.uniform_(0.5, 2.0)
    path = tmp_path / "deit3.safetensors"
    from safetensors.torch import save_file

    save_file(reference.state_dict(), path)
    model = flexivit.create_model("vit_base_patch16", pretrained=path, **SHAPE, gelu_approximate="none").eval()
    with torch.no_grad():
        assert rel_err(model(images, patch_size=16), reference(images)) < 1e-5
