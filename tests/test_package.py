"""The package's top-level API: the main classes import from `dalle_proto` itself, lazily."""
import subprocess
import sys

import pytest

import dalle_proto


def test_every_exported_name_resolves_to_its_module_object():
    from dalle_proto.clip import load_clip
    from dalle_proto.pipeline import DallePipeline
    from dalle_proto.transformer import DalleTransformer

    assert {"DallePipeline", "TextTokenizer", "ImageTokenizer", "DalleTransformer", "ClipModel",
            "load_clip", "make_image_grid"} <= set(dalle_proto.__all__)
    for name in dalle_proto.__all__:
        value = getattr(dalle_proto, name)
        assert value.__name__ == name and value.__module__.startswith("dalle_proto."), name
    assert dalle_proto.DallePipeline is DallePipeline and dalle_proto.load_clip is load_clip
    assert dalle_proto.DalleTransformer is DalleTransformer
    assert set(dalle_proto.__all__) <= set(dir(dalle_proto))
    with pytest.raises(AttributeError, match="has no attribute 'DallePipline'"):
        dalle_proto.DallePipline  # noqa: B018


def test_import_is_light_and_star_import_gives_the_api():
    # a fresh interpreter: importing the package loads neither torch nor lightning
    code = ("import sys, dalle_proto; heavy = [m for m in ('torch', 'lightning', 'tokenizers') if m in sys.modules];"
            "print(heavy); from dalle_proto import *; print(DallePipeline.__name__, load_clip.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "DallePipeline load_clip"
