"""minDALL-E import: a tiny random-weight release in minDALL-E's exact layout, converted with
`convert_mindalle`, must give minDALL-E's text ids, logits, greedy codes and pixels (the reference
is tests/mindalle_reference.py, written from minDALL-E's source, not from dalle_proto)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from tokenizers import CharBPETokenizer

import mindalle_reference as ref
from test_transformer_training import Crash, Crashed
from dalle_proto import stages
from dalle_proto.cli import main
from dalle_proto.mindalle import convert_mindalle
from dalle_proto.pipeline import DallePipeline
from dalle_proto.pretrained import BadSavedFileError
from dalle_proto.run_config import load_run_config
from dalle_proto.sampling import generate_image_tokens
from dalle_proto.text_tokenizer import TextTokenizer, TruncationWarning
from dalle_proto.transformer import DalleTransformer

CAPTIONS = ["a red circle next to a blue square", "two green triangles on a white background",
            "a painting of a cat with sunglasses in the frame", "a large pink elephant walking on the beach",
            "eiffel tower on a desert", "a photo of a dog, a bird and a tree!"] * 3
LONG = " ".join(["a red circle next to a blue square"] * 12)  # about 100 words: truncated at 64 ids
PROMPTS = ["A Red CIRCLE next to a blue square", "eiffel tower on a MOUNTAIN, über desert?", LONG]
STAGE1 = dict(n_embed=64, embed_dim=16, ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, attn_resolutions=[8],
              resolution=32, z_channels=32)  # an f4 VQGAN: 8x8 codes, attention at the 8 px level
STAGE2 = dict(embed_dim=32, n_layers=2, n_heads=4, ctx_len_img=64, ctx_len_txt=64)


def _randomize(module: torch.nn.Module, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if isinstance(module.get_submodule(name.rpartition(".")[0]), (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                p.copy_(noise * (0.5 if "head" in name else scale))


def make_release(folder: Path, seed: int = 0, mlp_bias: bool = True, attn_bias: bool = True):
    """Write config.yaml, tokenizer/, stage1_last.ckpt and stage2_last.ckpt as minDALL-E's 1.3B/ holds
    them (Lightning-style {"state_dict": ...}, no key prefix); returns the reference models."""
    (folder / "tokenizer").mkdir(parents=True)
    bpe = CharBPETokenizer(unk_token="[UNK]", lowercase=True)
    bpe.train_from_iterator(CAPTIONS, vocab_size=150, min_frequency=1, special_tokens=["[UNK]"], show_progress=False)
    bpe.save_model(str(folder / "tokenizer"), "bpe-16k")
    tokenizer = ref.build_tokenizer(str(folder / "tokenizer"))
    vocab_size_txt = tokenizer.get_vocab_size()
    config = {"dataset": {"tokenizer_type": "CharBPE", "context_length": 64},
              "stage1": {"type": "vqgan", "embed_dim": STAGE1["embed_dim"], "n_embed": STAGE1["n_embed"],
                         "hparams": {k: v for k, v in STAGE1.items() if k not in ("n_embed", "embed_dim")}
                         | {"double_z": False, "in_channels": 3, "out_ch": 3}},
              "stage2": {"type": "transformer1d", "vocab_size_txt": vocab_size_txt, "vocab_size_img": STAGE1["n_embed"],
                         "hparams": STAGE2 | {"n_dense_layers": STAGE2["n_layers"], "mlp_bias": mlp_bias,
                                              "attn_bias": attn_bias, "gelu_use_approx": False}}}
    OmegaConf.save(OmegaConf.create(config), folder / "config.yaml")
    torch.manual_seed(seed)
    stage1 = ref.VQGAN(**STAGE1).eval()
    _randomize(stage1, seed, 0.1)
    stage2 = ref.Transformer1d(vocab_size_txt, STAGE1["n_embed"], mlp_bias=mlp_bias, attn_bias=attn_bias,
                               **STAGE2).eval()
    _randomize(stage2, seed + 1, 0.2)
    torch.save({"state_dict": stage1.state_dict(), "epoch": 3}, folder / "stage1_last.ckpt")
    torch.save({"state_dict": stage2.state_dict(), "global_step": 10}, folder / "stage2_last.ckpt")
    return tokenizer, stage1, stage2


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    src = tmp_path_factory.mktemp("mindalle") / "1.3B"
    tokenizer, stage1, stage2 = make_release(src)
    out = convert_mindalle(src.parent, tmp_path_factory.mktemp("converted") / "pipe")  # the folder holding 1.3B/
    pipe = DallePipeline.from_pretrained(out, dtype=torch.float32)
    return dict(src=src, out=out, tokenizer=tokenizer, stage1=stage1, stage2=stage2, pipe=pipe)


def ref_ids(tokenizer, prompts) -> torch.Tensor:
    return torch.tensor([e.ids for e in tokenizer.encode_batch(prompts)])  # (B, 64)


def test_text_ids_equal_mindalle_tokenizer(release):
    tok, ours = release["tokenizer"], release["pipe"].text_tokenizer
    with pytest.warns(TruncationWarning, match="truncated to the first 64"):
        ids = ours.encode(PROMPTS)
    assert ids.shape == (3, 64)
    assert torch.equal(ids, ref_ids(tok, PROMPTS))
    pad = tok.token_to_id("[PAD]")
    assert ours.pad_id == pad and ours.total_vocab_size == ours.vocab_size == tok.get_vocab_size()
    assert int((ids[0] == pad).sum()) > 50 and not bool((ids[2] == pad).any())  # padded / truncated
    assert torch.equal(ours.null_ids(), torch.full((64,), pad))
    assert tok.token_to_id("[UNK]") in ids[1].tolist()  # "ü" is not in the tiny alphabet
    assert ours.decode(ids[0]) == "a red circle next to a blue square"
    loaded = TextTokenizer.from_pretrained(release["out"] / "text_tokenizer")  # the saved tokenizer.json
    assert loaded.config == ours.config and torch.equal(loaded.encode(PROMPTS[:2]), ids[:2])


def test_forward_logits_equal_mindalle(release):
    ids = ref_ids(release["tokenizer"], PROMPTS)
    codes = torch.randint(0, STAGE1["n_embed"], (3, 64), generator=torch.Generator().manual_seed(1))
    pos_img, pos_txt = torch.arange(64).repeat(3, 1), torch.arange(64).repeat(3, 1)
    with torch.no_grad():
        ref_img, ref_txt = release["stage2"](codes, ids, pos_img, pos_txt)
        text_logits, image_logits = release["pipe"].transformer(ids, codes)
    torch.testing.assert_close(image_logits, ref_img, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(text_logits, ref_txt, atol=1e-4, rtol=1e-4)


def test_greedy_codes_and_pixels_equal_mindalle(release):
    pipe, ids = release["pipe"], ref_ids(release["tokenizer"], PROMPTS)
    torch.manual_seed(0)
    ref_codes = ref.sampling(release["stage2"], ids, top_k=1, max_seq_len=64)  # (3, 64)
    ref_pixels = ref.pixels(release["stage1"], ref_codes.view(3, 8, 8))  # (3, 3, 32, 32) in [0, 1]
    decoded = []
    decode = pipe.image_tokenizer.decode
    pipe.image_tokenizer.decode = lambda tokens: decoded.append(tokens.clone()) or decode(tokens)
    try:
        with pytest.warns(TruncationWarning):
            images = pipe(PROMPTS, num_images=1, temperature=0, cfg_scale=1.0, seed=0)
    finally:
        del pipe.image_tokenizer.decode
    assert torch.equal(torch.cat(decoded).view(3, 64), ref_codes)
    assert len(set(ref_codes.flatten().tolist())) > 4  # not one repeated code: the comparison says something
    ours = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float()  # 0..255
    assert float((ours - ref_pixels * 255).abs().max()) <= 2.0
    assert float(ref_pixels.std()) > 0.05  # not a flat or saturated picture
    # the KV-cache path samples the same codes as minDALL-E's `past` sampler with top-k 1
    assert torch.equal(generate_image_tokens(pipe.transformer, ids, temperature=1.0, top_k=1).view(3, 64), ref_codes)


def test_pipeline_folder_and_defaults(release):
    out, pipe = release["out"], release["pipe"]
    assert {p.name for p in out.iterdir()} == {"text_tokenizer", "image_tokenizer", "transformer",
                                               "pipeline.json", "README.md"}
    for part in ("image_tokenizer", "transformer"):
        assert {p.name for p in (out / part).iterdir()} == {"config.json", "model.safetensors"}
    config, c = pipe.config, pipe.transformer.config
    assert (config.top_k, config.temperature, config.cfg_scale, config.top_p) == (256, 1.0, 1.0, None)
    pad = release["tokenizer"].token_to_id("[PAD]")
    assert (c.attention, c.image_position, c.text_pad_id) == ("full", "raster", pad)
    assert c.text_total_vocab == release["tokenizer"].get_vocab_size()


def test_absent_biases_convert_to_zeros(tmp_path):
    tokenizer, _, stage2 = make_release(tmp_path / "src", seed=3, mlp_bias=False, attn_bias=False)
    pipe = DallePipeline.from_pretrained(convert_mindalle(tmp_path / "src", tmp_path / "out"), dtype=torch.float32)
    ids = ref_ids(tokenizer, PROMPTS[:2])
    codes = torch.randint(0, STAGE1["n_embed"], (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_img, _ = stage2(codes, ids, torch.arange(64).repeat(2, 1), torch.arange(64).repeat(2, 1))
        _, image_logits = pipe.transformer(ids, codes)
    torch.testing.assert_close(image_logits, ref_img, atol=1e-4, rtol=1e-4)


def _copy(release, tmp_path) -> Path:
    return Path(shutil.copytree(release["src"], tmp_path / "src"))


def test_missing_file_is_one_line_naming_it(release, tmp_path):
    src = _copy(release, tmp_path)
    (src / "stage2_last.ckpt").unlink()
    with pytest.raises(BadSavedFileError, match=r"stage2_last\.ckpt: missing; expected minDALL-E's") as e:
        convert_mindalle(src, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    (src / "tokenizer" / "bpe-16k-merges.txt").unlink()
    with pytest.raises(BadSavedFileError, match=r"bpe-16k-merges\.txt: missing"):
        convert_mindalle(src, tmp_path / "out")


def _edit_stage2(src: Path, edit) -> None:
    ckpt = torch.load(src / "stage2_last.ckpt", weights_only=True)
    edit(ckpt["state_dict"])
    torch.save(ckpt, src / "stage2_last.ckpt")


def test_mismatched_shape_names_file_key_and_shape(release, tmp_path):
    src = _copy(release, tmp_path)
    _edit_stage2(src, lambda sd: sd.update({"blocks.1.attn.key.weight": torch.zeros(32, 33)}))
    with pytest.raises(BadSavedFileError, match=r"stage2_last\.ckpt: key 'blocks\.1\.attn\.key\.weight': "
                                                r"expected shape \(32, 32\), found \(32, 33\)") as e:
        convert_mindalle(src, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_missing_or_unexpected_key_is_named(release, tmp_path):
    src = _copy(release, tmp_path)
    _edit_stage2(src, lambda sd: sd.pop("head_txt.weight"))
    with pytest.raises(BadSavedFileError, match=r"stage2_last\.ckpt: missing key 'head_txt\.weight' of shape \("):
        convert_mindalle(src, tmp_path / "out")
    _edit_stage2(src, lambda sd: sd.update({"head_txt.weight": torch.zeros(1), "sos": torch.zeros(1, 1, 32)}))
    with pytest.raises(BadSavedFileError, match=r"unexpected key 'sos'"):
        convert_mindalle(src, tmp_path / "out")
    ckpt = torch.load(src / "stage1_last.ckpt", weights_only=True)
    ckpt["state_dict"]["quantize.embedding.weight"] = torch.zeros(63, 16)
    torch.save(ckpt, src / "stage1_last.ckpt")
    with pytest.raises(BadSavedFileError, match=r"stage1_last\.ckpt: key 'quantize\.embedding\.weight': "
                                                r"expected shape \(64, 16\), found \(63, 16\)"):
        convert_mindalle(src, tmp_path / "out")


class NotAWeight:
    pass


def test_pickled_objects_are_refused_not_unpickled(release, tmp_path):
    src = _copy(release, tmp_path)
    ckpt = torch.load(src / "stage2_last.ckpt", weights_only=True)
    torch.save({**ckpt, "hyper_parameters": NotAWeight()}, src / "stage2_last.ckpt")
    with pytest.raises(BadSavedFileError, match=r"stage2_last\.ckpt: holds objects that "
                                                r"torch\.load\(weights_only=True\) refuses"):
        convert_mindalle(src, tmp_path / "out")


def test_bad_config_and_existing_out(release, tmp_path):
    src = _copy(release, tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        convert_mindalle(src, tmp_path / "out")
    config = OmegaConf.load(src / "config.yaml")
    config.stage2.hparams.gelu_use_approx = True
    OmegaConf.save(config, src / "config.yaml")
    with pytest.raises(BadSavedFileError, match=r"config\.yaml: stage2\.hparams\.gelu_use_approx is true"):
        convert_mindalle(src, tmp_path / "out2")


def test_cli_convert_prints_time(release, tmp_path, capsys):
    assert main(["convert", "mindalle", str(release["src"]), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert f"-> {tmp_path / 'out'} in " in printed and " s " in printed
    assert (tmp_path / "out" / "transformer" / "model.safetensors").is_file()
    main(["generate", "a red circle next to a blue square", "--model", str(tmp_path / "out"), "--num-images", "2",
          "--out", str(tmp_path / "grid.png")])  # like any other model folder
    assert Image.open(tmp_path / "grid.png").size[0] >= 2 * 32
    with pytest.raises(SystemExit, match=r"dalle-proto: error: .*not an empty folder"):
        main(["convert", "mindalle", str(release["src"]), str(tmp_path / "out")])


# ---- fine-tuning a converted model: init_from=OUT ------------------------------------------------
def _photo_folder(folder: Path, count: int = 12) -> Path:
    """The user's data: x.png + x.txt pairs, 32 px like the tiny release's VQGAN."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(count):
        image = np.full((32, 32, 3), 255, np.uint8)
        colour = rng.integers(0, 255, 3)
        r, c = rng.integers(0, 20, 2)
        image[r:r + 12, c:c + 12] = colour
        Image.fromarray(image).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a square of colour {i}\na photo of thing {i % 4}\n")
    return folder


def test_fine_tune_a_converted_model_and_resume_exactly(release, tmp_path):
    data = _photo_folder(tmp_path / "photos")
    source = release["out"]
    common = [f"init_from={source}", "data.kind=folder", f"data.path={data}", "data.image_size=32",
              "data.eval_count=2", "training.steps=4", "training.batch_size=4", "training.warmup_steps=1",
              "training.precision=32-true", "training.accelerator=cpu", "training.checkpoint_every=2",
              "training.val_every=2", "training.val_batches=1", "training.sample_every=0", "training.log_every=1",
              "training.caption_dropout=0.25"]
    runs = {name: tmp_path / name for name in ("straight", "resumed", "frozen")}
    for out in runs.values():
        main(["encode", f"out_dir={out}", *common])
        assert (out / "token_cache" / "train" / "meta.json").is_file()
        for part, name in (("text_tokenizer", "tokenizer.json"), ("image_tokenizer", "model.safetensors")):
            assert (out / part / name).read_bytes() == (source / part / name).read_bytes()
    assert json.loads((runs["straight"] / "pipeline.json").read_text())["top_k"] == 256  # its sampling defaults

    main(["train", f"out_dir={runs['straight']}", *common])
    config = load_run_config([], [f"out_dir={runs['resumed']}", *common])
    with pytest.raises(Crashed):
        stages.train(config, callbacks=[Crash(at_step=3)])
    stages.train(config)  # the same command again resumes from step 2
    straight, resumed = (DalleTransformer.from_pretrained(runs[k] / "transformer") for k in ("straight", "resumed"))
    start = release["pipe"].transformer
    assert straight.config == start.config  # minDALL-E's layout, from OUT/transformer/config.json
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in straight.state_dict().items())
    assert not torch.equal(straight.image_head.weight, start.image_head.weight)  # it trained

    # it starts from OUT's weights: an lr too small to move an fp32 weight leaves them as converted
    main(["train", f"out_dir={runs['frozen']}", *common, "training.lr=1e-30", "training.ema_decay=0"])
    frozen = DalleTransformer.from_pretrained(runs["frozen"] / "transformer")
    assert all(torch.equal(v, start.state_dict()[k]) for k, v in frozen.state_dict().items())

    pipe = DallePipeline.from_pretrained(runs["straight"], dtype=torch.float32)  # out_dir is a pipeline
    images = pipe(["a square of colour 3"], num_images=2, temperature=0, cfg_scale=1.0, seed=0)
    assert [im.size for im in images] == [(32, 32)] * 2


def test_init_from_fixes_the_parts(release, tmp_path):
    source, out = release["out"], tmp_path / "run"
    with pytest.raises(SystemExit, match=r"init_from=.* is set, so this run uses its text tokenizer"):
        main(["train-text-tokenizer", f"out_dir={out}", f"init_from={source}"])
    with pytest.raises(SystemExit, match=r"init_from=.* is set, so this run uses its image tokenizer"):
        main(["train-image-tokenizer", f"out_dir={out}", f"init_from={source}"])
    with pytest.raises(SystemExit, match=r"override 'transformer.depth=3' has no effect on train: depth=2 is in "
                                         r"force, from .*transformer/config.json"):
        main(["train", f"out_dir={out}", f"init_from={source}", "transformer.depth=3"])
    shapes = str(Path(__file__).resolve().parents[1] / "configs" / "shapes_paper.yaml")  # sets only transformer.size: peer
    with pytest.raises(SystemExit, match=r"init_from=.* fixes the transformer .* but this run config sets "
                                         r"transformer.size='peer'.*drop the transformer section"):
        main(["train", "--config", shapes, f"out_dir={out}", f"init_from={source}"])
    with pytest.raises(SystemExit, match=r"init_from=.*transformer: not a pipeline folder \(text_tokenizer/, "
                                         r"image_tokenizer/, transformer/ missing\)"):
        main(["encode", f"out_dir={out}", f"init_from={source / 'transformer'}"])
