"""The `restnet` command end to end on a tiny zoo (real data, real timm models)."""
import subprocess
import sys

import pytest
import yaml

from restnet.cli import main
from stitch_lib import Catalog

TINY = {
    "n_calib": 160, "n_val": 200, "n_test": 300,
    "anchors": [
        {"name": "res", "model": "test_resnet", "train": {"epochs": 1, "n_train": 500}},
        {"name": "vit", "model": "vit_tiny_patch16_224", "train": {"epochs": 1, "n_train": 500},
         "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}},
    ],
}


@pytest.mark.slow
def test_catalog_build_show_and_cka(tmp_path, capsys):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump(TINY))
    home = tmp_path / "home"
    assert main(["catalog", "build", "--zoo", str(zoo), "--home", str(home), "--top-k", "1",
                 "--screen", "2", "--ft-steps", "5", "--ft-n-train", "200"]) == 0
    assert (home / "catalog" / "catalog.json").is_file()
    assert (home / "catalog" / "pareto.png").stat().st_size > 10_000
    assert "Pareto frontier" in capsys.readouterr().out
    cat = Catalog.load(home / "catalog")
    assert {e.name for e in cat.anchors} == {"res", "vit"} and len(cat.hybrids) == 2
    (home / "catalog" / "pareto.png").unlink()
    assert main(["catalog", "show", "--home", str(home)]) == 0
    assert (home / "catalog" / "pareto.png").is_file()
    png = tmp_path / "cka.png"
    assert main(["cka", "res", "vit", "--zoo", str(zoo), "--home", str(home),
                 "--out", str(png)]) == 0
    assert png.stat().st_size > 5_000


def test_bad_zoo_file_names_the_key(tmp_path):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({"anchors": [{"name": "a", "model": "test_resnet",
                                                "epochs": 3}]}))
    with pytest.raises(SystemExit, match=r"anchors\[0\]: unknown key\(s\) \['epochs'\]"):
        main(["catalog", "build", "--zoo", str(zoo), "--home", str(tmp_path)])


def test_a_build_asked_for_a_missing_gpu_stops_before_training(tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump(TINY))
    with pytest.raises(SystemExit, match="--device: device 'cuda': this torch sees no CUDA GPU"):
        main(["catalog", "build", "--device", "cuda", "--zoo", str(zoo),
              "--home", str(tmp_path / "home")])
    assert not (tmp_path / "home").exists()


def test_dispatcher_usage():
    r = subprocess.run([sys.executable, "-m", "restnet.cli", "nope"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "catalog" in r.stdout
