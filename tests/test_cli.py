"""The CLI chains every training stage through one run config (configs/tiny.yaml)."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dalle_proto.cli import build_parser, main
from dalle_proto.clip import ClipEnsemble, ClipModel, load_clip
from dalle_proto.stages import UnusedOverrideWarning

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"data", "config", "train-text-tokenizer", "train-image-tokenizer", "encode", "train", "train-clip",
            "evaluate"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: dalle-proto" in capsys.readouterr().out


def test_unknown_config_key_is_a_clear_error():
    with pytest.raises(SystemExit) as e:
        main(["config", "--config", TINY, "transformer.depht=3"])
    assert "transformer.depht" in str(e.value) and "'depth'" in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("data.shapes_mix=[1,2,3]", "shapes mix must be three whole percentages"),
    ("transformer.depth=0", "TransformerConfig.depth must be >= 1, got 0"),
])
def test_a_value_a_config_check_refuses_is_a_one_line_error(override, message):
    with pytest.raises(SystemExit) as e:
        main(["config", "--config", TINY, override])
    assert str(e.value).startswith(f"dalle-proto: error: {message}") and "\n" not in str(e.value)


def test_converse_relations_on_captions_without_the_shapes_grammar_is_refused(tmp_path):
    with pytest.raises(SystemExit) as e, pytest.warns(UnusedOverrideWarning):  # data.* is encode's
        main(["train", "--config", TINY, f"out_dir={tmp_path / 'run'}", "data.kind=folder",
              "training.converse_relations=0.5"])
    assert str(e.value) == ("dalle-proto: error: training.converse_relations=0.5 restates shapes pair captions and "
                            "has no effect on data.kind='folder'; set it to 0")
    assert not (tmp_path / "run").exists()


def test_config_prints_resolved_values(capsys):
    main(["config", "--config", TINY, "transformer.depth=3"])
    out = capsys.readouterr().out
    assert "depth: 3" in out and "size: tiny" in out


def test_an_override_takes_effect_or_fails(tmp_path):
    out = tmp_path / "run"
    with pytest.warns(UnusedOverrideWarning, match=r"override 'transformer.depth=3' is not used by "
                                                   r"train-text-tokenizer .* it takes effect in: train$"):
        main(["train-text-tokenizer", "--config", TINY, f"out_dir={out}", "transformer.depth=3"])
    tokenizer_file = out / "text_tokenizer" / "tokenizer.json"
    # the saved tokenizer fixes bpe_dropout for the transformer stage: a different value is an error ...
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", TINY, f"out_dir={out}", "text_tokenizer.bpe_dropout=0"])
    message = str(e.value)
    assert message.startswith("dalle-proto: error: override 'text_tokenizer.bpe_dropout=0' has no effect on "
                              f"train: bpe_dropout=0.1 is in force, from {tokenizer_file}") and "\n" not in message
    assert not (out / "transformer_training").exists()  # refused before any work
    with pytest.raises(SystemExit, match=r"vocab_size=300 is in force"):  # the requested size, not the true one
        main(["train-clip", "--config", TINY, f"out_dir={out}", "text_tokenizer.vocab_size=500"])
    with pytest.raises(SystemExit, match=r"text_len=16 is in force, from .*tokenizer.json"):
        main(["train", "--config", TINY, f"out_dir={out}", "transformer.text_len=32"])
    # ... and the value in force, or the stage retrained with the new one, is fine
    main(["train-text-tokenizer", "--config", TINY, f"out_dir={out}", "text_tokenizer.bpe_dropout=0"])
    assert json.loads(tokenizer_file.read_text())["model"]["dropout"] is None
    from dalle_proto.run_config import load_run_config
    from dalle_proto.stages import check_overrides

    overrides = ["text_tokenizer.bpe_dropout=0", "text_tokenizer.vocab_size=300", "training.steps=2"]
    check_overrides("train", load_run_config([TINY], [f"out_dir={out}", *overrides]), overrides)


def test_data_shapes_writes_triplets(tmp_path):
    main(["data", "shapes", "--out", str(tmp_path), "--count", "3", "--split", "eval", "--size", "48"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{i:06d}.{ext}" for i in range(3) for ext in ("json", "png", "txt")]
    assert Image.open(tmp_path / "000002.png").size == (48, 48)
    assert json.loads((tmp_path / "000000.json").read_text())["split"] == "eval"


@pytest.mark.slow
def test_training_stages_chain_from_one_config(tmp_path):
    out = tmp_path / "run"
    for stage in ("train-text-tokenizer", "train-image-tokenizer", "encode", "train", "train-clip"):
        main([stage, "--config", TINY, f"out_dir={out}"])
    for folder in ("text_tokenizer", "image_tokenizer", "transformer", "clip"):
        assert any((out / folder).iterdir()), folder
    assert (out / "token_cache" / "train" / "meta.json").is_file()
    assert (out / "token_cache" / "eval" / "meta.json").is_file()
    assert list((out / "transformer_training" / "samples").glob("*.png"))
    transformer_config = json.loads((out / "transformer" / "config.json").read_text())
    tokenizer_json = json.loads((out / "text_tokenizer" / "tokenizer.json").read_text())
    assert transformer_config["text_vocab_size"] == len(tokenizer_json["model"]["vocab"])
    assert transformer_config["image_vocab_size"] == 64 and transformer_config["image_grid"] == 16
    clip_config = json.loads((out / "clip" / "config.json").read_text())
    assert clip_config["text_vocab_size"] == transformer_config["text_vocab_size"] + transformer_config["text_len"]
    main(["evaluate", "--checkpoint", str(out), "--per-category", "1", "--batch-size", "4",
          "--cfg-scale", "1.25", "--cfg-schedule", "linear", "--temperature", "0.95"])
    assert "| full |" in (out / "evaluation" / "evaluation.md").read_text()
    sampling = json.loads((out / "evaluation" / "evaluation.json").read_text())["sampling"]
    assert sampling["cfg_scale"] == 1.25 and sampling["cfg_schedule"] == "linear"  # the options over pipeline.json
    assert sampling["temperature"] == 0.95
    single = load_clip(out / "clip")
    # members=2 keeps the finished run as member 0 and trains member 1 from seed + 1 beside it
    main(["train-clip", "--config", TINY, f"out_dir={out}", "clip_training.members=2"])
    ensemble = load_clip(out / "clip")
    assert isinstance(single, ClipModel) and isinstance(ensemble, ClipEnsemble) and len(ensemble.members) == 2
    assert (out / "clip_training_member_1" / "checkpoints").is_dir()
    first, second = (m.state_dict() for m in ensemble.members)
    assert all(torch.equal(v, single.state_dict()[k]) for k, v in first.items())
    assert not all(torch.equal(v, second[k]) for k, v in first.items())
    main(["generate", "a red circle", "--model", str(out), "--num-images", "2", "--rerank", "2",
          "--out", str(tmp_path / "reranked.png")])
    assert (tmp_path / "reranked.png").is_file()
    main(["export", str(out), str(tmp_path / "exported")])  # bf16, ensemble and all
    exported = load_clip(tmp_path / "exported" / "clip")
    assert isinstance(exported, ClipEnsemble) and exported.members[1].logit_scale.dtype == torch.float32
    assert torch.equal(exported.members[1].logit_scale, second["logit_scale"].bfloat16().float())


def test_every_shipped_config_loads():
    from dalle_proto.run_config import load_run_config

    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(paths) >= 5
    for path in paths:
        load_run_config([path])  # an unknown key or bad value in any of them fails here
    finetune = load_run_config([ROOT / "configs" / "mindalle_finetune.yaml"])
    assert finetune.init_from and finetune.data.image_size == 256
