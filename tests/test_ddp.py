"""DDP on CPU: two gloo processes train a tiny transformer; the replicas must stay identical.

Lightning's DDP strategy launches the other rank by re-running the script, so the run lives in a
small script executed in a subprocess; each rank saves what it saw and its final weights.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from dalle_proto.datasets.shapes import ShapesDataset
from dalle_proto.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from dalle_proto.text_tokenizer import TextTokenizer, TextTokenizerConfig
from dalle_proto.token_cache import encode_to_cache
from dalle_proto.transformer import DalleTransformer

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import sys
    import lightning.pytorch as pl
    import torch
    from dalle_proto.text_tokenizer import TextTokenizer
    from dalle_proto.token_cache import TokenCache
    from dalle_proto.transformer import TransformerConfig
    from dalle_proto.transformer_training import TransformerTrainConfig, train_transformer

    world, out = sys.argv[1], sys.argv[2]

    class Record(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.initial = {k: v.clone() for k, v in pl_module.model.transformer.state_dict().items()}
            self.batches = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batches.append(batch["image_ids"].clone())

        def on_train_end(self, trainer, pl_module):
            torch.save({"initial": self.initial, "batches": self.batches, "world_size": trainer.world_size,
                        "final": pl_module.model.transformer.state_dict(),
                        "ema": pl_module.ema_model.transformer.state_dict()},
                       f"{out}/rank{trainer.global_rank}.pt")

    text_tokenizer = TextTokenizer.from_pretrained(world)
    config = TransformerConfig.from_size("tiny", text_vocab_size=text_tokenizer.vocab_size)
    train = TransformerTrainConfig(steps=3, batch_size=2, warmup_steps=1, precision="32-true", accelerator="cpu",
                                   devices=2, strategy="ddp", val_every=3, val_batches=1, val_fraction=0.2,
                                   sample_every=0, checkpoint_every=3, log_every=1, ema_decay=0.9)
    train_transformer(config, train, text_tokenizer, TokenCache(f"{world}/cache"), None, out, callbacks=[Record()])
''')


def test_ddp_two_cpu_processes_keep_identical_replicas(tmp_path):
    world, out = tmp_path / "world", tmp_path / "run"
    shapes = ShapesDataset(count=24, seed=0, size=32)
    torch.manual_seed(0)
    image_tokenizer = ImageTokenizer(ImageTokenizerConfig(resolution=32, ch=32, ch_mult=[1, 2, 2], z_channels=32,
                                                          embed_dim=8, n_embed=256))
    encode_to_cache(image_tokenizer, shapes, world / "cache", batch_size=24, progress=False)
    TextTokenizer.from_captions([shapes[i][1] for i in range(len(shapes))],
                                TextTokenizerConfig(vocab_size=300, text_len=16, bpe_dropout=0.0)).save_pretrained(world)
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), str(world), str(out)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for key in ranks[0]["final"]:
        assert torch.equal(ranks[0]["final"][key], ranks[1]["final"][key]), key  # gradients were averaged
        assert torch.equal(ranks[0]["ema"][key], ranks[1]["ema"][key]), key
        assert torch.equal(ranks[0]["initial"][key], ranks[1]["initial"][key]), key
    assert any(not torch.equal(ranks[0]["initial"][k], ranks[0]["final"][k]) for k in ranks[0]["final"])
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 3
    assert all(not torch.equal(a, b) for a, b in zip(ranks[0]["batches"], ranks[1]["batches"]))  # sharded data

    exported = DalleTransformer.from_pretrained(out / "transformer")  # rank 0 exported the EMA weights
    assert all(torch.equal(v, ranks[0]["ema"][k]) for k, v in exported.state_dict().items())
