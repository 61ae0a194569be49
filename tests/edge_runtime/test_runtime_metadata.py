"""``Runtime.metadata``: the model's own metadata, read from real bundles of each format.

The ONNX case adds ``metadata_props`` (an OCR-style character dictionary among them) to a
copy of the digits CNN and builds a real bundle from it; the TFLite case reads what the
converter wrote; the GGUF case compares with gguf-py's own reader of the bundled file.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

from edge_runtime.backends.tflite import _text_or_bytes
from edge_runtime.runtime import Runtime
from packager.examples import ExampleModel
from tests.conftest import build_example

CHARACTERS = "\n".join(["0", "1", "a", "é", "中", "€"])
PROPS = {"character_dict": CHARACTERS, "author": "edgepack tests", "threshold": "0.3"}


def file_props(runtime: Runtime) -> dict[str, str]:
    """The bundled ONNX file's metadata_props, read by the onnx package itself."""
    model = onnx.load(runtime.model_dir / runtime.manifest.model.path)
    return {prop.key: prop.value for prop in model.metadata_props}


@pytest.fixture(scope="module")
def onnx_bundle_with_props(digits_example, keypair, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx-metadata")
    model = onnx.load(digits_example.model)
    onnx.helper.set_model_props(model, PROPS)
    path = folder / "digits-with-props.onnx"
    onnx.save(model, path)
    example = ExampleModel(path, digits_example.calibration, digits_example.eval)
    output = folder / "digits-props.edgepkg"
    build_example(example, keypair[0], output, "x86-64-avx2")
    return output


def test_onnx_metadata_props_reach_the_runtime(onnx_bundle_with_props, keypair):
    with Runtime.open(onnx_bundle_with_props, keypair[1]) as runtime:
        metadata = runtime.metadata
        # The bundle's model is the quantized one, not the source: the props went through.
        assert runtime.manifest.model.precision == "int8"
        # Exactly what the bundled file holds: ours, plus what the quantizer added.
        assert dict(metadata) == file_props(runtime)
        assert {key: metadata[key] for key in PROPS} == PROPS
        assert metadata["character_dict"].split("\n")[4] == "中"
        with pytest.raises(TypeError):
            metadata["author"] = "someone else"  # type: ignore[index]
        assert runtime.metadata["author"] == "edgepack tests"
        logits = runtime.run({"image": np.zeros((1, 1, 8, 8), np.float32)})["logits"]
        assert logits.shape == (1, 10)


def test_a_model_without_our_props_shows_only_what_its_file_holds(cnn_bundle, keypair):
    with Runtime.open(cnn_bundle, keypair[1]) as runtime:
        assert dict(runtime.metadata) == file_props(runtime)
        assert "character_dict" not in runtime.metadata


def test_a_closed_backend_has_no_metadata(cnn_bundle, keypair):
    runtime = Runtime.open(cnn_bundle, keypair[1])
    runtime.close()
    assert runtime.backend.metadata() == {}


def test_tflite_metadata_entries_are_text_where_they_decode(tflite_pi4_bundle, keypair):
    with Runtime.open(tflite_pi4_bundle, keypair[1]) as runtime:
        metadata = dict(runtime.metadata)
        facts = runtime.backend.session.facts
    # The converter records the oldest runtime that can run the model, NUL-padded.
    assert set(metadata) == set(facts.metadata)
    assert re.fullmatch(r"\d+\.\d+\.\d+", metadata["min_runtime_version"])
    assert facts.metadata["min_runtime_version"].startswith(
        metadata["min_runtime_version"].encode()
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b"1.14.0\0\0\0\0\0\0\0\0\0\0", "1.14.0", id="nul-padded-text"),
        pytest.param("a\nb\té".encode(), "a\nb\té", id="utf8-lines"),
        pytest.param(b"\x1c\0\0\0TFLM\x08\0", b"\x1c\0\0\0TFLM\x08\0", id="flatbuffer"),
        pytest.param(b"\xff\xfe", b"\xff\xfe", id="not-utf8"),
    ],
)
def test_tflite_metadata_bytes_become_text_only_when_they_are_text(raw, expected):
    assert _text_or_bytes(raw) == expected


@pytest.mark.slow
def test_gguf_general_and_tokenizer_values(smollm2_pi5_bundle, keypair):
    import gguf

    with Runtime.open(smollm2_pi5_bundle, keypair[1]) as runtime:
        metadata = dict(runtime.metadata)
        reader = gguf.GGUFReader(runtime.model_dir / runtime.manifest.model.path)
    expected = {}
    for field in reader.fields.values():
        if not field.name.startswith(("general.", "tokenizer.")) or not field.types:
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        expected[field.name] = field.contents()
    assert metadata.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float):  # gguf-py reads float32 values into numpy floats
            assert metadata[key] == pytest.approx(value)
        else:
            assert metadata[key] == value
    assert metadata["general.architecture"] == "llama"
    assert metadata["general.file_type"] == 15  # Q4_K_M, as the profile's chain chose
    assert (
        "{{" in metadata["tokenizer.chat_template"] or "{%" in metadata["tokenizer.chat_template"]
    )
    assert "tokenizer.ggml.tokens" not in metadata  # arrays are left out
