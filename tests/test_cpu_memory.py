"""cpu_memory.retain_freed_memory: a training step stops page-faulting its activation buffers in."""
import subprocess
import sys
import textwrap

import pytest

from dalle_proto.cpu_memory import retain_freed_memory

# a few bf16-autocast forward/backward steps of a one-layer model with the peer benchmark's
# sequence (64 text + 256 image tokens, batch 16); prints minor page faults per step
STEPS = textwrap.dedent("""
    import resource, sys
    if sys.argv[1] == "retain":
        from dalle_proto.cpu_memory import retain_freed_memory
        assert retain_freed_memory()
    import torch
    from dalle_proto.transformer import DalleTransformer, TransformerConfig
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DalleTransformer(TransformerConfig.from_size("peer", depth=1))
    text, image = torch.randint(0, 1024, (16, 64)), torch.randint(0, 512, (16, 256))
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model.loss(text, image)
        loss.backward()
    step(); step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
""")


def _faults_per_step(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt only")
def test_retain_freed_memory_cuts_the_page_faults_of_a_training_step():
    default, retained = _faults_per_step("default"), _faults_per_step("retain")
    assert retained * 3 < default, (default, retained)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt only")
def test_retain_freed_memory_is_idempotent():
    assert retain_freed_memory() is True
    assert retain_freed_memory() is True
