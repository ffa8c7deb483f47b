"""A broken saved file fails with one line that names it, for every part; and nothing is unpickled.

A pipeline folder with a single CLIP and one with a CLIP ensemble are saved once from tiny untrained
parts; each test corrupts one file in a copy (truncated, 3 bytes, a torch.save pickle under the
name, invalid JSON, values of the wrong type) and loads the copy.
"""
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dalle_proto.checkpointing import AtomicCheckpointIO, load_training_checkpoint
from dalle_proto.cli import main
from dalle_proto.clip import ClipConfig, ClipEnsemble, ClipModel, load_clip
from dalle_proto.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from dalle_proto.image_tokenizer.dvae import load_dall_e
from dalle_proto.image_tokenizer.taming_loading import read_lightning_state_dict
from dalle_proto.pipeline import DallePipeline
from dalle_proto.pretrained import BadSavedFileError, read_safetensors
from dalle_proto.text_tokenizer import TextTokenizer, TextTokenizerConfig
from dalle_proto.transformer import DalleTransformer, TransformerConfig

CAPTIONS = ["a red circle", "two blue squares", "a green triangle in the top left",
            "a small yellow star to the left of a large red circle"] * 4
WEIGHT_FILES = ["transformer/model.safetensors", "image_tokenizer/model.safetensors", "clip/model.safetensors",
                "ensemble:clip/member_1/model.safetensors"]
JSON_FILES = ["transformer/config.json", "image_tokenizer/config.json", "clip/config.json",
              "ensemble:clip/member_0/config.json", "ensemble:clip/ensemble.json", "pipeline.json"]
NOT_SAFETENSORS = "not a valid safetensors file ("
EXPECTED_WEIGHTS = "expected the model.safetensors written by save_pretrained"
PICKLE_MESSAGE = ("looks like a torch.save pickle", "dalle_proto does not unpickle weight files",
                  "re-save with safetensors")


def tiny_parts():
    torch.manual_seed(0)
    text_tokenizer = TextTokenizer.from_captions(CAPTIONS, TextTokenizerConfig(vocab_size=300, text_len=12))
    image_tokenizer = ImageTokenizer(ImageTokenizerConfig(
        resolution=32, ch=32, ch_mult=[1, 1, 1], z_channels=32, embed_dim=8, n_embed=64)).eval()
    transformer = DalleTransformer(TransformerConfig.from_size(
        "tiny", text_vocab_size=text_tokenizer.vocab_size, text_len=12, image_vocab_size=64, image_grid=8)).eval()
    return text_tokenizer, image_tokenizer, transformer


def tiny_clip(text_tokenizer) -> ClipModel:
    return ClipModel(ClipConfig(text_vocab_size=text_tokenizer.total_vocab_size, text_len=text_tokenizer.text_len,
                                image_size=32, embed_dim=32, image_width=8, image_stages=2, text_width=32,
                                text_layers=1, text_heads=2)).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{"single": a pipeline folder with one CLIP, "ensemble": the same with a 2-member CLIP ensemble}."""
    root = tmp_path_factory.mktemp("saved")
    text_tokenizer, image_tokenizer, transformer = tiny_parts()
    single = DallePipeline(text_tokenizer, image_tokenizer, transformer, clip=tiny_clip(text_tokenizer))
    ensemble = DallePipeline(text_tokenizer, image_tokenizer, transformer,
                             clip=ClipEnsemble([tiny_clip(text_tokenizer), tiny_clip(text_tokenizer)]))
    return {"single": single.save_pretrained(root / "single"), "ensemble": ensemble.save_pretrained(root / "ensemble")}


def copy_with(saved, tmp_path, target: str) -> tuple[Path, Path]:
    """(a fresh copy of the right pipeline folder, the path of `target` inside it)."""
    kind, _, relative = target.rpartition(":")
    folder = shutil.copytree(saved[kind or "single"], tmp_path / "model")
    return folder, folder / relative


class SideEffect:
    """Unpickling this creates `path` (builtins.open): proof that a loader unpickled the file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def torch_save_pickle(path: Path, marker: Path | None = None, zip_format: bool = True) -> None:
    state = {"weight": torch.zeros(4)}
    if marker is not None:
        state["payload"] = SideEffect(marker)
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)


def load_error(folder: Path, expected_type: type = BadSavedFileError) -> str:
    with pytest.raises(expected_type) as e:
        DallePipeline.from_pretrained(folder, dtype=torch.float32)
    assert isinstance(e.value, ValueError)  # what the CLI turns into one line
    message = str(e.value)
    assert "\n" not in message, message
    return message


# ---- weight files -------------------------------------------------------------------------------
@pytest.mark.parametrize("target", WEIGHT_FILES)
def test_truncated_weights_are_named_as_truncated(saved, tmp_path, target):
    folder, path = copy_with(saved, tmp_path, target)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    message = load_error(folder)
    assert message.startswith(f"{path}: {NOT_SAFETENSORS}") and "truncated" in message
    assert message.endswith(EXPECTED_WEIGHTS)


@pytest.mark.parametrize("target", WEIGHT_FILES)
def test_a_three_byte_weight_file_is_named(saved, tmp_path, target):
    folder, path = copy_with(saved, tmp_path, target)
    path.write_bytes(b"abc")
    message = load_error(folder)
    assert message == (f"{path}: {NOT_SAFETENSORS}the file is 3 bytes, shorter than the 8-byte header "
                       f"length); {EXPECTED_WEIGHTS}")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("target", WEIGHT_FILES)
def test_a_torch_save_pickle_under_the_name_is_recognised_and_not_loaded(saved, tmp_path, target, zip_format):
    folder, path = copy_with(saved, tmp_path, target)
    marker = tmp_path / "unpickled"
    torch_save_pickle(path, marker, zip_format=zip_format)
    message = load_error(folder)
    assert message.startswith(f"{path}: {NOT_SAFETENSORS}looks like a torch.save pickle")
    assert all(part in message for part in PICKLE_MESSAGE), message
    assert not marker.exists()
    with open(path, "rb") as f:  # (a file object: torch.load hands *.safetensors names to safetensors)
        torch.load(f, weights_only=False)  # the payload is live: a real unpickle creates the marker
    assert marker.exists()


def test_a_valid_file_may_start_like_a_pickle_and_a_truncated_one_is_not_called_one(tmp_path):
    # a 640-byte header is written as 80 02 00 00 00 00 00 00: the bytes of a protocol-2 pickle
    path = tmp_path / "model.safetensors"
    for name_length in range(1, 700):
        tensors = {"w" * name_length: torch.arange(6.0)}
        save_file(tensors, str(path))
        if path.read_bytes()[:2] == b"\x80\x02":
            break
    else:
        pytest.fail("no name length gave a 640-byte header")
    assert torch.equal(read_safetensors(path)["w" * name_length], torch.arange(6.0))
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(BadSavedFileError, match="truncated: its tensors need 24 bytes of data, but only 20") as e:
        read_safetensors(path)
    assert "pickle" not in str(e.value)


def test_trailing_bytes_and_a_non_json_header_are_named(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    good = path.read_bytes()
    path.write_bytes(good + b"xx")
    with pytest.raises(BadSavedFileError, match=r"2 unexpected bytes after the last tensor"):
        read_safetensors(path)
    path.write_bytes((8).to_bytes(8, "little") + b"not json" + b"\0" * 8)
    with pytest.raises(BadSavedFileError, match=r"its 8-byte header is not JSON"):
        read_safetensors(path)


# ---- JSON files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("content,problem", [
    (b"{not json", "not valid JSON (Expecting property name enclosed in double quotes"),
    (b"", "not valid JSON (Expecting value: line 1 column 1 (char 0))"),
    (b"[1, 2]", "holds a JSON array; expected"),
    (b"\xff\xfe{}", "not UTF-8 text (byte 0: invalid start byte); expected"),
], ids=["garbage", "empty", "array", "binary"])
@pytest.mark.parametrize("target", JSON_FILES)
def test_bad_json_is_named(saved, tmp_path, target, content, problem):
    folder, path = copy_with(saved, tmp_path, target)
    path.write_bytes(content)
    message = load_error(folder)
    assert message.startswith(f"{path}: {problem}"), message
    assert f"expected the {path.name} written by" in message


@pytest.mark.parametrize("target", JSON_FILES)
def test_truncated_json_is_named(saved, tmp_path, target):
    folder, path = copy_with(saved, tmp_path, target)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    assert load_error(folder).startswith(f"{path}: not valid JSON (")


@pytest.mark.parametrize("target", JSON_FILES)
def test_a_pickle_under_a_json_name_is_recognised_and_not_loaded(saved, tmp_path, target):
    folder, path = copy_with(saved, tmp_path, target)
    marker = tmp_path / "unpickled"
    torch_save_pickle(path, marker)
    message = load_error(folder)
    assert message.startswith(f"{path}: not text (looks like a torch.save pickle: a zip archive"), message
    assert not marker.exists()


@pytest.mark.parametrize("target,key,value,problem", [
    ("transformer/config.json", "depth", "four", "TransformerConfig.depth must be int, got str 'four'"),
    ("transformer/config.json", "depth", 2.0, "TransformerConfig.depth must be int, got float 2.0"),
    ("transformer/config.json", "tie_embeddings", "yes", "TransformerConfig.tie_embeddings must be bool"),
    ("transformer/config.json", "mlp_ratio", True, "TransformerConfig.mlp_ratio must be float, got bool True"),
    ("transformer/config.json", "depth", 0, "TransformerConfig.depth must be >= 1, got 0"),
    ("transformer/config.json", "layers", 4, "unknown key(s) ['layers'] for TransformerConfig"),
    ("image_tokenizer/config.json", "ch_mult", [1, "2"], "ImageTokenizerConfig.ch_mult must be list[int]"),
    ("image_tokenizer/config.json", "kind", 3, "ImageTokenizerConfig.kind must be str, got int 3"),
    ("clip/config.json", "embed_dim", None, "ClipConfig.embed_dim must be int, got NoneType None"),
    ("ensemble:clip/member_0/config.json", "text_len", "12", "ClipConfig.text_len must be int, got str '12'"),
    ("ensemble:clip/ensemble.json", "members", "two", "members must be an integer >= 1; got 'two'"),
    ("ensemble:clip/ensemble.json", "members", True, "members must be an integer >= 1; got True"),
    ("pipeline.json", "top_k", "ten", "PipelineConfig.top_k must be int | None, got str 'ten'"),
    ("pipeline.json", "cfg_scale", [3], "PipelineConfig.cfg_scale must be float, got list [3]"),
])
def test_values_of_the_wrong_type_are_named(saved, tmp_path, target, key, value, problem):
    folder, path = copy_with(saved, tmp_path, target)
    values = json.loads(path.read_text())
    path.write_text(json.dumps({**values, key: value}))
    message = load_error(folder)
    assert message.startswith(f"{path}: ") and problem in message, message


def test_int_for_a_float_and_null_for_an_optional_still_load(saved, tmp_path):
    folder, path = copy_with(saved, tmp_path, "pipeline.json")
    path.write_text(json.dumps({"cfg_scale": 2, "temperature": 1.0, "top_k": None, "top_p": None}))
    assert DallePipeline.from_pretrained(folder, dtype=torch.float32).config.cfg_scale == 2


# ---- each part's own loader, and the text tokenizer --------------------------------------------
@pytest.mark.parametrize("part,loader", [("transformer", DalleTransformer.from_pretrained),
                                         ("image_tokenizer", ImageTokenizer.from_pretrained),
                                         ("clip", load_clip), ("ensemble:clip", load_clip)])
def test_each_parts_own_loader_names_the_file(saved, tmp_path, part, loader):
    target = f"{part}/member_0/model.safetensors" if part.startswith("ensemble") else f"{part}/model.safetensors"
    folder, path = copy_with(saved, tmp_path, target)
    path.write_bytes(b"abc")
    with pytest.raises(BadSavedFileError, match="shorter than the 8-byte header length") as e:
        loader(folder / part.rpartition(":")[2])
    assert str(e.value).startswith(f"{path}: ") and e.value.path == path


@pytest.mark.parametrize("content", [b"{not json", b'{"model": '], ids=["garbage", "truncated"])
def test_a_bad_tokenizer_json_is_named(saved, tmp_path, content):
    folder, path = copy_with(saved, tmp_path, "text_tokenizer/tokenizer.json")
    path.write_bytes(content)
    message = load_error(folder, ValueError)
    assert message.startswith(f"{path}: "), message


def test_a_pickle_under_the_tokenizer_json_name_is_named(saved, tmp_path):
    folder, path = copy_with(saved, tmp_path, "text_tokenizer/tokenizer.json")
    torch_save_pickle(path)
    assert load_error(folder, ValueError).startswith(f"{path}: ")


# ---- the command line ---------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "export", "evaluate"])
def test_cli_prints_one_line_naming_the_truncated_file(saved, tmp_path, command):
    folder, path = copy_with(saved, tmp_path, "transformer/model.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    out = tmp_path / "out"
    argv = {"generate": ["generate", "a red circle", "--model", str(folder), "--out", str(out / "x.png"),
                         "--device", "cpu"],
            "export": ["export", str(folder), str(out)],
            "evaluate": ["evaluate", "--checkpoint", str(folder), "--out", str(out), "--device", "cpu"]}[command]
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value)
    assert message.startswith(f"dalle-proto: error: {path}: {NOT_SAFETENSORS}truncated"), message
    assert "\n" not in message and not out.exists()


# ---- training checkpoints and third-party pickles -----------------------------------------------
def test_training_checkpoints_are_read_weights_only(tmp_path):
    path, marker = tmp_path / "last.ckpt", tmp_path / "unpickled"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": SideEffect(marker)}, path)
    for load in (load_training_checkpoint, lambda p: AtomicCheckpointIO().load_checkpoint(p, weights_only=False)):
        with pytest.raises(ValueError, match=r"last\.ckpt: not a training checkpoint that "
                                             r"torch\.load\(weights_only=True\) can read") as e:
            load(path)
        assert "\n" not in str(e.value)
    assert not marker.exists()
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, path)
    assert torch.equal(AtomicCheckpointIO().load_checkpoint(path)["state_dict"]["w"], torch.ones(2))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"last\.ckpt: not a training checkpoint") as e:
        load_training_checkpoint(path)
    assert "\n" not in str(e.value)


def test_taming_and_dall_e_loaders_run_no_code_and_name_the_file(tmp_path):
    path, marker = tmp_path / "model.ckpt", tmp_path / "unpickled"
    torch.save({"state_dict": {"w": torch.zeros(2), "payload": SideEffect(marker)}}, path)
    with pytest.raises(ValueError, match=r"model\.ckpt: state_dict entries that are not tensors"):
        read_lightning_state_dict(path)
    with pytest.raises(ValueError, match=r"model\.ckpt: expected a pickled dall_e\.encoder\.Encoder"):
        load_dall_e(path, path)
    assert not marker.exists()
    path.write_bytes(b"abc")
    for load in (read_lightning_state_dict, lambda p: load_dall_e(p, p)):
        with pytest.raises(ValueError, match=r"model\.ckpt: could not read") as e:
            load(path)
        assert "\n" not in str(e.value)
    pickle.loads(pickle.dumps(SideEffect(marker))).close()  # the payload is live
    assert marker.exists()
