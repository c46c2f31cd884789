"""The reproduction script end to end at a tiny scale: every run trains, every table and plot is written."""

import re

from markers import needs_fashion_mnist

from tools import reproduce


@needs_fashion_mnist
def test_reproduce_smoke(tmp_path):
    out = tmp_path / "docs"
    args = ["--steps-scale", "0.002", "--val-examples", "40", "--workdir", str(tmp_path / "runs"), "--out", str(out)]
    reproduce.main(args)
    text = (out / "reproduction.md").read_text()
    for figure in ("fig3", "fig8", "fig8_cross", "fig4"):
        assert (out / f"reproduction_{figure}.png").stat().st_size > 1000
    # Each pivot row has an accuracy for all six evaluated patch sizes.
    for model in ("ViT-p8", "FlexiViT distilled from ViT-p8", "ViT-p16, head at p16", "flexified transfer"):
        row = next(line for line in text.splitlines() if line.startswith("| ") and model in line)
        assert len(re.findall(r"(?<=\| )\d+\.\d(?= \|)", row)) == 6, row
    # The runs and their sweeps are reused on a second call: nothing trains or evaluates again.
    before = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("*.pt")}
    before.update({p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("reproduce_sweep.json")})
    assert len(before) == 2 * 14
    reproduce.main(args)
    after = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("*.pt")}
    after.update({p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("reproduce_sweep.json")})
    assert after == before
    # The same tables (the header's wall time may differ).
    assert (out / "reproduction.md").read_text().split("## 1.")[1] == text.split("## 1.")[1]
