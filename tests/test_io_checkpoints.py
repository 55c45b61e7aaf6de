"""hbird.io.checkpoints: the pretraining checkpoint format that the trainer writes and
the encoders read, defined once."""

import pytest
import torch

from hbird.encoders.checkpoints import hbird_checkpoint_options
from hbird.errors import InputError
from hbird.io.files import save_tensors

TENSORS = {"w": torch.zeros(2)}


def test_encoders_read_the_architecture_the_trainer_records(tmp_path):
    from hbird.pretrain.backbone import build_backbone

    backbone = build_backbone(
        "vit_small_patch16_224", {"depth": 2, "embed_dim": 32, "num_heads": 2}
    )
    path = save_tensors(
        tmp_path / "c.safetensors", TENSORS, {"format": "hbird-pretrain-1", **backbone.metadata()}
    )
    options = hbird_checkpoint_options(path)
    assert options["model_kwargs"] == {"depth": 2, "embed_dim": 32, "num_heads": 2}
    assert options["mean"] == list(backbone.mean) and options["std"] == list(backbone.std)


def test_other_files_have_no_options_and_a_newer_format_is_refused(tmp_path):
    plain = save_tensors(tmp_path / "plain.safetensors", TENSORS, {"format": "pt"})
    assert hbird_checkpoint_options(plain) == {}
    newer = save_tensors(tmp_path / "new.safetensors", TENSORS, {"format": "hbird-pretrain-2"})
    with pytest.raises(InputError, match="new.safetensors.*'hbird-pretrain-2'.*Upgrade hbird"):
        hbird_checkpoint_options(newer)
