"""from_dall_e: OpenAI dVAE pickles read without the dall_e package.

The test builds a fake `dall_e` package (same module, class and attribute names as openai/DALL-E,
same math), torch.saves whole Encoder/Decoder modules as OpenAI did, removes the package from
sys.modules, and checks the loader's outputs against the fake modules' own forward.
"""
import sys
import types
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle_proto.image_tokenizer import ImageTokenizer

EPS = 0.1  # dall_e.utils.logit_laplace_eps


def build_fake_dall_e() -> dict[str, types.ModuleType]:
    """Minimal dall_e.{utils,encoder,decoder} with OpenAI's names, attributes and math."""
    pkg, utils, enc_mod, dec_mod = (types.ModuleType(n) for n in
                                    ("dall_e", "dall_e.utils", "dall_e.encoder", "dall_e.decoder"))

    class Conv2d(nn.Module):
        def __init__(self, n_in, n_out, kw, use_float16=True, device=torch.device("cpu"), requires_grad=False):
            super().__init__()
            self.n_in, self.n_out, self.kw = n_in, n_out, kw
            self.use_float16, self.device, self.requires_grad = use_float16, device, requires_grad
            w = torch.empty((n_out, n_in, kw, kw)).normal_(std=1 / ((n_in * kw ** 2) ** 0.5))
            self.w, self.b = nn.Parameter(w, requires_grad=False), nn.Parameter(torch.randn(n_out) * 0.1,
                                                                                 requires_grad=False)

        def forward(self, x):
            return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)

    def make_block_class(name, kernels):
        class Block(nn.Module):
            def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
                super().__init__()
                self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
                self.device, self.requires_grad = device, requires_grad
                self.n_hid = n_out // 4
                self.post_gain = 1 / (n_layers ** 2)
                self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
                w = [n_in, self.n_hid, self.n_hid, self.n_hid, n_out]
                self.res_path = nn.Sequential(OrderedDict(
                    [item for i, k in enumerate(kernels) for item in
                     ((f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv2d(w[i], w[i + 1], k)))]))

            def forward(self, x):
                return self.id_path(x) + self.post_gain * self.res_path(x)
        Block.__name__ = name
        return Block

    EncoderBlock = make_block_class("EncoderBlock", (3, 3, 3, 1))
    DecoderBlock = make_block_class("DecoderBlock", (1, 3, 3, 3))

    class Encoder(nn.Module):
        group_count = 4  # a class constant in dall_e, so it is not in the pickled __dict__

        def __init__(self, n_hid=8, n_blk_per_group=2, input_channels=3, vocab_size=32):
            super().__init__()
            self.n_hid, self.n_blk_per_group = n_hid, n_blk_per_group
            self.input_channels, self.vocab_size = input_channels, vocab_size
            self.device, self.requires_grad, self.use_mixed_precision = torch.device("cpu"), False, True
            n_layers = self.group_count * n_blk_per_group
            widths = [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]
            groups = [("input", Conv2d(input_channels, n_hid, 7))]
            for g in range(1, 5):
                items = [(f"block_{i + 1}", EncoderBlock(widths[g - 1] if i == 0 else widths[g], widths[g],
                                                         n_layers)) for i in range(n_blk_per_group)]
                if g < 4:
                    items.append(("pool", nn.MaxPool2d(kernel_size=2)))
                groups.append((f"group_{g}", nn.Sequential(OrderedDict(items))))
            groups.append(("output", nn.Sequential(OrderedDict(
                [("relu", nn.ReLU()), ("conv", Conv2d(8 * n_hid, vocab_size, 1, use_float16=False))]))))
            self.blocks = nn.Sequential(OrderedDict(groups))

        def forward(self, x):
            return self.blocks(x)

    class Decoder(nn.Module):
        group_count = 4

        def __init__(self, n_init=8, n_hid=8, n_blk_per_group=2, output_channels=3, vocab_size=32):
            super().__init__()
            self.n_init, self.n_hid, self.n_blk_per_group = n_init, n_hid, n_blk_per_group
            self.output_channels, self.vocab_size = output_channels, vocab_size
            self.device, self.requires_grad, self.use_mixed_precision = torch.device("cpu"), False, True
            n_layers = self.group_count * n_blk_per_group
            widths = [n_init, 8 * n_hid, 4 * n_hid, 2 * n_hid, n_hid]
            groups = [("input", Conv2d(vocab_size, n_init, 1, use_float16=False))]
            for g in range(1, 5):
                items = [(f"block_{i + 1}", DecoderBlock(widths[g - 1] if i == 0 else widths[g], widths[g],
                                                         n_layers)) for i in range(n_blk_per_group)]
                if g < 4:
                    items.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
                groups.append((f"group_{g}", nn.Sequential(OrderedDict(items))))
            groups.append(("output", nn.Sequential(OrderedDict(
                [("relu", nn.ReLU()), ("conv", Conv2d(n_hid, 2 * output_channels, 1))]))))
            self.blocks = nn.Sequential(OrderedDict(groups))

        def forward(self, x):
            return self.blocks(x)

    for mod, classes in ((utils, [Conv2d]), (enc_mod, [EncoderBlock, Encoder]), (dec_mod, [DecoderBlock, Decoder])):
        for cls in classes:
            cls.__module__, cls.__qualname__ = mod.__name__, cls.__name__  # picklable by reference
            setattr(mod, cls.__name__, cls)
    pkg.utils, pkg.encoder, pkg.decoder = utils, enc_mod, dec_mod
    return {m.__name__: m for m in (pkg, utils, enc_mod, dec_mod)}


@pytest.fixture(scope="module")
def dall_e_files(tmp_path_factory):
    """(encoder.pkl, decoder.pkl, reference outputs) written with the fake package, then unregistered."""
    tmp = tmp_path_factory.mktemp("dall_e")
    modules = build_fake_dall_e()
    sys.modules.update(modules)
    try:
        torch.manual_seed(0)
        enc = modules["dall_e.encoder"].Encoder()
        dec = modules["dall_e.decoder"].Decoder()
        x01 = torch.rand(2, 3, 16, 16)  # dall_e's input: [0, 1] pixels through map_pixels
        with torch.no_grad():
            logits = enc((1 - 2 * EPS) * x01 + EPS)  # (2, 32, 2, 2)
            ids = logits.argmax(1)
            stats = dec(F.one_hot(ids, 32).permute(0, 3, 1, 2).float())  # (2, 6, 16, 16)
        torch.save(enc, tmp / "encoder.pkl")
        torch.save(dec, tmp / "decoder.pkl")
        torch.save(dec, tmp / "decoder_as_encoder.pkl")
        torch.save(modules["dall_e.decoder"].Decoder(vocab_size=64), tmp / "decoder_64.pkl")
    finally:
        for name in modules:
            del sys.modules[name]
    image = torch.clamp((torch.sigmoid(stats[:, :3]) - EPS) / (1 - 2 * EPS), 0, 1)
    return tmp, dict(x01=x01, logits=logits, ids=ids, image=image)


def test_loads_and_matches_dall_e_math(dall_e_files):
    tmp, ref = dall_e_files
    assert "dall_e" not in sys.modules
    model = ImageTokenizer.from_dall_e(tmp / "encoder.pkl", tmp / "decoder.pkl")
    assert "dall_e" not in sys.modules  # nothing imported the package
    c = model.config
    assert (c.kind, c.n_embed, c.n_hid, c.n_init, c.n_blk_per_group) == ("dvae", 32, 8, 8, 2)
    assert model.codebook_size == 32 and model.grid_size == 256 // 8
    assert "encoder.blocks.group_1.block_1.res_path.conv_1.w" in model.state_dict()
    assert "decoder.blocks.output.conv.b" in model.state_dict()
    x = ref["x01"] * 2 - 1  # our API takes [-1, 1]
    torch.testing.assert_close(model.encode_latents(x), ref["logits"], atol=1e-5, rtol=1e-5)
    ids = model.encode(x)
    assert ids.shape == (2, 2, 2) and torch.equal(ids, ref["ids"])
    torch.testing.assert_close(model.decode(ids), ref["image"] * 2 - 1, atol=1e-5, rtol=1e-5)


def test_wrong_file_is_named(dall_e_files):
    tmp, _ = dall_e_files
    expected = r"decoder_as_encoder\.pkl.*dall_e\.encoder\.Encoder.*found dall_e\.decoder\.Decoder"
    with pytest.raises(ValueError, match=expected):
        ImageTokenizer.from_dall_e(tmp / "decoder_as_encoder.pkl", tmp / "decoder.pkl")
    torch.save({"w": torch.zeros(1)}, tmp / "dict.pkl")
    with pytest.raises(ValueError, match=r"dict\.pkl.*found builtins\.dict"):
        ImageTokenizer.from_dall_e(tmp / "dict.pkl", tmp / "decoder.pkl")


def test_vocab_mismatch_between_files(dall_e_files):
    tmp, _ = dall_e_files
    with pytest.raises(ValueError, match=r"vocab_size: .*encoder\.pkl has 32, .*decoder_64\.pkl has 64"):
        ImageTokenizer.from_dall_e(tmp / "encoder.pkl", tmp / "decoder_64.pkl")
